"""``scripts/peer_bench.py``: without a usable peer checkout it stops with one clear line, exit code 2.

The measurement itself needs yl-1993's code, which is not part of this project (see docs/performance.md).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "peer_bench.py"


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (None, "no such directory"),
        ({}, "none of model/capsules.py, model.py found"),
        ({"model/capsules.py": "x = torch.cuda.FloatTensor(1)\n", "loss/spread_loss.py": ""}, "apply cpu.patch first"),
    ],
)
def test_an_unusable_peer_checkout_is_one_line_and_writes_nothing(layout, message, tmp_path):
    peer = tmp_path / "peer"
    if layout is not None:
        peer.mkdir()
        for name, text in layout.items():
            (peer / name).parent.mkdir(parents=True, exist_ok=True)
            (peer / name).write_text(text)
    report = tmp_path / "report.json"
    result = run_script("--peer-dir", str(peer), "--steps", "1", "--warmup", "0", "--json", str(report))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(peer) in lines[0]
    assert not report.exists()

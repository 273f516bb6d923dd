"""The checksum table on real dataset files, where copies of them are at hand (skipped elsewhere).

The files are looked for in ``$MATCAPS_REAL_DATA/<dataset>/`` or, failing that, in
``../shared/datasets/<dataset>/`` next to the repository (offline copies some machines
have); the project never depends on them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from real_data import real_data_dir

from matcaps.cli import main
from matcaps.data.checksums import OFFICIAL_MD5, verify_digest
from matcaps.data.fileio import digest_file
from matcaps.data.sources import source_files


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "smallnorb"])
def test_checksum_table_matches_the_real_files(name: str) -> None:
    folder = real_data_dir(name)
    for source in source_files(name):
        path = folder / source.filename
        data = gzip.decompress(path.read_bytes())
        assert hashlib.md5(data).hexdigest() == OFFICIAL_MD5[name][source.filename].content_md5, path
        assert len(data) == source.layout.max_file_bytes, path  # the official files are full size
        verify_digest(name, source, digest_file(path, source.layout.max_file_bytes))


def test_real_mnist_prepares_verified_and_a_tampered_copy_does_not(tmp_path: Path, capsys) -> None:
    """The lead's command, ``matcaps data mnist --root data --no-download``, on the real files, verified."""
    folder = real_data_dir("mnist")
    raw = tmp_path / "mnist" / "raw"
    raw.mkdir(parents=True)
    for source in source_files("mnist"):
        shutil.copy(folder / source.filename, raw / source.filename)
    assert main(["data", "mnist", "--root", str(tmp_path), "--no-download", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "train: 60000 images of 28x28" in out and "test: 10000 images" in out and "MD5 sums verified" in out
    assert json.loads((tmp_path / "mnist" / "prepared" / "manifest.json").read_text())["verified"] is True

    labels = raw / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(gzip.decompress(labels.read_bytes()))
    data[8] = (data[8] + 1) % 10  # a different, valid label
    labels.write_bytes(gzip.compress(bytes(data)))
    assert main(["data", "mnist", "--root", str(tmp_path), "--no-download", "--quiet", "--force"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{labels.name}: checksum mismatch" in lines[0] and "expected MD5 27ae3e4e" in lines[0]
    assert json.loads((tmp_path / "mnist" / "prepared" / "manifest.json").read_text())["verified"] is True  # kept

"""``matcaps data`` on fixture files, without network."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_fixtures import write_tiny_mnist, write_tiny_smallnorb
from matcaps.cli import main
from matcaps.data import is_valid_cache, prepare
from matcaps.errors import DataFormatError


def test_data_command_prepares_and_reports(tmp_path: Path, capsys) -> None:
    write_tiny_smallnorb(tmp_path, instances_per_split=1)
    assert main(["data", "smallnorb", "--root", str(tmp_path), "--no-download", "--no-verify", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"prepared in {tmp_path / 'smallnorb' / 'prepared'}" in out
    assert "train: 80 images of 96x96 uint8" in out and "test: 80 images" in out
    assert is_valid_cache("smallnorb", tmp_path)

    assert main(["data", "smallnorb", "--root", str(tmp_path), "--no-download", "--no-verify", "--quiet"]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert main(["data", "smallnorb", "--root", str(tmp_path), "--no-download", "--force", "--no-verify", "--quiet"]) == 0
    assert "already" not in capsys.readouterr().out


def test_data_command_mnist(tmp_path: Path, capsys) -> None:
    write_tiny_mnist(tmp_path, "fashion-mnist", n_train=20, n_test=10)
    assert main(["data", "fashion-mnist", "--root", str(tmp_path), "--no-download", "--no-verify", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "train: 20 images of 28x28" in out and "Ankle boot" in out


def test_missing_files_without_download_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["data", "mnist", "--root", str(tmp_path), "--no-download"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("matcaps data: error:") and "train-images-idx3-ubyte.gz" in lines[0]
    assert str(tmp_path / "mnist" / "raw") in lines[0]
    assert not (tmp_path / "mnist" / "prepared").exists()


def test_corrupted_file_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    raw = write_tiny_mnist(tmp_path, compress=False)
    (raw / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")
    assert main(["data", "mnist", "--root", str(tmp_path), "--no-download", "--no-verify", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train-labels-idx1-ubyte" in err[0] and "truncated" in err[0]


@pytest.mark.parametrize(("download", "advice"), [
    (False, "(replace the damaged file with a good copy and rerun)"),
    (True, "(replace or delete the damaged file and rerun to download it again)"),
])  # fmt: skip
def test_damaged_file_advice_fits_the_download_setting(tmp_path: Path, download: bool, advice: str, monkeypatch) -> None:
    raw = write_tiny_mnist(tmp_path, compress=False)
    (raw / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")
    monkeypatch.setattr("matcaps.data.cache.download_file", lambda *a, **k: pytest.fail("nothing is missing"))
    with pytest.raises(DataFormatError) as error:
        prepare("mnist", tmp_path, download=download, progress=False, verify=False)
    assert str(error.value).endswith(advice)
    with pytest.raises(DataFormatError) as error:  # the same file, refused by its checksum
        prepare("mnist", tmp_path, download=download, progress=False)
    assert ("rerun to download it again" in str(error.value)) == download


def test_unknown_dataset_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "cifar", "--root", str(tmp_path)])
    assert exit_info.value.code == 2

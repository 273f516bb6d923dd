"""The downloader against a local HTTP server (with and without Range support); no internet."""

from __future__ import annotations

import gzip
import http.server
import re
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from data_fixtures import write_tiny_mnist
from matcaps.data import DataConfig, load_splits, prepare
from matcaps.data.download import download_file, part_path
from matcaps.data.sources import source_files
from matcaps.errors import DownloadError

PAYLOAD = bytes(range(256)) * 400  # 102,400 bytes


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` (name → bytes); honours ``Range: bytes=N-`` if ``server.ranges``."""

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        self.server.requests.append((self.path, self.headers.get("Range")))
        data = self.server.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and self.server.ranges:
            start = int(match.group(1))
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            body = data[start:]
        else:
            self.send_response(200)
            body = data
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = self.server.cut_after
        if cut is not None:  # simulate a broken connection after `cut` bytes
            self.wfile.write(body[:cut])
            self.server.cut_after = None
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def server() -> Iterator[http.server.ThreadingHTTPServer]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.files, httpd.requests, httpd.ranges, httpd.cut_after = {"f.bin": PAYLOAD}, [], True, None
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}/"
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_plain_download(server, tmp_path: Path) -> None:
    dest = download_file(server.base + "f.bin", tmp_path / "sub" / "f.bin", progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert not part_path(dest).exists()
    assert server.requests == [("/f.bin", None)]


def test_resume_from_part_file_uses_range(server, tmp_path: Path) -> None:
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(PAYLOAD[:30000])
    download_file(server.base + "f.bin", dest, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/f.bin", "bytes=30000-")]


def test_broken_connection_keeps_part_then_resumes(server, tmp_path: Path) -> None:
    dest = tmp_path / "f.bin"
    server.cut_after = 40000
    with pytest.raises(DownloadError, match=r"f\.bin.*40000 of 102400.*rerun to resume"):
        download_file(server.base + "f.bin", dest, progress=False)
    assert not dest.exists() and part_path(dest).stat().st_size == 40000
    download_file(server.base + "f.bin", dest, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests[-1] == ("/f.bin", "bytes=40000-")


def test_server_without_range_support_restarts(server, tmp_path: Path) -> None:
    server.ranges = False
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(b"stale garbage")
    download_file(server.base + "f.bin", dest, progress=False)
    assert dest.read_bytes() == PAYLOAD  # 200 answer overwrote the .part instead of appending


def test_complete_or_overlong_part_file_starts_over(server, tmp_path: Path) -> None:
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(PAYLOAD + b"extra")
    download_file(server.base + "f.bin", dest, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/f.bin", f"bytes={len(PAYLOAD) + 5}-"), ("/f.bin", None)]


def test_http_error_and_offline_name_the_url(server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"could not download http://127\.0\.0\.1:\d+/missing\.bin: HTTP 404"):
        download_file(server.base + "missing.bin", tmp_path / "missing.bin", progress=False)
    closed = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    port = closed.server_address[1]
    closed.server_close()  # nothing listens on this port any more
    with pytest.raises(DownloadError, match=rf"could not download http://127\.0\.0\.1:{port}/f\.bin"):
        download_file(f"http://127.0.0.1:{port}/f.bin", tmp_path / "f.bin", progress=False)


def test_prepare_downloads_missing_files_from_mirrors(server, tmp_path: Path, monkeypatch) -> None:
    """prepare() fetches what is missing (falling back to the second mirror) and parses it."""
    fixture_dir = write_tiny_mnist(tmp_path / "fixture", n_train=30, n_test=10)
    server.files = {f"good/{p.name}": p.read_bytes() for p in fixture_dir.iterdir()}
    mirrors = (server.base + "dead/", server.base + "good/")
    sources = tuple(replace(source, mirrors=mirrors) for source in source_files("mnist"))
    monkeypatch.setattr("matcaps.data.cache.source_files", lambda name: sources)
    root = tmp_path / "data"
    # one file already there (decompressed), one half-downloaded
    (root / "mnist").mkdir(parents=True)
    (root / "mnist" / "t10k-labels-idx1-ubyte").write_bytes(
        gzip.decompress((fixture_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    (root / "mnist" / "raw").mkdir()
    part_path(root / "mnist" / "raw" / "train-images-idx3-ubyte.gz").write_bytes(
        (fixture_dir / "train-images-idx3-ubyte.gz").read_bytes()[:100])
    prepare("mnist", root, progress=False, verify=False)  # the fixture files are not the official ones
    splits = load_splits(DataConfig(dataset="mnist", root=root, val_size=5))
    assert len(splits.train) == 25 and len(splits.test) == 10
    fetched = [path for path, _ in server.requests if path.startswith("/good/")]
    assert sorted(fetched) == ["/good/t10k-images-idx3-ubyte.gz", "/good/train-images-idx3-ubyte.gz",
                               "/good/train-labels-idx1-ubyte.gz"]
    assert ("/good/train-images-idx3-ubyte.gz", "bytes=100-") in server.requests


def test_failed_download_explains_manual_placement(server, tmp_path: Path, monkeypatch) -> None:
    sources = (replace(source_files("mnist")[0], filename="nothing.gz", mirrors=(server.base + "dead/",)),)
    monkeypatch.setattr("matcaps.data.cache.source_files", lambda name: sources)
    with pytest.raises(DownloadError) as error:
        prepare("mnist", tmp_path, progress=False)
    message = str(error.value)
    assert "dead/nothing.gz: HTTP 404" in message
    assert str(tmp_path / "mnist" / "raw") in message and "--no-download" in message


def test_failed_downloads_list_every_file_still_missing(server, tmp_path: Path, monkeypatch) -> None:
    """Offline advice names all the files to fetch by hand, not only the one that failed first."""
    server.files = {"good/first.gz": b"one"}
    mirrors = (server.base + "good/",)
    names = {"train_images": "first.gz", "train_labels": "second.gz", "test_images": "third.gz", "test_labels": "fourth.gz"}
    sources = tuple(replace(source, filename=names[source.key], mirrors=mirrors) for source in source_files("mnist"))
    monkeypatch.setattr("matcaps.data.cache.source_files", lambda name: sources)
    (tmp_path / "mnist" / "raw").mkdir(parents=True)
    (tmp_path / "mnist" / "raw" / "third.gz").write_bytes(b"already here")
    with pytest.raises(DownloadError) as error:
        prepare("mnist", tmp_path, progress=False)
    message = str(error.value)
    assert "\n" not in message and "good/second.gz: HTTP 404" in message
    assert f"Still missing: second.gz, fourth.gz. If you are offline, fetch them from {server.base}good/" in message
    assert (tmp_path / "mnist" / "raw" / "first.gz").read_bytes() == b"one"  # downloaded before the failure


def test_progress_bar_reports_resumed_download(server, tmp_path: Path, capsys) -> None:
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(PAYLOAD[:50000])
    download_file(server.base + "f.bin", dest, progress=True)
    assert dest.read_bytes() == PAYLOAD
    assert "f.bin" in capsys.readouterr().err  # tqdm writes its bar to stderr


def test_cifar10_archive_downloads_with_resume(server, tmp_path: Path, monkeypatch) -> None:
    """``matcaps data cifar10``: the archive is fetched from the mirror, resuming a partial download."""
    import numpy as np

    from matcaps.data.cifar_format import write_cifar_archive

    rng = np.random.default_rng(0)
    archive = write_cifar_archive(tmp_path / "cifar-10-python.tar.gz", {
        "train": (rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), np.arange(5)),
        "test": (rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8), np.array([7, 8])),
    })  # fmt: skip
    server.files = {f"kriz/{archive.name}": archive.read_bytes()}
    (source,) = source_files("cifar10")
    assert source.urls == ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",)
    monkeypatch.setattr("matcaps.data.cache.source_files", lambda name: (replace(source, mirrors=(server.base + "kriz/",)),))
    root = tmp_path / "data"
    (root / "cifar10" / "raw").mkdir(parents=True)
    part_path(root / "cifar10" / "raw" / archive.name).write_bytes(archive.read_bytes()[:1000])
    prepare("cifar10", root, progress=False, verify=False)
    assert (f"/kriz/{archive.name}", "bytes=1000-") in server.requests
    assert (root / "cifar10" / "raw" / archive.name).read_bytes() == archive.read_bytes()
    assert len(load_splits(DataConfig(dataset="cifar10", root=root, validation=False)).train) == 5

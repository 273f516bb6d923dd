"""Resumable HTTP downloads with urllib (no extra dependency).

A file is downloaded into ``<name>.part`` next to its destination and renamed into place
only once complete, so a destination file is never half-written.  An interrupted
download resumes from the end of the ``.part`` file with an HTTP ``Range`` request; a
server that ignores the range (answers 200 instead of 206) makes it start over.
"""

from __future__ import annotations

import http.client
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from matcaps.errors import DownloadError

#: Suffix of partially downloaded files.
PART_SUFFIX = ".part"

#: Seconds to wait for the server before giving up on a connection or a read.
TIMEOUT_S = 60.0

#: Bytes read from the socket per step.
CHUNK_BYTES = 1 << 20

#: HTTP status codes used below.
HTTP_PARTIAL_CONTENT = 206
HTTP_RANGE_NOT_SATISFIABLE = 416

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def part_path(destination: Path) -> Path:
    """The ``.part`` file that holds the partial download of ``destination``."""
    return destination.with_name(destination.name + PART_SUFFIX)


def _request(url: str, start: int) -> urllib.request.Request:
    headers = {"User-Agent": "matcaps-data/1"}
    if start > 0:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.Request(url, headers=headers)


def download_file(url: str, destination: Path, progress: bool = True, timeout: float = TIMEOUT_S) -> Path:
    """Download ``url`` to ``destination``, resuming a previous partial download.

    Args:
        url: an ``http(s)://`` URL.
        destination: final path; its directory is created.
        progress: show a tqdm progress bar (bytes) on stderr.
        timeout: seconds per connection / read.

    Returns:
        ``destination``.

    Raises:
        DownloadError: the server could not be reached, answered with an error, or the
            connection broke (the ``.part`` file is kept so that a rerun resumes).
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(destination)
    for _attempt in range(2):  # the second attempt only after a 416 on a stale .part
        start = part.stat().st_size if part.exists() else 0
        try:
            response = urllib.request.urlopen(_request(url, start), timeout=timeout)
        except urllib.error.HTTPError as error:
            if error.code == HTTP_RANGE_NOT_SATISFIABLE and start > 0:
                part.unlink()  # stale or over-long .part: start over
                continue
            raise DownloadError(f"could not download {url}: HTTP {error.code} {error.reason}") from error
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", error)
            raise DownloadError(f"could not download {url}: {reason}") from error
        with response:
            _receive(response, url, part, start, progress)
        os.replace(part, destination)
        return destination
    raise DownloadError(f"could not download {url}: the server keeps rejecting the resume range")


def _receive(response, url: str, part: Path, start: int, progress: bool) -> None:
    """Append (206) or write (200) the body of ``response`` to ``part`` and check its length."""
    status = getattr(response, "status", 200)
    length_header = response.headers.get("Content-Length")
    length = int(length_header) if length_header is not None else None
    if status == HTTP_PARTIAL_CONTENT:
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if match is None or int(match.group(1)) != start:
            raise DownloadError(f"could not download {url}: the server answered a resume with an unexpected range")
        mode, offset = "ab", start
    else:
        mode, offset = "wb", 0  # server ignored the range: restart from scratch
    total = offset + length if length is not None else None
    received = offset
    bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
               desc=part.name[: -len(PART_SUFFIX)], disable=not progress, leave=False)
    try:
        with open(part, mode) as handle:
            while True:
                try:
                    chunk = response.read(CHUNK_BYTES)
                except (OSError, ValueError, http.client.HTTPException) as error:
                    raise DownloadError(
                        f"could not download {url}: connection broken after {received} bytes ({error}); "
                        "rerun to resume"
                    ) from error
                if not chunk:
                    break
                handle.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        bar.close()
    if total is not None and received != total:
        raise DownloadError(
            f"could not download {url}: connection closed after {received} of {total} bytes; rerun to resume"
        )

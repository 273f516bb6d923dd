"""A seeded fuzz of the raw files of tiny smallNORB and MNIST fixtures, run through ``prepare``.

Each case writes the fixture's files (each randomly gzipped or not), damages them in one
way (bit flips and integer overwrites in a header, dimensions that keep the byte count,
truncation, appended bytes, two files swapped, out-of-range or in-range values, damaged
or recompressed gzip streams, flipped pixels) and prepares the dataset.  Every outcome
must be either a one-line :class:`~matcaps.errors.MatcapsError` naming a damaged file, or
a cache identical to the clean one; never another exception, never a different cache.

Without verification only the structural checks can act, so the mutations that keep a
valid structure (pixels, valid codes, the two image files swapped) run only with
verification, against a checksum table holding the clean fixture's sums.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import matcaps.data.checksums as checksums
from data_fixtures import write_tiny_mnist, write_tiny_smallnorb
from matcaps.data import prepare
from matcaps.data.checksums import OfficialSums
from matcaps.data.sources import source_files
from matcaps.errors import MatcapsError

SEED = 13
#: Cases per dataset: structural (unverified) and with checksums.
UNVERIFIED_CASES = 150
VERIFIED_CASES = 50

#: Integers written over header fields.
INTERESTING = (0, 1, 2, 3, 4, 14, 27, 28, 29, 48, 56, 95, 96, 97, 192, 10000, 10001, 24300, 24301, 60000,
               2**31 - 1, 2**31, 2**32 - 1)  # fmt: skip


@dataclass
class Fixture:
    """The clean files (name as published → decompressed bytes) and the clean cache's content."""

    name: str
    files: dict[str, bytes]
    big_endian: bool  # IDX headers are big-endian, NORB little-endian
    arrays: dict[str, np.ndarray]
    splits: dict


def gz(data: bytes, level: int = 1, mtime: int = 0) -> bytes:
    return gzip.compress(data, compresslevel=level, mtime=mtime)


def read_cache(cache: Path) -> tuple[dict[str, np.ndarray], dict]:
    arrays = {path.name: np.load(path) for path in sorted(cache.glob("*.npy"))}
    return arrays, json.loads((cache / "manifest.json").read_text())["splits"]


@pytest.fixture(scope="module", params=["smallnorb", "mnist"])
def fixture(request, tmp_path_factory) -> Fixture:
    name = request.param
    root = tmp_path_factory.mktemp(f"clean-{name}")
    if name == "smallnorb":  # 5 stereo pairs per split, 96×96 as the real ones
        raw = write_tiny_smallnorb(root, instances_per_split=1, azimuths=(0,), elevations=(0,), compress=False)
    else:
        raw = write_tiny_mnist(root, name, n_train=12, n_test=6, compress=False)
    files = {source.filename: (raw / source.plain_name).read_bytes() for source in source_files(name)}
    arrays, splits = read_cache(prepare(name, root, download=False, progress=False, verify=False))
    return Fixture(name, files, name != "smallnorb", arrays, splits)


# ----------------------------------------------------------------------------- mutations


def header_size(fixture: Fixture, data: bytes) -> int:
    if fixture.big_endian:  # IDX: magic (its last byte is ndim), then ndim dimensions
        return 4 + 4 * data[3]
    return 8 + 4 * max(struct.unpack_from("<i", data, 4)[0], 3)


def header_dims(fixture: Fixture, data: bytes) -> tuple[int, list[int]]:
    """(offset of the first dimension, the dimensions) of a clean header."""
    if fixture.big_endian:
        return 4, list(struct.unpack_from(f">{data[3]}I", data, 4))
    ndim = struct.unpack_from("<i", data, 4)[0]
    return 8, list(struct.unpack_from(f"<{ndim}i", data, 8))


def put_int(fixture: Fixture, data: bytearray, offset: int, value: int) -> None:
    struct.pack_into(">I" if fixture.big_endian else "<I", data, offset, value & 0xFFFFFFFF)


def other_shape(dims: list[int], rng: np.random.Generator) -> list[int] | None:
    """Same number of dimensions and elements, another shape (e.g. 28×28 → 14×56), if any."""
    options = []
    for i in range(len(dims)):
        for j in range(len(dims)):
            for factor in (2, 3, 4, 7):
                if i != j and dims[j] % factor == 0:
                    new = list(dims)
                    new[i], new[j] = dims[i] * factor, dims[j] // factor
                    options.append(new)
    return options[rng.integers(len(options))] if options else None


@dataclass
class Case:
    """Files to write (published name → bytes on disk, gzipped or not) and what was done."""

    files: dict[str, tuple[bytes, bool]]
    description: str
    damaged: tuple[str, ...]  # published names of the files an error may name
    harmless: bool = False  # changes no content (must be accepted when verifying)


def make_case(fixture: Fixture, rng: np.random.Generator, verified: bool) -> Case:
    names = sorted(fixture.files)
    contents = dict(fixture.files)
    compressed = {name: bool(rng.integers(2)) for name in names}
    kinds = ["header-bit", "header-int", "reshape", "truncate", "append", "swap", "bad-value", "gz-damage",
             "gz-truncate", "gz-header"]  # fmt: skip
    if verified:
        kinds += ["pixel-bit", "valid-value", "swap-images", "recompress", "decompress"]
    kind = kinds[rng.integers(len(kinds))]
    if kind in ("bad-value", "valid-value"):
        candidates = [n for n in names if any(part in n for part in ("labels", "-cat", "-info"))]
    elif kind == "pixel-bit":
        candidates = [n for n in names if any(part in n for part in ("images", "-dat"))]
    else:
        candidates = names
    target = candidates[rng.integers(len(candidates))]
    data = bytearray(contents[target])
    head = header_size(fixture, data)
    damaged: tuple[str, ...] = (target,)
    harmless = False
    description = f"{kind} of {target}"
    if kind == "header-bit":
        bit = int(rng.integers(head * 8))
        data[bit // 8] ^= 1 << (bit % 8)
        description += f" (bit {bit})"
    elif kind == "header-int":
        offset = 4 * int(rng.integers(head // 4))
        original = struct.unpack_from(">I" if fixture.big_endian else "<I", data, offset)[0]
        choices = [*INTERESTING, original + 1, original - 1, original * 2, original // 2, int(rng.integers(2**32))]
        value = choices[rng.integers(len(choices))]
        put_int(fixture, data, offset, value)
        description += f" (offset {offset}: {original} → {value & 0xFFFFFFFF})"
    elif kind == "reshape":
        offset, dims = header_dims(fixture, data)
        new = other_shape(dims, rng)
        if new is None:  # 1-dimensional: another count instead
            new = [dims[0] * 2]
        for k, value in enumerate(new):
            put_int(fixture, data, offset + 4 * k, value)
        description += f" ({dims} → {new})"
    elif kind == "truncate":
        cut = int(rng.integers(len(data)))
        del data[cut:]
        description += f" (to {cut} bytes)"
    elif kind == "append":
        extra = int(rng.integers(1, 64)) if rng.integers(2) else len(data) - head
        data += rng.integers(0, 256, extra, dtype=np.uint8).tobytes()
        description += f" ({extra} bytes)"
    elif kind in ("swap", "swap-images"):
        if kind == "swap-images":
            pair = [n for n in names if ("-dat" in n or "images" in n)]
        else:  # any two files, except the two image files without checksums: same structure, only pixels differ
            pair = list(rng.choice(names, 2, replace=False))
            if not verified and fixture.name == "smallnorb" and all("-dat" in n for n in pair):
                pair = [n for n in names if "-cat" in n]
        first, second = pair
        contents[first], contents[second] = contents[second], contents[first]
        damaged, description = (first, second), f"{kind} of {first} and {second}"
        data = bytearray(contents[target])
    elif kind in ("bad-value", "valid-value", "pixel-bit"):
        data, detail = change_value(fixture, target, data, head, kind, rng)
        description += f" ({detail})"
    if kind not in ("swap", "swap-images"):
        contents[target] = bytes(data)
    files = {name: (gz(contents[name]) if compressed[name] else contents[name], compressed[name]) for name in names}
    if kind.startswith("gz-") or kind in ("recompress", "decompress"):
        blob = gz(contents[target])
        if kind == "gz-damage":  # deflate data or trailer
            position = int(rng.integers(10, len(blob)))
            blob = blob[:position] + bytes([blob[position] ^ (1 << int(rng.integers(8)))]) + blob[position + 1 :]
            description += f" (byte {position})"
        elif kind == "gz-truncate":
            blob = blob[: int(rng.integers(1, len(blob)))]
        elif kind == "gz-header":  # modification time / extra flags / OS: the content stays the same
            position = int(rng.choice([4, 5, 6, 7, 8, 9]))
            blob = blob[:position] + bytes([blob[position] ^ 0x55]) + blob[position + 1 :]
            harmless = True
        elif kind == "recompress":  # what mirrors do
            blob = gz(contents[target], level=9, mtime=1234567890)
            harmless = True
        files[target] = (blob, True)
        if kind == "decompress":
            files[target] = (contents[target], False)
            harmless = True
    elif contents == fixture.files:  # e.g. two identical files swapped, a value set to itself
        harmless = True
    return Case(files, description, damaged, harmless)


def change_value(fixture, target, data, head, kind, rng) -> tuple[bytearray, str]:
    """A label / info value made invalid or changed to another valid one, or a pixel bit flipped."""
    is_labels = "labels" in target or "-cat" in target
    if kind == "pixel-bit":
        bit = int(rng.integers(head * 8, len(data) * 8))
        data[bit // 8] ^= 1 << (bit % 8)
        return data, f"bit {bit}"
    if fixture.big_endian:  # one uint8 label
        position = head + int(rng.integers(len(data) - head))
        value = int(rng.integers(10, 256)) if kind == "bad-value" else (data[position] + int(rng.integers(1, 10))) % 10
        data[position] = value
        return data, f"label at byte {position} → {value}"
    values = np.frombuffer(bytes(data[head:]), "<i4").copy()
    index = int(rng.integers(values.size))
    if is_labels:
        bad = [5, 6, -1, 2**31 - 1]
        value = bad[rng.integers(len(bad))] if kind == "bad-value" else (values[index] + int(rng.integers(1, 5))) % 5
    else:
        column = index % 4
        bad = {0: [10, -1, 0 if "training" in target else 4], 1: [9, -1], 2: [1, 35, 36], 3: [6, -1]}[column]
        valid = {0: [], 1: [1, 8], 2: [2, 34], 3: [1, 5]}[column]
        if kind == "valid-value" and valid:
            value = valid[rng.integers(len(valid))]
        else:
            value = bad[rng.integers(len(bad))]
    values[index] = value
    return bytearray(bytes(data[:head]) + values.astype("<i4").tobytes()), f"int32 #{index} → {value}"


# ----------------------------------------------------------------------------- the fuzz


def write_case(case: Case, fixture: Fixture, directory: Path) -> dict[str, str]:
    """Write the files; returns published name → name on disk."""
    directory.mkdir(parents=True)
    on_disk = {}
    for name, (blob, compressed) in case.files.items():
        on_disk[name] = name if compressed else name[: -len(".gz")]
        (directory / on_disk[name]).write_bytes(blob)
    return on_disk


def run_fuzz(fixture: Fixture, tmp_path: Path, cases: int, verified: bool) -> Counter:
    outcomes: Counter = Counter()
    failures = []
    for index in range(cases):
        rng = np.random.default_rng([SEED, int(verified), index])
        case = make_case(fixture, rng, verified)
        root = tmp_path / f"case-{index}"
        on_disk = write_case(case, fixture, root / fixture.name / "raw")
        label = f"case {index} ({case.description})"
        try:
            cache = prepare(fixture.name, root, download=False, progress=False, verify=verified)
        except MatcapsError as error:
            message = str(error)
            if "\n" in message or not any(on_disk[name] in message for name in case.damaged):
                failures.append(f"{label}: the error does not name the file on one line: {message}")
            if verified and case.harmless:
                failures.append(f"{label}: a change of no content was refused: {message}")
            outcomes["refused"] += 1
        except Exception as error:  # noqa: BLE001 - exactly what the fuzz looks for
            failures.append(f"{label}: {type(error).__name__}: {error}")
        else:
            arrays, splits = read_cache(cache)
            same = splits == fixture.splits and arrays.keys() == fixture.arrays.keys() and all(
                arrays[k].dtype == fixture.arrays[k].dtype and np.array_equal(arrays[k], fixture.arrays[k]) for k in arrays
            )
            if not same:
                failures.append(f"{label}: accepted with a different cache")
            outcomes["accepted" + ("-harmless" if case.harmless else "")] += 1
        shutil.rmtree(root)
    assert not failures, f"{len(failures)} of {cases} cases failed:\n" + "\n".join(failures)
    print(fixture.name, "verified" if verified else "unverified", dict(outcomes))
    return outcomes


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch) -> None:
    """Hundreds of caches are written here: skip fsync, which only matters after a power loss."""
    monkeypatch.setattr(os, "fsync", lambda descriptor: None)


def test_fuzz_without_checksums_refuses_or_changes_nothing(fixture: Fixture, tmp_path: Path) -> None:
    outcomes = run_fuzz(fixture, tmp_path, UNVERIFIED_CASES, verified=False)
    # both outcomes occur (e.g. a flipped gzip modification time, or a NORB header's padding dimension, is harmless)
    assert outcomes["refused"] > UNVERIFIED_CASES // 2 and outcomes["accepted"] + outcomes["accepted-harmless"] > 0


def test_fuzz_with_checksums_refuses_every_change_of_content(fixture: Fixture, tmp_path: Path, monkeypatch) -> None:
    sums = {name: OfficialSums(md5(gz(data)), md5(data)) for name, data in fixture.files.items()}
    monkeypatch.setitem(checksums.OFFICIAL_MD5, fixture.name, sums)
    outcomes = run_fuzz(fixture, tmp_path, VERIFIED_CASES, verified=True)
    assert outcomes["refused"] > 0 and outcomes["accepted-harmless"] > 0 and outcomes["accepted"] == 0


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()

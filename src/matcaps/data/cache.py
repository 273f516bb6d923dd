"""Preparing a dataset once into a compact, memory-mappable cache.

``prepare(name, root)`` finds the raw files (downloading the missing ones), checks them
(:mod:`~matcaps.data.checksums`: MD5 against the official releases unless
``verify=False``; :mod:`~matcaps.data.raw_checks`: every header against the dataset's
layout and the file's real size before anything is allocated), parses them and writes::

    ROOT/<dataset>/prepared/
        manifest.json          counts, shapes, format version, source files, sizes and
                               MD5 sums, whether they were verified
        train_images.npy       (N, H, W) uint8      smallNORB: H = W = 96, MNIST: 28;
                                                     CIFAR-10: (N, 32, 32, 3), RGB last
        train_labels.npy       (N,) int64
        train_info.npy         (N, 4) int16         smallNORB only: instance, elevation,
        test_*.npy                                   azimuth, lighting (raw NORB codes)

smallNORB: both stereo images of a pair become separate, consecutive samples (rows
``2i`` and ``2i + 1`` are pair ``i``), 48,600 per split, each pair's label and info
repeated.  Images stay at 96×96 uint8 (448 MB per split, read lazily through memmaps):
the cache keeps the source pixels exactly, so resizing choices stay in the transform.

Atomicity: everything is written into a fresh ``.prepared.tmp-<pid>-<n>`` directory,
fsynced, the manifest written last, and the directory renamed to ``prepared`` as the
final step.  A cache is valid only with a readable manifest of the current
:data:`CACHE_FORMAT_VERSION` whose arrays exist with the announced shapes (and, for a
verifying prepare, whose manifest says ``"verified": true``), so a prepare
that is killed midway never leaves something that later looks valid; every later prepare
(even one that finds a valid cache, and ``--force``) first removes the leftovers of
prepares whose process is gone, and an invalid cache is rebuilt.  With several processes (DDP), prepare on one rank
and make the others wait (a barrier) before :func:`~matcaps.data.load_splits`: concurrent
prepares each build their own temporary directory and the last rename wins, which is
safe but wasteful.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from matcaps.errors import DataFormatError, DatasetNotFoundError, DownloadError
from matcaps.fsutil import fsync_directory
from matcaps.data.checksums import ChecksumError, verify_digest
from matcaps.data.cifar_format import check_cifar_meta, read_cifar_split
from matcaps.data.download import download_file
from matcaps.data.fileio import FileDigest, digest_file
from matcaps.data.idx_format import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_idx, read_idx_header
from matcaps.data.norb_format import NorbHeader, read_norb, read_norb_header, stream_norb_data
from matcaps.data.raw_checks import check_codes, check_header, check_instances
from matcaps.data.sources import (
    SMALLNORB_SPLIT_INSTANCES,
    SourceFile,
    check_dataset_name,
    dataset_dir,
    dataset_info,
    find_source,
    raw_dir,
    source_files,
)

#: Version of the cache layout; a cache with another version is rebuilt.
CACHE_FORMAT_VERSION = 1

#: Name of the cache directory below ``ROOT/<dataset>``.
CACHE_DIR_NAME = "prepared"

#: Name of the manifest inside the cache directory.
MANIFEST_NAME = "manifest.json"

#: Prefixes of the temporary directories of an unfinished prepare / an old cache.
TMP_PREFIX = ".prepared.tmp-"
OLD_PREFIX = ".prepared.old-"

#: The two splits of every dataset.
SPLIT_NAMES = ("train", "test")

#: Columns of smallNORB's ``-info`` matrix, in file order.
NORB_INFO_COLUMNS = ("instance", "elevation", "azimuth", "lighting")

#: Valid raw codes per info column (elevation 0..8 = 30..70°, azimuth 0,2,..,34 = ×10°).
NORB_INFO_CODES: dict[str, frozenset[int]] = {
    "instance": frozenset(range(10)),
    "elevation": frozenset(range(9)),
    "azimuth": frozenset(range(0, 35, 2)),
    "lighting": frozenset(range(6)),
}

#: smallNORB stores stereo pairs: two images per row of ``-dat``.
NORB_STEREO = 2


def cache_dir(name: str, root: Path | str) -> Path:
    """``ROOT/<dataset>/prepared``."""
    return dataset_dir(name, Path(root)) / CACHE_DIR_NAME


def split_file(split: str, field: str) -> str:
    """File name of one array of the cache, e.g. ``train_images.npy``."""
    return f"{split}_{field}.npy"


# ----------------------------------------------------------------------------- validity


def read_manifest(cache: Path, name: str) -> dict:
    """The manifest of the cache directory ``cache``, checked against the arrays.

    Raises:
        DatasetNotFoundError: no cache / no manifest.
        DataFormatError: unreadable manifest, other version or dataset, missing or
            wrongly shaped arrays.
    """
    manifest_path = cache / MANIFEST_NAME
    if not manifest_path.is_file():
        raise DatasetNotFoundError(f"{cache}: no prepared {name} cache (missing {MANIFEST_NAME})")
    try:
        manifest = json.loads(manifest_path.read_text())
        version, dataset, splits = manifest["format_version"], manifest["dataset"], manifest["splits"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataFormatError(f"{manifest_path}: unreadable manifest: {error}") from error
    if version != CACHE_FORMAT_VERSION:
        raise DataFormatError(f"{manifest_path}: cache format version {version}, expected {CACHE_FORMAT_VERSION}")
    if dataset != name:
        raise DataFormatError(f"{manifest_path}: holds dataset {dataset!r}, expected {name!r}")
    for split in SPLIT_NAMES:
        try:
            entry = splits[split]
            count, shape, files = int(entry["count"]), tuple(entry["image_shape"]), entry["files"]
        except (KeyError, TypeError, ValueError) as error:
            raise DataFormatError(f"{manifest_path}: incomplete entry for split {split!r}: {error}") from error
        expected = {"images": (count, *shape), "labels": (count,)}
        if "info" in files:
            expected["info"] = (count, len(NORB_INFO_COLUMNS))
        for field, want in expected.items():
            path = cache / files[field]
            try:
                array = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as error:
                raise DataFormatError(f"{path}: missing or unreadable cache array: {error}") from error
            if tuple(array.shape) != want:
                raise DataFormatError(f"{path}: shape {tuple(array.shape)}, the manifest says {want}")
    return manifest


def is_valid_cache(name: str, root: Path | str, verified: bool = False) -> bool:
    """Whether ``ROOT/<dataset>/prepared`` is a complete cache of the current version.

    With ``verified``, also whether it was built from raw files whose checksums were
    verified (a cache from ``--no-verify``, or from before verification existed, is not).
    """
    try:
        manifest = read_manifest(cache_dir(name, root), name)
    except (DataFormatError, DatasetNotFoundError):
        return False
    return not verified or manifest.get("verified") is True


# ----------------------------------------------------------------------------- sources


def locate_sources(
    name: str, root: Path, download: bool, progress: bool
) -> dict[str, Path]:
    """Path of every raw file of ``name``, downloading the missing ones if allowed.

    Raises:
        DatasetNotFoundError: files are missing and ``download`` is False.
        DownloadError: a download failed on every mirror.
    """
    found: dict[str, Path] = {}
    missing: list[SourceFile] = []
    for source in source_files(name):
        path = find_source(name, root, source)
        if path is None:
            missing.append(source)
        else:
            found[source.key] = path
    if missing and not download:
        names = ", ".join(source.filename for source in missing)
        raise DatasetNotFoundError(
            f"{name}: missing raw files {names} (or their decompressed versions) in {raw_dir(name, root)}; "
            f"place them there or rerun without --no-download"
        )
    for index, source in enumerate(missing):
        try:
            found[source.key] = _download_source(name, root, source, progress)
        except DownloadError as error:
            raise DownloadError(f"{error}. {_offline_advice(name, root, missing[index:])}") from error
    return found


def _download_source(name: str, root: Path, source: SourceFile, progress: bool) -> Path:
    """Download ``source`` from the first mirror that works; the error names every URL tried."""
    destination = raw_dir(name, root) / source.filename
    failures = []
    for url in source.urls:
        try:
            return download_file(url, destination, progress=progress)
        except DownloadError as error:
            failures.append(str(error))
    raise DownloadError("; ".join(failures))


def _offline_advice(name: str, root: Path, missing: list[SourceFile]) -> str:
    """Every raw file still missing, where to get it and where to put it."""
    mirrors = sorted({source.mirrors[0] for source in missing})
    return (
        f"Still missing: {', '.join(source.filename for source in missing)}. If you are offline, fetch "
        f"{'it' if len(missing) == 1 else 'them'} from {' or '.join(mirrors)} on another machine and place "
        f"{'it' if len(missing) == 1 else 'them'} (gzipped or decompressed) in {raw_dir(name, root)} or "
        f"{dataset_dir(name, root)}, then run `matcaps data {name} --root {root} --no-download`"
    )


def inspect_sources(
    name: str, sources: dict[str, Path], verify: bool, progress: bool, download: bool = True
) -> dict[str, FileDigest]:
    """Size and MD5 of every raw file (decompressed under the official size as a cap), verified if asked.

    Raises:
        DataFormatError: a file is unreadable, a damaged gzip stream, or larger than the official file.
        ChecksumError: ``verify`` and a file is not the official one.
    """
    specs = {source.key: source for source in source_files(name)}
    total = sum(specs[key].layout.max_file_bytes for key in sources)
    digests = {}
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"checking {name}",
              disable=not progress, leave=False) as bar:
        for key, path in sorted(sources.items()):
            digests[key] = digest_file(path, specs[key].layout.max_file_bytes, on_bytes=bar.update)
            if verify:
                verify_digest(name, specs[key], digests[key], download)
    return digests


# ----------------------------------------------------------------------------- writers


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def save_array(path: Path, array: np.ndarray) -> None:
    """Write a small array as ``.npy`` and fsync it."""
    np.save(path, array)
    _fsync_file(path)


def _checked_norb_header(path: Path, source: SourceFile, digest: FileDigest) -> NorbHeader:
    header = read_norb_header(path)
    check_header(path, source.layout, header.dtype, header.shape, header.header_bytes, digest.content_bytes)
    return header


def _prepare_norb_split(
    split: str, sources: dict[str, Path], specs: dict[str, SourceFile], digests: dict[str, FileDigest],
    out: Path, bar: tqdm,
) -> dict:
    keys = [f"{split}_{part}" for part in ("dat", "cat", "info")]
    dat, cat, info = (sources[key] for key in keys)
    # every header against the layout and the real size before reading anything
    header, cat_header, info_header = (_checked_norb_header(sources[k], specs[k], digests[k]) for k in keys)
    pairs, _, height, width = header.shape
    if cat_header.shape != (pairs,):
        raise DataFormatError(
            f"{cat}: expected {pairs} int32 labels (shape [{pairs}]) to match {dat.name}, "
            f"found {cat_header.dtype} of shape {list(cat_header.shape)}"
        )
    if info_header.shape[0] != pairs:
        raise DataFormatError(
            f"{info}: expected int32 info of shape [{pairs}, {len(NORB_INFO_COLUMNS)}] to match {dat.name}, "
            f"found {info_header.dtype} of shape {list(info_header.shape)}"
        )
    labels = read_norb(cat)
    check_codes(cat, "category", labels, frozenset(range(dataset_info("smallnorb").num_classes)))
    table = read_norb(info)
    for column, field in enumerate(NORB_INFO_COLUMNS):
        check_codes(info, field, table[:, column], NORB_INFO_CODES[field])
    check_instances(info, split, table[:, NORB_INFO_COLUMNS.index("instance")], SMALLNORB_SPLIT_INSTANCES[split])

    count = pairs * NORB_STEREO
    images_path = out / split_file(split, "images")
    with open(images_path, "wb") as handle:
        # a .npy header, then the pixels streamed straight from the (gzipped) NORB file:
        # left/right images of a pair are consecutive in both, so no reordering is needed
        np.lib.format.write_array_header_1_0(
            handle, {"descr": np.dtype(np.uint8).str, "fortran_order": False, "shape": (count, height, width)}
        )
        stream_norb_data(dat, handle.write, expected_dtype=np.uint8, expected_count=header.count, on_bytes=bar.update)
        handle.flush()
        os.fsync(handle.fileno())
    save_array(out / split_file(split, "labels"), np.repeat(labels.astype(np.int64), NORB_STEREO))
    save_array(out / split_file(split, "info"), np.repeat(table.astype(np.int16), NORB_STEREO, axis=0))
    return {
        "count": count,
        "image_shape": [height, width],
        "files": {field: split_file(split, field) for field in ("images", "labels", "info")},
        "info_columns": list(NORB_INFO_COLUMNS),
    }


def _prepare_idx_split(
    name: str, split: str, sources: dict[str, Path], specs: dict[str, SourceFile], digests: dict[str, FileDigest],
    out: Path, bar: tqdm,
) -> dict:
    counts = {}
    for key, magic in ((f"{split}_images", IDX_IMAGES_MAGIC), (f"{split}_labels", IDX_LABELS_MAGIC)):
        header = read_idx_header(sources[key], expected_magic=magic)  # checked before reading anything
        counts[key] = check_header(sources[key], specs[key].layout, header.dtype, header.shape,
                                   header.header_bytes, digests[key].content_bytes)
    images_path, labels_path = sources[f"{split}_images"], sources[f"{split}_labels"]
    if counts[f"{split}_labels"] != counts[f"{split}_images"]:
        raise DataFormatError(
            f"{labels_path}: {counts[f'{split}_labels']} labels but {images_path.name} has "
            f"{counts[f'{split}_images']} images"
        )
    images = read_idx(images_path, expected_magic=IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, expected_magic=IDX_LABELS_MAGIC)
    check_codes(labels_path, "label", labels, frozenset(range(dataset_info(name).num_classes)))
    save_array(out / split_file(split, "images"), images)
    save_array(out / split_file(split, "labels"), labels.astype(np.int64))
    bar.update(images.nbytes)
    return {
        "count": int(images.shape[0]),
        "image_shape": list(images.shape[1:]),
        "files": {field: split_file(split, field) for field in ("images", "labels")},
    }


def _prepare_cifar_split(split: str, sources: dict[str, Path], out: Path, bar: tqdm) -> dict:
    archive = sources["archive"]
    if split == SPLIT_NAMES[0]:
        check_cifar_meta(archive)
    images, labels = read_cifar_split(archive, split)  # checked batch by batch
    save_array(out / split_file(split, "images"), images)
    save_array(out / split_file(split, "labels"), labels)
    bar.update(images.nbytes)
    return {
        "count": int(images.shape[0]),
        "image_shape": list(images.shape[1:]),
        "files": {field: split_file(split, field) for field in ("images", "labels")},
    }


def _total_bytes(name: str, digests: dict[str, FileDigest]) -> int | None:
    if name != "smallnorb":
        return None
    return sum(digests[f"{split}_dat"].content_bytes for split in SPLIT_NAMES)


def _write_manifest(out: Path, manifest: dict) -> None:
    path = out / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    _fsync_file(path)


def build_cache(
    name: str, sources: dict[str, Path], out: Path, progress: bool, digests: dict[str, FileDigest], verified: bool
) -> dict:
    """Write every array and, last, the manifest of ``name`` into the empty directory ``out``.

    Args:
        name: the dataset.
        sources: path of every raw file, by key.
        out: an empty directory.
        progress: show a progress bar.
        digests: :func:`inspect_sources` of ``sources`` (real sizes and sums).
        verified: whether the sums were verified against the official ones (recorded).
    """
    specs = {source.key: source for source in source_files(name)}
    splits = {}
    with tqdm(total=_total_bytes(name, digests), unit="B", unit_scale=True, unit_divisor=1024,
              desc=f"preparing {name}", disable=not progress, leave=False) as bar:
        for split in SPLIT_NAMES:
            if name == "smallnorb":
                splits[split] = _prepare_norb_split(split, sources, specs, digests, out, bar)
            elif name == "cifar10":
                splits[split] = _prepare_cifar_split(split, sources, out, bar)
            else:
                splits[split] = _prepare_idx_split(name, split, sources, specs, digests, out, bar)
    manifest = {
        "format_version": CACHE_FORMAT_VERSION,
        "dataset": name,
        "splits": splits,
        "verified": verified,
        "sources": {
            key: {
                "file": path.name,
                "bytes": digests[key].file_bytes,
                "md5": digests[key].file_md5,
                "content_bytes": digests[key].content_bytes,
                "content_md5": digests[key].content_md5,
            }
            for key, path in sorted(sources.items())
        },
    }
    _write_manifest(out, manifest)
    fsync_directory(out)
    return manifest


# ----------------------------------------------------------------------------- prepare


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process
        return True
    return True


def remove_leftovers(parent: Path) -> None:
    """Delete temporary / old cache directories left by prepares that are no longer running."""
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        if not entry.is_dir() or not entry.name.startswith((TMP_PREFIX, OLD_PREFIX)):
            continue
        pid_text = entry.name.split("-")[-2] if entry.name.count("-") >= 2 else ""
        if pid_text.isdigit() and int(pid_text) != os.getpid() and _pid_alive(int(pid_text)):
            continue  # another prepare is running right now
        shutil.rmtree(entry, ignore_errors=True)


def _fresh_dir(parent: Path, prefix: str) -> Path:
    for n in itertools.count():
        path = parent / f"{prefix}{os.getpid()}-{n}"
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")  # pragma: no cover


def _swap_into_place(tmp: Path, cache: Path) -> None:
    """Rename ``tmp`` to ``cache``, moving an existing ``cache`` aside first."""
    old = None
    if cache.exists():
        old = _fresh_dir(cache.parent, OLD_PREFIX)
        os.replace(cache, old / CACHE_DIR_NAME)
    os.replace(tmp, cache)
    fsync_directory(cache.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare(
    name: str,
    root: Path | str,
    download: bool = True,
    force: bool = False,
    progress: bool = True,
    verify: bool = True,
) -> Path:
    """Make sure ``ROOT/<name>/prepared`` holds a valid cache and return its path.

    Args:
        name: one of :data:`~matcaps.data.DATASET_NAMES`.
        root: data root directory (``--root``).
        download: fetch missing raw files (else a missing file is an error).
        force: rebuild even if a valid cache exists.
        progress: show tqdm progress bars on stderr.
        verify: accept only the official raw files (MD5 of the file or of its
            decompressed content, :mod:`~matcaps.data.checksums`); a cache built without
            verification is rebuilt (and verified) by a verifying prepare.  False for
            your own data or test fixtures; the manifest records it.

    Returns:
        The cache directory.

    Raises:
        DatasetNotFoundError: raw files missing and ``download`` is False.
        DownloadError: a raw file could not be downloaded.
        ChecksumError: ``verify`` and a raw file is not the official one.
        DataFormatError: a raw file is corrupted or does not hold what the dataset
            must (the message names it).
    """
    check_dataset_name(name)
    root = Path(root)
    cache = cache_dir(name, root)
    remove_leftovers(cache.parent)  # of killed prepares, even when the cache is valid and kept
    if not force and is_valid_cache(name, root, verified=verify):
        return cache
    sources = locate_sources(name, root, download, progress)
    tmp: Path | None = None
    try:
        digests = inspect_sources(name, sources, verify, progress, download)
        tmp = _fresh_dir(cache.parent, TMP_PREFIX)
        build_cache(name, sources, tmp, progress, digests, verified=verify)
        _swap_into_place(tmp, cache)
    except ChecksumError:
        _remove(tmp)
        raise  # its message says what to do
    except DataFormatError as error:
        _remove(tmp)
        advice = "replace or delete the damaged file and rerun to download it again" if download else (
            "replace the damaged file with a good copy and rerun")
        raise DataFormatError(f"{error} ({advice})") from error
    except BaseException:
        _remove(tmp)
        raise
    return cache


def _remove(tmp: Path | None) -> None:
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)

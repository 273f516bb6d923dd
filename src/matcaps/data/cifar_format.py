"""Reader and writer of the official CIFAR-10 archive, ``cifar-10-python.tar.gz``.

The archive (https://www.cs.toronto.edu/~kriz/cifar.html) is a gzipped tar holding, under
``cifar-10-batches-py/``, five training batches ``data_batch_1`` … ``data_batch_5``, the test
batch ``test_batch`` and ``batches.meta``, each a Python pickle (written by Python 2) of a dict:

* a batch: ``b"data"``, a uint8 ``(10000, 3072)`` array whose rows are 32×32 images stored as
  1,024 red, then 1,024 green, then 1,024 blue values (row-major); ``b"labels"``, 10,000 ints in
  0..9 (also ``b"batch_label"`` and ``b"filenames"``, ignored here);
* the meta: ``b"label_names"``, the 10 class names.

Reading is strict: every member must be a regular file of at most :data:`MAX_MEMBER_BYTES`
(checked before it is read), the pickles are loaded by an unpickler that builds nothing but
dicts, lists, strings, numbers and numpy arrays (a pickle is a program; an archive from
elsewhere must not run code), and each batch must hold a uint8 ``(N, 3072)`` array with
``1 ≤ N ≤ 10000`` and ``N`` labels in 0..9, the meta the official class names.  Any failure
raises :class:`~matcaps.errors.DataFormatError` naming the archive (and the member).
Images come out as ``(N, 32, 32, 3)`` uint8 (height, width, RGB).
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from matcaps.errors import DataFormatError

#: Directory of the batches inside the archive.
ARCHIVE_DIR = "cifar-10-batches-py"
#: Batch members of each split.
SPLIT_BATCHES: dict[str, tuple[str, ...]] = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
#: The member holding the class names.
META_MEMBER = "batches.meta"
#: Images per official batch.
BATCH_IMAGES = 10000
#: Side and channels of an image.
IMAGE_SIDE = 32
CHANNELS = 3
#: Values per image row of ``b"data"`` (3 colour planes of 32×32).
ROW_VALUES = CHANNELS * IMAGE_SIDE * IMAGE_SIDE
#: The official class names, in label order (``batches.meta``).
CLASS_NAMES: tuple[str, ...] = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: Largest member read: an official batch pickle is about 31 MB (30,720,000 bytes of pixels).
MAX_MEMBER_BYTES = 40 * 1024 * 1024
#: What a damaged archive raises while it is read.
ARCHIVE_ERRORS: tuple[type[BaseException], ...] = (tarfile.TarError, EOFError, OSError, zlib.error)


def _numpy_reconstructors() -> dict[tuple[str, str], object]:
    """The few callables an official batch pickle refers to (numpy's array rebuilding), under every module
    name numpy has used for them."""
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy.core.multiarray._reconstruct (numpy._core in numpy 2)
    import codecs

    table: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                            ("_codecs", "encode"): codecs.encode}  # fmt: skip
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(module, "_reconstruct")] = reconstruct
    return table


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds only plain data and numpy arrays; anything else is refused."""

    allowed = _numpy_reconstructors()

    def find_class(self, module: str, name: str):  # noqa: D102
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _plain_keys(value: object) -> object:
    """Dict keys as ``str`` (Python 2 pickles give ``bytes`` keys)."""
    if isinstance(value, dict):
        return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in value.items()}
    return value


def _read_member(archive: tarfile.TarFile, path: Path, member_name: str) -> dict:
    """Unpickle ``cifar-10-batches-py/<member_name>`` into a dict with ``str`` keys."""
    name = f"{ARCHIVE_DIR}/{member_name}"
    try:
        member = archive.getmember(name)
    except KeyError:
        raise DataFormatError(f"{path}: not the CIFAR-10 archive: it has no {name}") from None
    if not member.isfile():
        raise DataFormatError(f"{path}: {name} is not a regular file in the archive")
    if member.size > MAX_MEMBER_BYTES:
        raise DataFormatError(f"{path}: {name} holds {member.size} bytes, more than the {MAX_MEMBER_BYTES} of any "
                              "official CIFAR-10 batch")
    handle = archive.extractfile(member)
    data = handle.read() if handle is not None else b""
    if len(data) != member.size:
        raise DataFormatError(f"{path}: truncated: {name} has only {len(data)} of its {member.size} bytes")
    try:
        value = _BatchUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise DataFormatError(f"{path}: {name} is not a CIFAR-10 pickle ({error})") from None
    value = _plain_keys(value)
    if not isinstance(value, dict):
        raise DataFormatError(f"{path}: {name} holds a {type(value).__name__}, not the dict of a CIFAR-10 batch")
    return value


def _checked_batch(batch: dict, path: Path, member_name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(N, 32, 32, 3)`` uint8 images and ``(N,)`` int64 labels of one batch dict, checked."""
    where = f"{path}: {ARCHIVE_DIR}/{member_name}"
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW_VALUES \
            or not 1 <= data.shape[0] <= BATCH_IMAGES:  # fmt: skip
        found = f"{data.dtype} of shape {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataFormatError(f"{where}: expected 'data' uint8 of shape (N, {ROW_VALUES}) with 1 <= N <= "
                              f"{BATCH_IMAGES}, found {found}")
    try:
        label_array = np.asarray(labels)
    except (TypeError, ValueError):
        label_array = np.asarray([])
    if label_array.shape != (data.shape[0],) or not np.issubdtype(label_array.dtype, np.integer):
        raise DataFormatError(f"{where}: expected {data.shape[0]} integer 'labels', found "
                              f"{type(labels).__name__} of shape {list(label_array.shape)}")
    bad = np.setdiff1d(np.unique(label_array), np.arange(len(CLASS_NAMES)))
    if bad.size:
        raise DataFormatError(f"{where}: invalid label values {bad[:5].tolist()}; expected values in 0..9")
    images = data.reshape(-1, CHANNELS, IMAGE_SIDE, IMAGE_SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), label_array.astype(np.int64)


def _open(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except ARCHIVE_ERRORS as error:
        raise DataFormatError(f"{path}: not a readable CIFAR-10 archive ({error})") from None


def read_cifar_split(path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of ``split`` (``train``: the five batches in order; ``test``).

    Returns:
        ``(N, 32, 32, 3)`` uint8 images and ``(N,)`` int64 labels.

    Raises:
        DataFormatError: damaged archive, missing member, or a batch that is not what it must be.
    """
    path = Path(path)
    images, labels = [], []
    try:
        with _open(path) as archive:
            for member_name in SPLIT_BATCHES[split]:
                batch_images, batch_labels = _checked_batch(_read_member(archive, path, member_name), path, member_name)
                images.append(batch_images)
                labels.append(batch_labels)
    except ARCHIVE_ERRORS as error:
        raise DataFormatError(f"{path}: damaged CIFAR-10 archive ({error})") from None
    return np.concatenate(images), np.concatenate(labels)


def check_cifar_meta(path: str | Path) -> None:
    """``batches.meta`` must name the official classes in their order."""
    path = Path(path)
    try:
        with _open(path) as archive:
            meta = _read_member(archive, path, META_MEMBER)
    except ARCHIVE_ERRORS as error:
        raise DataFormatError(f"{path}: damaged CIFAR-10 archive ({error})") from None
    names = meta.get("label_names")
    names = tuple(n.decode("latin1") if isinstance(n, bytes) else n for n in names) if isinstance(names, list) else names
    if names != CLASS_NAMES:
        raise DataFormatError(f"{path}: {ARCHIVE_DIR}/{META_MEMBER} names the classes {names!r}, expected {CLASS_NAMES}")


def encode_cifar_batch(images: np.ndarray, labels: np.ndarray, batch_label: str = "batch") -> bytes:
    """The pickle of one batch, as the official archive holds it (bytes keys, rows of colour planes).

    Args:
        images: ``(N, 32, 32, 3)`` uint8.
        labels: ``(N,)`` ints in 0..9.
        batch_label: The batch's ``b"batch_label"``.
    """
    data = np.ascontiguousarray(np.asarray(images, dtype=np.uint8).transpose(0, 3, 1, 2)).reshape(len(images), -1)
    batch = {b"batch_label": batch_label.encode(), b"labels": [int(label) for label in labels], b"data": data,
             b"filenames": [f"image_{i:05d}.png".encode() for i in range(len(images))]}  # fmt: skip
    return pickle.dumps(batch, protocol=2)


def write_cifar_archive(path: str | Path, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                        members: dict[str, bytes] | None = None) -> Path:  # fmt: skip
    """Write a CIFAR-10 archive: ``splits["train"]`` is cut into five batches, ``splits["test"]`` is the test batch.

    Args:
        path: The archive; gzipped when its name ends in ``.gz``.
        splits: ``{"train": (images, labels), "test": (images, labels)}``, images ``(N, 32, 32, 3)`` uint8.
        members: Extra or replacement members by name (e.g. a damaged batch), raw bytes.
    """
    path = Path(path)
    contents: dict[str, bytes] = {META_MEMBER: pickle.dumps({b"label_names": [n.encode() for n in CLASS_NAMES],
                                                             b"num_cases_per_batch": BATCH_IMAGES}, protocol=2)}  # fmt: skip
    train_images, train_labels = splits["train"]
    for index, rows in enumerate(np.array_split(np.arange(len(train_labels)), len(SPLIT_BATCHES["train"]))):
        contents[SPLIT_BATCHES["train"][index]] = encode_cifar_batch(train_images[rows], train_labels[rows],
                                                                      f"training batch {index + 1} of 5")  # fmt: skip
    contents["test_batch"] = encode_cifar_batch(*splits["test"], "testing batch 1 of 1")
    contents.update(members or {})
    with tarfile.open(path, "w:gz" if path.suffix == ".gz" else "w") as archive:
        for name, data in contents.items():
            info = tarfile.TarInfo(f"{ARCHIVE_DIR}/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path

"""MD5 sums of the official raw files, and their verification before a cache is prepared.

Every raw file is checked against :data:`OFFICIAL_MD5`: the file is accepted when it is
the published ``.gz`` (its own MD5 matches) or when its **decompressed content** matches,
so already-decompressed files and mirrors that recompress (a different ``.gz``, the same
bytes inside) pass too.  Anything else (a damaged download, a file altered in place, the
training and test files swapped, a user's own data, the test fixtures) is refused with
one line naming the file, the expected and the found sum, unless verification is turned
off (``matcaps data --no-verify``, ``prepare(..., verify=False)``), which the cache's
manifest then records.

MD5 is what the sources below give; it detects damage and mix-ups, not a deliberate
collision (no SHA-256 of these files is published by their authors).

Sources of the sums:

* MNIST ``.gz``: torchvision's ``MNIST.resources`` (pytorch/vision,
  ``torchvision/datasets/mnist.py``; LeCun's page publishes sizes, not sums).
  Decompressed: not published by LeCun; the sums used by third-party loaders (e.g.
  secml's MNIST loader), which are also those of the copies in this project's shared
  datasets (whose README lists them as equal to the published ones).
* Fashion-MNIST ``.gz``: Zalando's README (zalandoresearch/fashion-mnist, table "Get the
  Data"), the same in torchvision's ``FashionMNIST.resources``.  Decompressed: from
  third-party FashionMNIST loaders (``raw_data`` tables) and equal to the shared copies.
* smallNORB: NYU's page publishes no sums that we could find.  The ``.gz`` and
  decompressed sums are the ``md5_gz`` / ``md5`` table of a torchvision-style smallNORB
  class with four stereo modes (apparently the wrapper proposed in pytorch/vision pull
  request #492, copied into several repositories), identical in an independent loader
  (JakobHavtorn/hvae-oodd, ``oodd/datasets/small_norb.py``); the ``.gz`` sums again in
  nmichlo/disent (``disent/dataset/data/_groundtruth__norb.py``).  They could **not** be
  checked against real files here (no copy of smallNORB was available); both ``-cat``
  files decompress to the same bytes (same label order), hence the same sum.
* CIFAR-10 ``cifar-10-python.tar.gz``: the MD5 published on the CIFAR page
  (https://www.cs.toronto.edu/~kriz/cifar.html), also in torchvision's ``CIFAR10.tgz_md5`` and
  in many download scripts.  No sum of the decompressed tar is published, so only the
  original ``.gz`` passes verification.
"""

from __future__ import annotations

from dataclasses import dataclass

from matcaps.data.fileio import FileDigest
from matcaps.data.sources import SMALLNORB_TEST_STEM, SMALLNORB_TRAIN_STEM, SourceFile, check_dataset_name
from matcaps.errors import DataFormatError


class ChecksumError(DataFormatError):
    """A raw file is not the official one (its MD5 sum differs from the published sum)."""


@dataclass(frozen=True)
class OfficialSums:
    """The published MD5 sums (hex) of one raw file.

    Attributes:
        gz_md5: MD5 of the published ``.gz`` file.
        content_md5: MD5 of its decompressed content (None where none is published).
    """

    gz_md5: str
    content_md5: str | None


def _idx_table(gz: tuple[str, str, str, str], content: tuple[str, str, str, str]) -> dict[str, OfficialSums]:
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")  # fmt: skip
    return {name: OfficialSums(g, c) for name, g, c in zip(names, gz, content)}


def _norb_table(sums: dict[tuple[str, str], tuple[str, str]]) -> dict[str, OfficialSums]:
    return {f"{stem}-{part}.mat.gz": OfficialSums(gz, plain) for (stem, part), (gz, plain) in sums.items()}


#: Dataset → published file name → sums (sources in the module docstring).
OFFICIAL_MD5: dict[str, dict[str, OfficialSums]] = {
    "mnist": _idx_table(
        gz=("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
            "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"),
        content=("6bbc9ace898e44ae57da46a324031adb", "a25bea736e30d166cdddb491f175f624",
                 "2646ac647ad5339dbf082846283269ea", "27ae3e4e09519cfbb04c329615203637"),
    ),  # fmt: skip
    "fashion-mnist": _idx_table(
        gz=("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
            "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"),
        content=("f4a8712d7a061bf5bd6d2ca38dc4d50a", "9018921c3c673c538a1fc5bad174d6f9",
                 "8181f5470baa50b63fa0f6fddb340f0a", "15d484375f8d13e6eb1aabb0c3f46965"),
    ),  # fmt: skip
    "smallnorb": _norb_table({
        (SMALLNORB_TRAIN_STEM, "dat"): ("66054832f9accfe74a0f4c36a75bc0a2", "8138a0902307b32dfa0025a36dfa45ec"),
        (SMALLNORB_TRAIN_STEM, "cat"): ("23c8b86101fbf0904a000b43d3ed2fd9", "fd5120d3f770ad57ebe620eb61a0b633"),
        (SMALLNORB_TRAIN_STEM, "info"): ("51dee1210a742582ff607dfd94e332e3", "19faee774120001fc7e17980d6960451"),
        (SMALLNORB_TEST_STEM, "dat"): ("e4ad715691ed5a3a5f138751a4ceb071", "e9920b7f7b2869a8f1a12e945b2c166c"),
        (SMALLNORB_TEST_STEM, "cat"): ("5aa791cd7e6016cf957ce9bdb93b8603", "fd5120d3f770ad57ebe620eb61a0b633"),
        (SMALLNORB_TEST_STEM, "info"): ("a9454f3864d7fd4bb3ea7fc3eb84924e", "7c5b871cc69dcadec1bf6a18141f5edc"),
    }),
    "cifar10": {"cifar-10-python.tar.gz": OfficialSums("c58f30108f718f92721af3b95e74349a", None)},
}

#: What to do about a file that fails verification (the end of every :class:`ChecksumError`).
def _advice(download: bool) -> str:
    """What to do about a file that is not the official one (offline, downloading is no remedy)."""
    remedy = "delete it and rerun to download it again" if download else "replace it with a good copy and rerun"
    return (f"the file is damaged, altered, swapped with another or not the official release: {remedy}, or, for "
            "your own data, pass --no-verify (verify=False)")


def official_sums(name: str, source: SourceFile) -> OfficialSums | None:
    """The published sums of ``source`` of dataset ``name``, or None if none are known."""
    return OFFICIAL_MD5.get(check_dataset_name(name), {}).get(source.filename)


def verify_digest(name: str, source: SourceFile, digest: FileDigest, download: bool = True) -> None:
    """Accept ``digest`` if it is the official file, gzipped as published or not.

    ``download`` says whether a missing file would be downloaded, which decides the advice.

    Raises:
        ChecksumError: no published sum, or neither the file's MD5 nor its decompressed
            content's MD5 is the published one; one line naming the file, the expected
            and the found sums, and what to do.
    """
    sums = official_sums(name, source)
    if sums is None:
        raise ChecksumError(
            f"{digest.path}: no published checksum is known for {source.filename} of {name}; {_advice(download)}"
        )
    if digest.gzipped and digest.file_md5 == sums.gz_md5:
        return
    if sums.content_md5 is not None and digest.content_md5 == sums.content_md5:
        return
    if sums.content_md5 is None:  # only the published .gz can be recognised
        found = f"MD5 {digest.file_md5}" + ("" if digest.gzipped else " (a decompressed copy, which cannot be checked)")
        raise ChecksumError(
            f"{digest.path}: checksum mismatch for {source.filename} of {name}: expected the published .gz with MD5 "
            f"{sums.gz_md5}, found {found}; {_advice(download)}"
        )
    found = f"MD5 {digest.content_md5}" + (f" once decompressed (.gz MD5 {digest.file_md5})" if digest.gzipped else "")
    raise ChecksumError(
        f"{digest.path}: checksum mismatch for {source.filename} of {name}: expected MD5 {sums.content_md5} "
        f"decompressed (official .gz: {sums.gz_md5}), found {found}; {_advice(download)}"
    )

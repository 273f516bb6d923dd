"""Datasets of matcaps: download, parse, prepare once into a compact cache, and load.

Public API::

    from matcaps.data import (DATASET_NAMES, DatasetInfo, dataset_info,
                              DataConfig, DataSplits, prepare, load_splits)

    prepare("smallnorb", "data")                 # download + verify + parse + cache (once)
    splits = load_splits(DataConfig(dataset="smallnorb", root=Path("data")))
    image, label = splits.train[0]               # (1, 32, 32) float32, int64 scalar

Modules: :mod:`~matcaps.data.norb_format` and :mod:`~matcaps.data.idx_format` (binary
file formats), :mod:`~matcaps.data.download` (resumable downloads),
:mod:`~matcaps.data.sources` (what each dataset is and what its files must hold),
:mod:`~matcaps.data.checksums` (MD5 sums of the official files),
:mod:`~matcaps.data.raw_checks` (headers, shapes and values checked before use),
:mod:`~matcaps.data.cache` (atomic preparation), :mod:`~matcaps.data.transforms` (IBM's augmentation),
:mod:`~matcaps.data.datasets` (torch datasets), :mod:`~matcaps.data.splits`
(train / validation / test and the novel-viewpoint splits), :mod:`~matcaps.data.loader_workers`
(data-loader workers that leave Ctrl-C and SIGTERM to the training).
"""

from matcaps.data.cache import cache_dir, is_valid_cache, prepare
from matcaps.data.datasets import CachedImageDataset
from matcaps.data.sources import DATASET_NAMES, DatasetInfo, dataset_info
from matcaps.data.splits import DataConfig, DataSplits, load_splits

__all__ = [
    "DATASET_NAMES",
    "CachedImageDataset",
    "DataConfig",
    "DataSplits",
    "DatasetInfo",
    "cache_dir",
    "dataset_info",
    "is_valid_cache",
    "load_splits",
    "prepare",
]

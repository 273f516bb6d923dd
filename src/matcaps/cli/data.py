"""``matcaps data NAME --root DIR [--no-download] [--force] [--no-verify]``: download and prepare a dataset.

Downloads the missing raw files (resuming partial downloads), verifies them against the
MD5 sums of the official releases (unless ``--no-verify``), parses them and writes the
compact cache ``DIR/NAME/prepared`` once; prints where the cache is, how many images
each split holds and whether the raw files were verified.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matcaps.data import DATASET_NAMES, dataset_info, prepare
from matcaps.data.cache import MANIFEST_NAME, is_valid_cache
from matcaps.data.sources import raw_dir


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``data`` sub-command."""
    parser = subparsers.add_parser(
        "data",
        help="download and prepare a dataset (smallnorb, mnist, fashion-mnist, cifar10)",
        description=(
            "Download the raw files of a dataset (unless they are already in --root), parse them and "
            "write a compact uint8 cache to ROOT/NAME/prepared, used by `matcaps train` and `matcaps test`. "
            "Raw files are looked for, gzipped or not, in ROOT/NAME/raw, ROOT/NAME and (smallnorb) ROOT, and must "
            "be the official releases (MD5 of the .gz or of its decompressed content) unless --no-verify."
        ),
    )
    parser.add_argument("name", choices=DATASET_NAMES, help="dataset to prepare")
    parser.add_argument("--root", type=Path, default=Path("data"), help="data directory (default: data)")
    parser.add_argument("--no-download", dest="download", action="store_false",
                        help="never access the network; fail if a raw file is missing")
    parser.add_argument("--force", action="store_true", help="rebuild the cache even if it is valid")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="accept raw files that are not the official releases (your own data, test fixtures); "
                             "their structure is still checked, and the manifest records that they were not verified")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Prepare the dataset and print a summary; returns 0."""
    already = not args.force and is_valid_cache(args.name, args.root, verified=args.verify)
    cache = prepare(args.name, args.root, download=args.download, force=args.force, progress=not args.quiet,
                    verify=args.verify)
    manifest = json.loads((cache / MANIFEST_NAME).read_text())
    info = dataset_info(args.name)
    state = "already prepared" if already else "prepared"
    print(f"{args.name}: {state} in {cache} (raw files: {raw_dir(args.name, args.root)})")
    for split, entry in manifest["splits"].items():
        print(f"  {split}: {entry['count']} images of {'x'.join(map(str, entry['image_shape']))} uint8")
    print(f"  classes ({info.num_classes}): {', '.join(info.class_names)}; "
          f"network input {info.channels}x{info.image_size}x{info.image_size}")
    if manifest.get("verified") is True:
        print("  raw files: MD5 sums verified against the official release")
    else:
        print("  raw files: NOT verified against the official release (prepared with --no-verify)")
    return 0

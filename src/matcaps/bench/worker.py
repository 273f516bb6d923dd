"""Entry point of a worker process: ``python -m matcaps.bench.worker CONFIG_JSON IMPLEMENTATION PHASE RESULT_PATH``.

The parent (:mod:`matcaps.bench.runner`) starts one fresh worker per implementation and
phase so that each has its own peak memory and its own allocator state (and, with
``--batch-size max``, one more per implementation for the search: phase ``fit``).  The allocator regime is
applied first, before PyTorch is imported and anything large is allocated; the result is
written as JSON to ``RESULT_PATH``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from matcaps.allocator import apply_allocator  # ctypes only: nothing is allocated yet

#: The pseudo-phase that searches the largest batch (``--batch-size max``) instead of timing.
FIT_PHASE = "fit"


def main(argv: Sequence[str]) -> int:
    """Run one measurement; returns the exit code."""
    if len(argv) != 4:
        print(f"usage: python -m matcaps.bench.worker CONFIG_JSON IMPLEMENTATION PHASE RESULT_PATH, got {list(argv)}", file=sys.stderr)
        return 2
    config_json, implementation, phase, result_path = argv
    allocator = apply_allocator(json.loads(config_json)["allocator"])

    from matcaps.bench.config import BenchConfig  # imports torch
    from matcaps.bench.fit import find_largest_batch
    from matcaps.bench.measure import measure_phase

    config = BenchConfig.from_dict(json.loads(config_json))
    if phase == FIT_PHASE:
        result = find_largest_batch(config, implementation)
    else:
        result = measure_phase(config, implementation, phase, allocator)
    with open(result_path, "w", encoding="utf-8") as file:
        json.dump(result, file)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The largest batch whose training step fits in a GPU's memory (``matcaps bench --batch-size max``).

:func:`largest_fitting_batch` is the search: it doubles the batch from a start until a step runs
out of memory, then bisects between the last size that fitted and the first that did not.
:func:`training_step_fits` is the probe a bench worker runs on a CUDA device: two training steps
(the first allocates Adam's state, the second shows the steady state) at one batch size, ``True``
unless CUDA reports an out-of-memory error.  The search runs in its own worker process per
implementation (see :mod:`matcaps.bench.runner`), so the memory a failed probe fragments never
reaches the timed processes.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from matcaps.bench.config import BenchConfig

#: First batch size tried (the GPU bench's usual batch).
SEARCH_START = 64
#: The search never tries more images per step than this (a guard against a probe that never fails).
SEARCH_LIMIT = 1 << 16
#: Bisection steps between the last fitting and the first failing power of two (3: within 1/8 of it).
BISECT_STEPS = 3
#: Bisection points are rounded down to a multiple of this (keeps the batch friendly to the kernels).
BATCH_MULTIPLE = 8
#: Training steps per probe: the first allocates the optimiser state, the second is the steady state.
PROBE_STEPS = 2


def largest_fitting_batch(
    fits: Callable[[int], bool],
    start: int = SEARCH_START,
    limit: int = SEARCH_LIMIT,
    bisect_steps: int = BISECT_STEPS,
    multiple: int = BATCH_MULTIPLE,
) -> tuple[int | None, list[tuple[int, bool]]]:
    """The largest batch size ``fits`` accepts, searched by doubling then bisection.

    Assumes that fitting is monotone (a batch that fits means every smaller one does).

    Args:
        fits: ``fits(batch) -> bool``, whether a step at ``batch`` images runs.
        start: The first size tried.
        limit: The largest size tried; returned if it fits.
        bisect_steps: Bisection steps after the doubling phase.
        multiple: Bisection points are rounded down to multiples of this (doubling keeps ``start``'s factors).

    Returns:
        ``(largest, tried)``: the largest size that fitted (None if not even ``start`` did) and
        every ``(size, fitted)`` probe in the order tried.
    """
    if start < 1 or limit < start or multiple < 1:
        raise ValueError(f"need 1 <= start <= limit and multiple >= 1, got start={start}, limit={limit}, multiple={multiple}")
    tried: list[tuple[int, bool]] = []

    def probe(size: int) -> bool:
        fitted = bool(fits(size))
        tried.append((size, fitted))
        return fitted

    if not probe(start):
        return None, tried
    good, bad = start, None
    while bad is None and good < limit:
        size = min(2 * good, limit)
        if probe(size):
            good = size
        else:
            bad = size
    for _ in range(bisect_steps if bad is not None else 0):
        middle = (good + bad) // 2 // multiple * multiple
        if middle <= good:
            break
        if probe(middle):
            good = middle
        else:
            bad = middle
    return good, tried


def training_step_fits(make_step: Callable[[int], Callable[[], object]], batch_size: int) -> bool:
    """Whether :data:`PROBE_STEPS` training steps at ``batch_size`` run without a CUDA out-of-memory error.

    Args:
        make_step: ``make_step(batch) -> step``; builds the model, optimiser and data at ``batch``
            and returns the training step (whose memory is freed when it is dropped).
        batch_size: Images per step.
    """
    step = None
    out_of_memory = False
    try:
        step = make_step(batch_size)
        for _ in range(PROBE_STEPS):
            step()
    except torch.cuda.OutOfMemoryError:
        out_of_memory = True  # leave the except block first: its traceback holds the step's tensors
    del step
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return not out_of_memory


def find_largest_batch(config: "BenchConfig", implementation: str) -> dict[str, Any]:
    """The largest training batch of ``config``'s network with ``implementation`` on its (CUDA) device.

    Returns:
        ``{"batch_size": largest or None, "tried": [[size, fitted], ...]}``.
    """
    from matcaps.bench.workload import make_workload

    device = torch.device(config.device)
    model_config = config.model_config(implementation)

    def make_step(batch: int) -> Callable[[], object]:
        return make_workload(model_config, batch, device, config.dtype, config.seed, config.compile).train_step

    def fits(batch: int) -> bool:
        start = time.perf_counter()
        fitted = training_step_fits(make_step, batch)
        print(f"  --batch-size max, {implementation}: {batch} images per step {'fit' if fitted else 'do not fit'} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
        return fitted

    largest, tried = largest_fitting_batch(fits)
    return {"batch_size": largest, "tried": [list(entry) for entry in tried]}

"""What a benchmark run measures: one explicit, validated configuration object.

:class:`BenchConfig` gathers every option of ``matcaps bench``; it is checked once, when
it is built, so that a bad option is reported as one line naming the option (a
:class:`~matcaps.errors.ConfigError`) before any process is started.  It round-trips
through a plain dict (:meth:`BenchConfig.to_dict` / :meth:`BenchConfig.from_dict`) because
the parent process hands it to a fresh worker process per implementation as JSON.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from matcaps.errors import ConfigError
from matcaps.models import PRESETS, CapsNetConfig, preset
from matcaps.models.options import apply_model_options
from matcaps.routing import MAX_ITERATIONS, ROUTING_IMPLEMENTATIONS

#: Routing iterations the bench accepts (``--iters``): Hinton et al. use 3, Gritzman 2.
ITERATION_CHOICES: tuple[int, ...] = tuple(range(1, MAX_ITERATIONS + 1))
#: Devices the bench can run on, as ``--device`` accepts them (``cuda:N`` is the N-th GPU; ``auto``
#: is ``cuda`` when a GPU is visible, else ``cpu``), like ``matcaps train --device``.
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "cuda:N")
#: The device names matching :data:`DEVICES`.
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
#: ``fp32`` runs everything in float32; ``bf16`` runs the model under bfloat16 autocast
#: (the routing itself always computes in float32, see :mod:`matcaps.routing.em`).
DTYPES: tuple[str, ...] = ("fp32", "bf16")
#: ``default`` leaves the C allocator alone; ``tuned`` applies the glibc settings of
#: :mod:`matcaps.bench.allocator` at the start of each worker process.
ALLOCATORS: tuple[str, ...] = ("default", "tuned")
#: Default number of timed steps, warm-up steps and profiler table rows.
DEFAULT_STEPS = 5
DEFAULT_WARMUP = 2
DEFAULT_PROFILE_ROWS = 20
#: Seed of the random weights, images and labels (the same for every implementation).
DEFAULT_SEED = 0
#: Routing fields the bench sets from its own flags, so ``--set`` may not.
BENCH_ROUTING_FLAGS: dict[str, str] = {"iterations": "--iters", "implementation": "--routing-impl"}
#: ``--batch-size`` value asking for the largest training batch that fits (CUDA only; see :mod:`matcaps.bench.fit`).
LARGEST_BATCH = "max"


@dataclass(frozen=True)
class BenchConfig:
    """Every option of one benchmark run.

    Attributes:
        model: Name of a model preset (``smallnorb``, ``hinton-large``, ``mnist``).
        model_options: Changes to the preset's :class:`CapsNetConfig` fields (``--set KEY=VALUE``,
            the syntax of ``matcaps train --model-option``: ``routing`` and ``layer_routing`` are
            nested tables), e.g. a smaller network for quick checks.  The routing's iterations
            and implementation come from ``iterations`` and ``implementations``.
        batch_size: Images per step ``N``, or :data:`LARGEST_BATCH` (``"max"``): for each
            implementation the largest training batch that fits in the GPU's memory, found by
            :func:`matcaps.bench.fit.find_largest_batch` (CUDA only).
        iterations: EM-routing iterations (1 to 3).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (:func:`~matcaps.bench.runner.run_bench`
            resolves ``auto`` before measuring).
        dtype: ``fp32`` or ``bf16`` (autocast).
        threads: Intra-op threads of each worker (``torch.set_num_threads``); None keeps
            PyTorch's default (one per core).
        implementations: Routing implementations to measure, each in its own process.
        warmup: Untimed steps before the timed ones (per phase).
        steps: Timed steps per phase (train and inference).
        compile: Wrap the model in ``torch.compile``.
        allocator: ``default`` or ``tuned`` (see :mod:`matcaps.bench.allocator`).
        json_path: Where to write the JSON report, or None.
        profile: Print a ``torch.profiler`` breakdown of one train and one inference step.
        profile_rows: Rows of the profiler's operator table.
        trace_path: Chrome trace of the profiled train step (``-<impl>`` is inserted before
            the extension when several implementations are measured), or None.
        seed: Seed of the weights and the random input.
        verify: Before timing, check on a small batch that every implementation gives the
            same outputs and gradients (only when several are measured).
    """

    model: str = "smallnorb"
    model_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int | str = 32
    iterations: int = 2
    device: str = "cpu"
    dtype: str = "fp32"
    threads: int | None = None
    implementations: tuple[str, ...] = (ROUTING_IMPLEMENTATIONS[0],)
    warmup: int = DEFAULT_WARMUP
    steps: int = DEFAULT_STEPS
    compile: bool = False
    allocator: str = "default"
    json_path: str | None = None
    profile: bool = False
    profile_rows: int = DEFAULT_PROFILE_ROWS
    trace_path: str | None = None
    seed: int = DEFAULT_SEED
    verify: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "implementations", tuple(self.implementations))
        object.__setattr__(self, "model_options", dict(self.model_options))
        if self.model not in PRESETS:
            raise ConfigError(f"--model: unknown model {self.model!r}; choose one of {', '.join(PRESETS)}")
        if self.iterations not in ITERATION_CHOICES:
            raise ConfigError(
                f"--iters: routing iterations must be one of {', '.join(map(str, ITERATION_CHOICES))}, "
                f"got {self.iterations!r}"
            )
        if self.batch_size != LARGEST_BATCH:
            _check_positive("--batch-size", self.batch_size)
        if self.batch_size == LARGEST_BATCH and self.device == "cpu":
            raise ConfigError(f"--batch-size {LARGEST_BATCH}: needs a CUDA device (--device cuda); on a CPU memory "
                              "runs out by swapping, not with an error the search can catch")
        _check_positive("--steps", self.steps)
        _check_positive("--profile-rows", self.profile_rows)
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ConfigError(f"--warmup: must be a non-negative integer, got {self.warmup!r}")
        if self.threads is not None:
            _check_positive("--threads", self.threads)
        if not isinstance(self.device, str) or DEVICE_PATTERN.fullmatch(self.device) is None:
            raise ConfigError(f"--device: unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        for option, value, choices in (
            ("--precision", self.dtype, DTYPES),
            ("--allocator", self.allocator, ALLOCATORS),
        ):
            if value not in choices:
                raise ConfigError(f"{option}: unknown value {value!r}; choose one of {', '.join(choices)}")
        if not self.implementations:
            raise ConfigError("--routing-impl: give at least one routing implementation")
        for name in self.implementations:
            if name not in ROUTING_IMPLEMENTATIONS:
                raise ConfigError(
                    f"--routing-impl: unknown routing implementation {name!r}; choose from {', '.join(ROUTING_IMPLEMENTATIONS)}"
                )
        if len(set(self.implementations)) != len(self.implementations):
            raise ConfigError(f"--routing-impl: an implementation is listed twice: {' '.join(self.implementations)}")
        self.model_config()  # validates --set against the preset

    def model_config(self, implementation: str | None = None) -> CapsNetConfig:
        """The network to measure, with the bench's routing iterations and ``implementation``."""
        routing = self.model_options.get("routing")
        for name, flag in BENCH_ROUTING_FLAGS.items():
            if isinstance(routing, Mapping) and name in routing:
                raise ConfigError(f"--set routing.{name}: the bench sets it with {flag}")
        try:
            return apply_model_options(preset(self.model), self.model_options, iterations=self.iterations,
                                       implementation=implementation)
        except ConfigError as error:
            raise ConfigError(f"--set: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        values = dataclasses.asdict(self)
        values["implementations"] = list(self.implementations)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "BenchConfig":
        """Inverse of :meth:`to_dict`."""
        return cls(**values)


def _check_positive(option: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{option}: must be a positive integer, got {value!r}")


def parse_batch_size(text: str) -> int | str:
    """``--batch-size``: a positive integer (checked by :class:`BenchConfig`) or :data:`LARGEST_BATCH`."""
    if text.strip().lower() == LARGEST_BATCH:
        return LARGEST_BATCH
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--batch-size: expected a positive integer or {LARGEST_BATCH!r}, got {text!r}") from None

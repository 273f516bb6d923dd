"""What a training run reports while it trains: scalars, log lines, histograms, gradient norms.

:class:`TrainingMonitor` watches the steps of a :class:`~matcaps.train.Trainer` and writes, on
the main process only:

* every ``log_every`` steps, the training scalars summed over all processes (loss, accuracy,
  learning rate, margin, images/s, step time, peak memory, skipped steps; the mean and largest
  global gradient norm of the window's steps, before clipping, and with ``--clip-grad-norm`` the
  share of them that were clipped) and every parameter's gradient norm at that step (phase
  ``grad_norm``) to ``metrics.jsonl`` and TensorBoard, flushed at once; without progress bars,
  also a printed line;
* every ``histogram_every`` steps, histograms of each capsule layer's activations, of ``β_a`` and
  ``β_v``, of the gradient norms, and of each routed layer's activations and ``ln σ²`` **per EM
  iteration**, traced on the first :data:`TRACE_SAMPLES` images of the batch.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from matcaps.distributed import DistributedContext, all_reduce_sum
from matcaps.train.config import TrainConfig
from matcaps.train.metrics import MetricsWriter, NullWriter
from matcaps.train.state import TrainState

#: Bytes per mebibyte, for the memory scalars.
MIB = 1024**2
#: ``ru_maxrss`` is in KiB on Linux and in bytes on macOS.
RUSAGE_UNIT = 1 if sys.platform == "darwin" else 1024
#: Samples of the batch whose routing is traced, iteration by iteration, for the histograms.
TRACE_SAMPLES = 8


def global_gradient_norm(gradients: list[Tensor]) -> Tensor:
    """The L2 norm of all ``gradients`` taken as one vector (what ``clip_grad_norm_`` measures); 0-d tensor."""
    if not gradients:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in gradients]))


def peak_memory_mib(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RUSAGE_UNIT / MIB


def format_duration(seconds: float) -> str:
    """``1h02m``, ``12m05s`` or ``42s``: a duration for log lines."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@dataclass
class StepWindow:
    """Running sums of this process's training scalars between two log steps."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)
    gradient_norms: list[Tensor] = field(default_factory=list)

    def add(self, loss: float, correct: int, count: int, applied: bool) -> None:
        """Count one step (a skipped step counts for the speed, not for loss and accuracy)."""
        self.steps += 1
        if applied:
            self.loss_sum += loss * count
            self.correct += correct
            self.count += count

    def images_per_s(self, global_batch: int) -> float:
        return self.steps * global_batch / max(time.perf_counter() - self.started, 1e-9)

    def gradient_scalars(self, clip: float) -> dict[str, float]:
        """``grad_norm_mean`` / ``grad_norm_max`` of the applied steps, and ``clipped_fraction`` if ``clip > 0``.

        Kept as device tensors until here, so that reading them costs one synchronisation per window.
        """
        if not self.gradient_norms:
            return {}
        norms = torch.stack(self.gradient_norms).double().cpu()
        scalars = {"grad_norm_mean": float(norms.mean()), "grad_norm_max": float(norms.max())}
        if clip > 0:
            scalars["clipped_fraction"] = float((norms > clip).double().mean())
        return scalars


class TrainingMonitor:
    """Scalars, log lines and histograms of one training run (see the module docstring).

    Args:
        model: The network being trained (unwrapped); capsule networks get per-layer hooks.
        config: The run's options (``log_every``, ``histogram_every``, ``progress``, ``compile``).
        context: The process group; only the main process writes.
        log: Prints one line (on the main process).
    """

    def __init__(self, model: nn.Module, config: TrainConfig, context: DistributedContext,
                 log: Callable[[str], None]) -> None:  # fmt: skip
        self.model = model
        self.config = config
        self.context = context
        self.log = log
        self.writer: NullWriter = NullWriter()
        self.window = StepWindow()
        self.last_train_loss: float | None = None
        self._capturing = False
        self._norms_due = False
        self._captured: dict[str, Tensor] = {}
        self._routing_inputs: dict[str, tuple[Tensor, Tensor]] = {}
        self._gradient_norms: dict[str, float] = {}
        capsule_layers = getattr(model, "capsule_layers", None)
        if not config.compile and capsule_layers is not None:  # hooks do not survive torch.compile
            for name, layer in capsule_layers().items():
                layer.register_forward_hook(self._capture_hook(name))

    # ------------------------------------------------------------------ files

    def open(self, run_dir: Path | None) -> None:
        """Start writing ``metrics.jsonl`` and TensorBoard events into ``run_dir`` (main process)."""
        if self.context.is_main and run_dir is not None:
            self.writer = MetricsWriter(run_dir)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    # ------------------------------------------------------------------ around a step

    def before_step(self, next_step: int) -> None:
        """Arm the capture of activations and gradient norms if step ``next_step`` logs them."""
        config = self.config
        self._capturing = config.histogram_every > 0 and next_step % config.histogram_every == 0
        self._norms_due = self._capturing or next_step % config.log_every == 0

    def after_backward(self) -> None:
        """Read every parameter's gradient norm when this step reports them."""
        if self._norms_due:
            self._gradient_norms = {
                name: float(p.grad.norm()) for name, p in self.model.named_parameters() if p.grad is not None
            }

    def record_gradient_norm(self, norm: Tensor) -> None:
        """Keep an applied step's global gradient norm (a 0-d tensor, before clipping) for the window's scalars."""
        self.window.gradient_norms.append(norm.detach())

    def after_step(self, state: TrainState, loss: float, correct: int, count: int, applied: bool,
                   scalars: Mapping[str, float], total_steps: int) -> None:  # fmt: skip
        """Count the step; log scalars and histograms when due.

        ``scalars`` are the run's own values at this step (``lr``, ``margin``).
        """
        self._capturing = False
        self.window.add(loss, correct, count, applied)
        if state.step % self.config.log_every == 0:
            self._log_scalars(state, scalars, total_steps)
            self.window = StepWindow()
        if self.config.histogram_every and state.step % self.config.histogram_every == 0:
            self._log_histograms(state.step)

    def progress_postfix(self) -> dict[str, str]:
        """The figures shown beside the progress bar."""
        window = self.window
        if not window.count:
            return {}
        return {"loss": f"{window.loss_sum / window.count:.4f}", "acc": f"{window.correct / window.count:.3f}",
                "img_s": f"{window.images_per_s(self.config.batch_size):.0f}"}  # fmt: skip

    def validation(self, state: TrainState, loss: float, accuracy: float) -> None:
        """Write a validation result (flushed at once)."""
        self.writer.scalars("val", state.step, state.epoch + 1, {"loss": loss, "accuracy": accuracy})
        self.writer.flush()

    # ------------------------------------------------------------------ internals

    def _capture_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, outputs: tuple[Tensor, Tensor]) -> None:
            if self._capturing:
                self._captured[name] = outputs[1].detach()
                if hasattr(module, "trace") and len(inputs) == 2:  # a routed layer: keep a few inputs to trace
                    self._routing_inputs[name] = tuple(t.detach()[:TRACE_SAMPLES] for t in inputs)  # type: ignore[assignment]

        return hook

    def _log_scalars(self, state: TrainState, scalars: Mapping[str, float], total_steps: int) -> None:
        window = self.window
        device = self.context.device
        totals = all_reduce_sum(
            torch.tensor([window.loss_sum, window.correct, window.count], dtype=torch.float64, device=device),
            self.context,
        )
        loss_sum, correct, count = totals.tolist()
        elapsed = max(time.perf_counter() - window.started, 1e-9)
        values = {
            "loss": loss_sum / count if count else math.nan,
            "accuracy": correct / count if count else math.nan,
            **scalars,
            "images_per_s": window.images_per_s(self.config.batch_size),
            "step_time_s": elapsed / max(window.steps, 1),
            "peak_memory_mib": peak_memory_mib(device),
            "skipped_steps": state.skipped_steps,
            **window.gradient_scalars(self.config.clip_grad_norm),
        }
        self.last_train_loss = values["loss"]
        self.writer.scalars("train", state.step, state.epoch + 1, values)
        if self._gradient_norms:
            self.writer.scalars("grad_norm", state.step, state.epoch + 1, self._gradient_norms)
        self.writer.flush()  # a run killed mid-epoch keeps every logged step
        if not self.config.progress:
            remaining = (total_steps - state.step) * values["step_time_s"]
            self.log(
                f"step {state.step}/{total_steps} epoch {state.epoch + 1}: loss {values['loss']:.4f}, "
                f"accuracy {values['accuracy']:.4f}, {values['images_per_s']:.1f} images/s, "
                f"ETA {format_duration(remaining)}"
            )

    def _log_histograms(self, step: int) -> None:
        """Activations per layer and per EM iteration, ``β_a``/``β_v``, and gradient norms."""
        for name, activations in self._captured.items():
            self.writer.histogram(f"activations/{name}", step, activations)
        for name, parameter in self.model.named_parameters():
            if name.endswith(("beta_a", "beta_v")):
                self.writer.histogram(f"beta/{name}", step, parameter)
        layers = getattr(self.model, "capsule_layers", dict)()
        with torch.no_grad():
            for name, (poses, activations) in self._routing_inputs.items():
                for iteration, trace in enumerate(layers[name].trace(poses, activations), start=1):
                    prefix = f"routing/{name}/iteration{iteration}"
                    self.writer.histogram(f"{prefix}/activations", step, trace.activations)
                    self.writer.histogram(f"{prefix}/log_variance", step, trace.variance.log())
        if self._gradient_norms:
            self.writer.histogram("grad_norm/all_parameters", step, torch.tensor(list(self._gradient_norms.values())))
        self._captured.clear()
        self._routing_inputs.clear()

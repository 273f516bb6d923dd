"""The training loop: spread loss, Adam with continuous decay, validation, checkpoints, resumption.

:class:`Trainer` takes datasets (not paths): the command line builds them with
``matcaps.data.load_splits`` and tests pass small in-memory ones.  One optimizer step
per batch; ``step`` counts the batches consumed, so the learning rate
``lr · lr_decay^(step / lr_decay_steps)`` and the margin of the spread loss are pure
functions of it.  A step whose loss or gradients are not finite changes nothing (no
optimizer update, the normalisation statistics are restored) and is counted in
``skipped_steps``.

Exact resumption: the checkpoint holds the model, optimizer, scheduler, step, epoch,
the position inside the epoch and the RNG states; the data order is a function of
``(seed, epoch)`` (:class:`~matcaps.train.sampler.EpochBatchSampler`), the training set's
augmentation is told the epoch (``dataset.set_epoch``) and the loader workers are seeded
from ``(seed, epoch)``, so a run resumed from step ``k`` computes the same steps
``k+1, …`` as the uninterrupted run.
"""

from __future__ import annotations

import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from matcaps.errors import CheckpointError, ConfigError
from matcaps.layers import InputNorm
from matcaps.losses import classification_loss, l2_penalty, regularised_parameters
from matcaps.models import ModelConfig, build_model, count_parameters, model_config_from_dict
from matcaps.routing import release_workspace
from matcaps.train.checkpoint import (
    BEST_CHECKPOINT,
    CHECKPOINT_FORMAT,
    LAST_CHECKPOINT,
    capture_rng_state,
    restore_rng_state,
    save_atomic,
)
from matcaps.train.config import TrainConfig
from matcaps.train.distributed import DistributedContext, all_agree, all_reduce_sum, resolve_device
from matcaps.train.metrics import MetricsWriter, NullWriter
from matcaps.train.sampler import EpochBatchSampler, epoch_seed
from matcaps.train.validation import EvaluationCounts, autocast_context, evaluate_model

#: Bytes per mebibyte, for the memory scalars.
MIB = 1024**2
#: ``ru_maxrss`` is in KiB on Linux and in bytes on macOS.
RUSAGE_UNIT = 1 if sys.platform == "darwin" else 1024
#: Samples of the batch whose routing is traced, iteration by iteration, for the histograms.
TRACE_SAMPLES = 8
#: cuBLAS workspace setting that makes its results reproducible (PyTorch's reproducibility notes).
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"
#: Seconds per minute, for ``--max-minutes``.
SECONDS_PER_MINUTE = 60.0


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint.

    Attributes:
        step: Batches consumed so far (optimizer steps, skipped ones included).
        epoch: Current epoch (0-based).
        batch_in_epoch: Index of the next batch of ``epoch``.
        skipped_steps: Steps whose loss or gradients were not finite.
        best_val_accuracy: Best validation accuracy so far (-1 before any validation).
        best_step: Step at which it was reached.
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    skipped_steps: int = 0
    best_val_accuracy: float = -1.0
    best_step: int = -1
    validated_step: int = -1


@dataclass(frozen=True)
class TrainResult:
    """Summary of a finished :meth:`Trainer.fit`."""

    step: int
    epoch: int
    skipped_steps: int
    best_val_accuracy: float | None
    last_val_accuracy: float | None
    last_train_loss: float | None
    run_dir: Path | None
    batch_in_epoch: int = 0


StepHook = Callable[["Trainer"], None]


@dataclass
class _Window:
    """Running sums of the training scalars of this process between two log steps."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    def images_per_s(self, global_batch: int) -> float:
        return self.steps * global_batch / max(time.perf_counter() - self.started, 1e-9)


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


def use_deterministic_algorithms() -> None:
    """Make every operation reproducible, CUDA included (``--deterministic``).

    ``index_add``/``index_select`` backward (the routing's cross-position normaliser) use
    atomics on CUDA unless deterministic algorithms are requested; cuBLAS needs a fixed
    workspace (``CUBLAS_WORKSPACE_CONFIG``, read when cuBLAS starts, so set it before the
    first CUDA matrix product).
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and python ``random`` (model initialisation draws from torch's)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class Trainer:
    """Trains a :class:`CapsNet` on a dataset, writing a run directory on the main process.

    Args:
        config: The run's options.
        model_config: The network, a capsule network or the CNN baseline (see
            :func:`~matcaps.train.config.resolve_model_config`).
        train_set: Items ``(image (C, S, S) float32, label int64)``; may have ``set_epoch(epoch)``.
        val_set: Same items, or None (no validation; ``best.pt`` is not written).
        run_dir: Where checkpoints and metrics go (None: nothing is written).
        context: The process group (default: a single process on ``config.device``).
        step_hook: Called after every step (tests use it to interrupt a run).
        log: Prints a line (default: ``tqdm.write`` on the main process).
    """

    def __init__(
        self,
        config: TrainConfig,
        model_config: ModelConfig,
        train_set: Dataset,
        val_set: Dataset | None = None,
        run_dir: str | Path | None = None,
        context: DistributedContext | None = None,
        step_hook: StepHook | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.model_config = model_config
        self.context = context or DistributedContext(device=resolve_device(config.device))
        self.device = self.context.device
        if config.precision == "bf16" and self.device.type != "cuda":
            raise ConfigError("--precision bf16 needs a CUDA device (on CPU use fp32)")
        if config.batch_size % self.context.world_size:
            raise ConfigError(
                f"batch size {config.batch_size} is not divisible by the {self.context.world_size} processes"
            )
        self.train_set = train_set
        self.val_set = val_set
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.step_hook = step_hook
        self._log = log
        self.state = TrainState()
        self.schedule = config.margin_schedule()
        self.local_batch = config.batch_size // self.context.world_size

        if config.deterministic:
            use_deterministic_algorithms()
        seed_everything(config.seed)  # identical initial weights on every process
        self.dtype = torch.float64 if config.precision == "fp64" else torch.float32
        self.model: nn.Module = build_model(model_config).to(self.device, self.dtype)
        if self.context.distributed and isinstance(self.model.input_norm, InputNorm):
            self.model.input_norm.synchronise()  # batch statistics of the global batch
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=config.lr_factor)
        self.network: nn.Module = self.model
        if self.context.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # InputNorm computes the same (global-batch) statistics on every process, so the
            # buffers DDP broadcasts from rank 0 equal the local ones.
            self.network = DistributedDataParallel(self.model, device_ids=device_ids)
        if config.compile:
            self.network = torch.compile(self.network)
        self.sampler = EpochBatchSampler(
            len(train_set), self.local_batch, seed=config.seed, rank=self.context.rank,  # type: ignore[arg-type]
            world_size=self.context.world_size,
        )  # fmt: skip
        self.writer: NullWriter = NullWriter()
        self._captured: dict[str, Tensor] = {}
        self._capture = False
        self._routing_inputs: dict[str, tuple[Tensor, Tensor]] = {}
        capsule_layers = getattr(self.model, "capsule_layers", None)
        if not config.compile and capsule_layers is not None:
            for name, layer in capsule_layers().items():
                layer.register_forward_hook(self._make_capture_hook(name))
        self._started = time.monotonic()
        self._log_due = False
        self._gradient_norms: dict[str, float] = {}
        self.stopped_by_time = False
        self._window = _Window()
        self.last_val: EvaluationCounts | None = None
        self.last_train_loss: float | None = None

    # ------------------------------------------------------------------ bookkeeping

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler)

    @property
    def total_steps(self) -> int:
        """Steps of the whole run: ``epochs × steps_per_epoch``, capped by ``max_steps``."""
        total = self.config.epochs * self.steps_per_epoch
        return min(total, self.config.max_steps) if self.config.max_steps is not None else total

    def log(self, message: str) -> None:
        if not self.context.is_main:
            return
        if self._log is not None:
            self._log(message)
        elif self.config.progress:
            from tqdm.auto import tqdm

            tqdm.write(message)
        else:
            print(message, flush=True)

    def _make_capture_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, outputs: tuple[Tensor, Tensor]) -> None:
            if self._capture:
                self._captured[name] = outputs[1].detach()
                if hasattr(module, "trace") and len(inputs) == 2:  # a routed layer: keep a few inputs to trace
                    self._routing_inputs[name] = tuple(t.detach()[:TRACE_SAMPLES] for t in inputs)  # type: ignore[assignment]

        return hook

    def margin(self, step: int | None = None) -> float:
        return self.schedule(self.state.step if step is None else step)

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_payload(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly."""
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "state": vars(self.state).copy(),
            "rng": capture_rng_state(),
            "config": self.config.to_dict(),
            "model_config": self.model_config.to_dict(),
        }

    def save_checkpoint(self, name: str = LAST_CHECKPOINT) -> Path | None:
        """Write ``name`` into the run directory (main process only); returns its path."""
        if self.run_dir is None or not self.context.is_main:
            return None
        path = self.run_dir / name
        self.writer.flush()  # the metrics of every step up to the checkpoint are on disk first
        save_atomic(self.checkpoint_payload(), path)
        return path

    def load_checkpoint(self, payload: dict[str, Any]) -> None:
        """Continue from a checkpoint written by :meth:`save_checkpoint`."""
        try:  # normalised: a checkpoint written before a model option existed holds its default implicitly
            saved_model = model_config_from_dict(payload["model_config"]).to_dict()
        except (ConfigError, TypeError) as error:
            raise CheckpointError(f"the checkpoint's model configuration is invalid: {error}") from None
        if saved_model != self.model_config.to_dict():
            raise CheckpointError("the checkpoint's model differs from the configured one")
        try:
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
            self.scheduler.load_state_dict(payload["scheduler"])
        except (RuntimeError, KeyError, ValueError) as error:
            raise CheckpointError(f"checkpoint does not fit the model: {str(error).splitlines()[0]}") from None
        self.state = TrainState(**payload["state"])
        restore_rng_state(payload["rng"])

    # ------------------------------------------------------------------ one step

    def train_step(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, bool]:
        """One optimizer step on a local batch; returns (loss, correct predictions, applied).

        Nothing changes if the loss or a gradient is not finite on any process.
        """
        buffers = [b.detach().clone() for b in self.model.buffers()]
        margin = self.margin()
        with autocast_context(self.device, self.config.precision):
            output = self.network(images)
        scores = output.scores.to(torch.promote_types(self.dtype, torch.float32))
        loss = classification_loss(self.model.loss_kind, scores, labels, margin)
        total = loss
        if self.config.weight_decay > 0:
            total = loss + l2_penalty(regularised_parameters(self.model), self.config.weight_decay)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        gradients = [p.grad for p in self.model.parameters() if p.grad is not None]
        finite = torch.isfinite(total)
        if gradients:
            finite = finite & torch.stack([torch.isfinite(g).all() for g in gradients]).all()
        applied = all_agree(bool(finite), self.context)
        if applied:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for buffer, saved in zip(self.model.buffers(), buffers):
                    buffer.copy_(saved)
            self.state.skipped_steps += 1
        self.scheduler.step()
        self.state.step += 1
        if self._capture or self._log_due:
            self._gradient_norms = {
                name: float(p.grad.norm()) for name, p in self.model.named_parameters() if p.grad is not None
            }
        correct = (scores.detach().argmax(dim=1) == labels).sum()
        return loss.detach(), correct, applied

    # ------------------------------------------------------------------ monitoring

    def _log_train(self, window: _Window) -> None:
        totals = all_reduce_sum(
            torch.tensor([window.loss_sum, window.correct, window.count], dtype=torch.float64, device=self.device),
            self.context,
        )
        loss_sum, correct, count = totals.tolist()
        elapsed = max(time.perf_counter() - window.started, 1e-9)
        values = {
            "loss": loss_sum / count if count else math.nan,
            "accuracy": correct / count if count else math.nan,
            "lr": self.optimizer.param_groups[0]["lr"],
            "margin": self.margin(),
            "images_per_s": window.images_per_s(self.config.batch_size),
            "step_time_s": elapsed / max(window.steps, 1),
            "peak_memory_mib": peak_memory_mib(self.device),
            "skipped_steps": self.state.skipped_steps,
        }
        self.last_train_loss = values["loss"]
        self.writer.scalars("train", self.state.step, self.state.epoch + 1, values)
        if self._gradient_norms:
            self.writer.scalars("grad_norm", self.state.step, self.state.epoch + 1, self._gradient_norms)
        self.writer.flush()  # a run killed mid-epoch keeps every logged step
        if not self.config.progress:
            remaining = (self.total_steps - self.state.step) * values["step_time_s"]
            self.log(
                f"step {self.state.step}/{self.total_steps} epoch {self.state.epoch + 1}: loss {values['loss']:.4f}, "
                f"accuracy {values['accuracy']:.4f}, {values['images_per_s']:.1f} images/s, "
                f"ETA {format_duration(remaining)}"
            )

    def _log_histograms(self) -> None:
        """Activations per layer and per EM iteration, ``β_a``/``β_v``, and gradient norms."""
        for name, activations in self._captured.items():
            self.writer.histogram(f"activations/{name}", self.state.step, activations)
        for name, parameter in self.model.named_parameters():
            if name.endswith(("beta_a", "beta_v")):
                self.writer.histogram(f"beta/{name}", self.state.step, parameter)
        layers = getattr(self.model, "capsule_layers", dict)()
        with torch.no_grad():
            for name, (poses, activations) in self._routing_inputs.items():
                for iteration, trace in enumerate(layers[name].trace(poses, activations), start=1):
                    self.writer.histogram(f"routing/{name}/iteration{iteration}/activations", self.state.step,
                                          trace.activations)
                    self.writer.histogram(f"routing/{name}/iteration{iteration}/log_variance", self.state.step,
                                          trace.variance.log())
        if self._gradient_norms:
            self.writer.histogram("grad_norm/all_parameters", self.state.step,
                                  torch.tensor(list(self._gradient_norms.values())))
        self._captured.clear()
        self._routing_inputs.clear()

    def validate(self) -> EvaluationCounts | None:
        """Score the validation set; keep ``best.pt`` if the accuracy improved."""
        if self.val_set is None:
            return None
        counts = evaluate_model(
            self.model, self.val_set, self.model_config.num_classes, batch_size=self.config.val_batch_size,
            margin=self.margin(), device=self.device, context=self.context, workers=self.config.workers,
            precision=self.config.precision, progress=self.config.progress and self.context.is_main,
            description=f"validate epoch {self.state.epoch + 1}",
        )  # fmt: skip
        # The routing's scratch pool grew to the validation batch; give it back for training.
        release_workspace()
        self.last_val = counts
        self.state.validated_step = self.state.step
        self.writer.scalars("val", self.state.step, self.state.epoch + 1, {"loss": counts.loss, "accuracy": counts.accuracy})
        self.writer.flush()  # on disk before best.pt, so a killed run's files agree
        improved = counts.accuracy > self.state.best_val_accuracy
        if improved:
            self.state.best_val_accuracy = counts.accuracy
            self.state.best_step = self.state.step
            self.save_checkpoint(BEST_CHECKPOINT)
        self.log(
            f"epoch {self.state.epoch + 1} step {self.state.step}: validation accuracy {counts.accuracy:.4f}, "
            f"loss {counts.loss:.4f}{' (best)' if improved else ''}"
        )
        return counts

    # ------------------------------------------------------------------ the loop

    def _loader(self, epoch: int, start_batch: int) -> DataLoader:
        set_epoch = getattr(self.train_set, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        self.sampler.set_epoch(epoch, start_batch)
        return DataLoader(
            self.train_set, batch_sampler=self.sampler, num_workers=self.config.workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(epoch_seed(self.config.seed, epoch)),
        )  # fmt: skip

    def fit(self) -> TrainResult:
        """Train until ``total_steps``; returns a summary."""
        if self.context.is_main and self.run_dir is not None:
            self.writer = MetricsWriter(self.run_dir)
        self.log(
            f"training {count_parameters(self.model):,} parameters on {self.device} "
            f"({self.context.world_size} process(es)), {self.steps_per_epoch} steps/epoch, "
            f"{self.total_steps} steps in all" + (f", run directory {self.run_dir}" if self.run_dir else "")
        )
        self._started = time.monotonic()
        try:
            self._fit()
        finally:
            self.writer.close()
        if self.stopped_by_time:
            self.log(f"stopped at step {self.state.step} after the time limit of {self.config.max_minutes:g} "
                     f"minute(s); continue with --resume")
        return TrainResult(
            step=self.state.step, epoch=self.state.epoch, skipped_steps=self.state.skipped_steps,
            best_val_accuracy=self.state.best_val_accuracy if self.state.best_step >= 0 else None,
            last_val_accuracy=self.last_val.accuracy if self.last_val else None,
            last_train_loss=self.last_train_loss, run_dir=self.run_dir, batch_in_epoch=self.state.batch_in_epoch,
        )  # fmt: skip

    def _fit(self) -> None:
        config = self.config
        self.network.train()
        while self.state.step < self.total_steps:
            epoch = self.state.epoch
            loader = self._loader(epoch, self.state.batch_in_epoch)
            bar = None
            if config.progress and self.context.is_main:
                from tqdm.auto import tqdm

                bar = tqdm(total=self.steps_per_epoch, initial=self.state.batch_in_epoch, desc=f"epoch {epoch + 1}",
                           dynamic_ncols=True, leave=False)  # fmt: skip
            self._window = _Window()
            for images, labels in loader:
                self._run_batch(images, labels, bar)
                if self.state.step >= self.total_steps or self._out_of_time():
                    break
            if bar is not None:
                bar.close()
            if self.state.batch_in_epoch >= self.steps_per_epoch:  # the epoch is complete
                if config.val_every and (epoch + 1) % config.val_every == 0:
                    self.validate()
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
                self.save_checkpoint()
            self.writer.flush()
            if self.stopped_by_time:
                break
        if self.val_set is not None and config.val_every and self.state.validated_step != self.state.step:
            self.validate()  # the run stopped mid-epoch (--max-steps)
        self.save_checkpoint()

    def _out_of_time(self) -> bool:
        """True (on every process alike) once ``--max-minutes`` have passed since :meth:`fit` began."""
        if self.config.max_minutes is None:
            return False
        elapsed = time.monotonic() - self._started
        self.stopped_by_time = all_agree(elapsed >= self.config.max_minutes * SECONDS_PER_MINUTE, self.context,
                                         any_process=True)
        return self.stopped_by_time

    def _run_batch(self, images: Tensor, labels: Tensor, bar: Any) -> None:
        """Train on one batch; then log, write histograms and checkpoint as due, and call the hook."""
        config = self.config
        window = self._window
        images = images.to(self.device, self.dtype, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True).long().view(-1)
        self._capture = config.histogram_every > 0 and (self.state.step + 1) % config.histogram_every == 0
        self._log_due = (self.state.step + 1) % config.log_every == 0
        loss, correct, applied = self.train_step(images, labels)
        self._capture = False
        self.state.batch_in_epoch += 1
        step = self.state.step
        window.steps += 1
        if applied:
            window.loss_sum += float(loss) * labels.numel()
            window.correct += int(correct)
            window.count += labels.numel()
        if step % config.log_every == 0:
            self._log_train(window)
            self._window = _Window()
        if config.histogram_every and step % config.histogram_every == 0:
            self._log_histograms()
        if bar is not None:
            bar.update(1)
            if window.count:
                bar.set_postfix(loss=f"{window.loss_sum / window.count:.4f}", acc=f"{window.correct / window.count:.3f}",
                                img_s=f"{window.images_per_s(config.batch_size):.0f}", refresh=False)  # fmt: skip
        if config.val_every_steps and step % config.val_every_steps == 0 and self.state.batch_in_epoch < self.steps_per_epoch:
            self.validate()  # mid-epoch; an epoch's last step is validated by the epoch end
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            self.save_checkpoint()
        if self.step_hook is not None:
            self.step_hook(self)

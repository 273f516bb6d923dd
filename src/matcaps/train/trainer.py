"""The training loop: one optimizer step per batch, validation, checkpoints, a time box, resumption.

:class:`Trainer` takes datasets (not paths): the command line builds them with
``matcaps.data.load_splits`` and tests pass small in-memory ones.  One optimizer step
per batch; ``step`` counts the batches consumed, so the learning rate
``lr · lr_decay^(step / lr_decay_steps)`` and the margin of the spread loss are pure
functions of it.  A step whose loss or gradients are not finite changes nothing (no
optimizer update, the normalisation statistics are restored) and is counted in
``skipped_steps``.  What the run reports while it trains is :class:`TrainingMonitor`'s job.

Exact resumption: the checkpoint holds the model (and its weight average), optimizer, scheduler, step, epoch,
the position inside the epoch and the RNG states; the data order is a function of
``(seed, epoch)`` (:class:`~matcaps.train.sampler.EpochBatchSampler`), the training set's
augmentation is told the epoch (``dataset.set_epoch``) and the loader workers are seeded
from ``(seed, epoch)``, so a run resumed from step ``k`` computes the same steps
``k+1, …`` as the uninterrupted run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from matcaps.data.loader_workers import iterate_with_workers_forked_quietly, quiet_worker_init
from matcaps.distributed import DistributedContext, all_agree, resolve_device
from matcaps.errors import CheckpointError, ConfigError
from matcaps.layers import InputNorm
from matcaps.losses import classification_loss, l2_penalty, regularised_parameters
from matcaps.models import ModelConfig, build_model, count_parameters
from matcaps.routing import release_workspace
from matcaps.scoring import EvaluationCounts, autocast_context, evaluate_model
from matcaps.train.checkpoint import (
    BEST_CHECKPOINT,
    CHECKPOINT_FORMAT,
    CLASS_NAMES_KEY,
    LAST_CHECKPOINT,
    InitialWeights,
    capture_rng_state,
    check_class_names,
    network_differences,
    read_initial_weights,
    restore_rng_state,
    save_atomic,
)
from matcaps.train.config import TrainConfig
from matcaps.train.ema import WeightAverage
from matcaps.train.monitor import TrainingMonitor, global_gradient_norm
from matcaps.train.param_groups import optimizer_groups
from matcaps.train.reproducibility import seed_everything, use_deterministic_algorithms
from matcaps.train.sampler import EpochBatchSampler, epoch_seed
from matcaps.train.state import TrainResult, TrainState

#: Seconds per minute, for ``--max-minutes``.
SECONDS_PER_MINUTE = 60.0

StepHook = Callable[["Trainer"], None]


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
        class_names: The training data's class names in label order, saved in every checkpoint
            (and checked against the checkpoint's on resume); None: not recorded.
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
        stop_requested: Callable[[], str | None] | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        self.config = config
        self.class_names = list(class_names) if class_names is not None else None
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
        if self.context.distributed:
            for module in self.model.modules():
                if isinstance(module, InputNorm):  # and FeatureNorm
                    module.synchronise()  # batch statistics of the global batch
        self.optimizer = torch.optim.Adam(optimizer_groups(self.model, config.lr, config.lr_scales), lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda=config.lr_factor)
        #: ``--ema-decay``: the moving average of the weights, validated and saved as the checkpoints' network.
        self.weight_average = WeightAverage(self.model, config.ema_decay) if config.ema_decay > 0 else None
        self.network: nn.Module = self.model
        if self.context.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # InputNorm and FeatureNorm compute the same (global-batch) statistics on every process,
            # so the buffers DDP broadcasts from rank 0 equal the local ones.
            self.network = DistributedDataParallel(self.model, device_ids=device_ids)
        if config.compile:
            self.network = torch.compile(self.network)
        self.sampler = EpochBatchSampler(
            len(train_set), self.local_batch, seed=config.seed, rank=self.context.rank,  # type: ignore[arg-type]
            world_size=self.context.world_size,
        )  # fmt: skip
        self.monitor = TrainingMonitor(self.model, config, self.context, self.log)
        self._started = time.monotonic()
        #: Asked after every step: the name of a stop request (e.g. a signal's), or None to go on.
        self.stop_requested = stop_requested
        #: Why training stopped before its last step: "time" (``--max-minutes``), a signal's name, or None.
        self.stopped_by: str | None = None
        self.last_val: EvaluationCounts | None = None

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

    def margin(self, step: int | None = None) -> float:
        return self.schedule(self.state.step if step is None else step)

    @property
    def evaluated_model(self) -> nn.Module:
        """The network that is validated and saved as a checkpoint's ``model``: the moving average of
        the weights with ``--ema-decay``, else the trained network itself."""
        return self.weight_average.average if self.weight_average is not None else self.model

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_payload(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly.

        ``model`` holds the evaluated network (what ``matcaps test``, ``--init-from`` and the
        pretrained weights read); with ``--ema-decay`` that is the weight average, and the trained
        weights that training continues from are ``training_model``.
        """
        extra = {"training_model": self.model.state_dict()} if self.weight_average is not None else {}
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.evaluated_model.state_dict(),
            **extra,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "state": vars(self.state).copy(),
            "rng": capture_rng_state(),
            "config": self.config.to_dict(),
            "model_config": self.model_config.to_dict(),
            **({CLASS_NAMES_KEY: self.class_names} if self.class_names is not None else {}),
        }

    def save_checkpoint(self, name: str = LAST_CHECKPOINT) -> Path | None:
        """Write ``name`` into the run directory (main process only); returns its path."""
        if self.run_dir is None or not self.context.is_main:
            return None
        path = self.run_dir / name
        self.monitor.flush()  # the metrics of every step up to the checkpoint are on disk first
        save_atomic(self.checkpoint_payload(), path)
        return path

    def load_initial_weights(self, source: str | Path) -> InitialWeights:
        """Warm start: copy the network weights of ``source`` (see :func:`read_initial_weights`) into
        the model; returns what was read.  The optimizer, the learning-rate and margin schedules and
        the step count stay at their start; every process reads the same file, so DDP replicas start equal.
        """
        initial = read_initial_weights(source, self.model_config.to_dict())
        self.model.load_state_dict(initial.weights)
        if self.weight_average is not None:
            self.weight_average.restart(self.model)
        return initial

    def load_checkpoint(self, payload: dict[str, Any]) -> None:
        """Continue from a checkpoint written by :meth:`save_checkpoint`."""
        try:
            differences = network_differences(payload["model_config"], self.model_config.to_dict())
        except (ConfigError, TypeError) as error:
            raise CheckpointError(f"the checkpoint's model configuration is invalid: {error}") from None
        if differences:
            raise CheckpointError(f"the checkpoint's model differs from the configured one in {', '.join(differences)} "
                                  f"(with the data of {self.config.data_root})")
        if self.class_names is not None:
            check_class_names(payload, self.class_names, f"the {self.config.dataset} data in {self.config.data_root}",
                              "the checkpoint")
        if self.weight_average is not None and "training_model" not in payload:
            raise CheckpointError("the checkpoint holds no trained weights beside the evaluated ones; it was not "
                                  "written by a run with --ema-decay")
        try:
            if self.weight_average is not None:
                self.model.load_state_dict(payload["training_model"])
                self.weight_average.average.load_state_dict(payload["model"])
            else:
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
        self.monitor.after_backward()
        gradients = [p.grad for p in self.model.parameters() if p.grad is not None]
        finite = torch.isfinite(total)
        if gradients:
            finite = finite & torch.stack([torch.isfinite(g).all() for g in gradients]).all()
        applied = all_agree(bool(finite), self.context)
        if applied:
            if self.config.clip_grad_norm > 0:  # after the check: a non-finite norm never scales a step
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad_norm)
            else:
                norm = global_gradient_norm(gradients)
            self.monitor.record_gradient_norm(norm)
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for buffer, saved in zip(self.model.buffers(), buffers):
                    buffer.copy_(saved)
            self.state.skipped_steps += 1
        self.scheduler.step()
        self.state.step += 1
        if applied and self.weight_average is not None:
            self.weight_average.update(self.model, self.state.step)
        correct = (scores.detach().argmax(dim=1) == labels).sum()
        return loss.detach(), correct, applied

    # ------------------------------------------------------------------ validation

    def validate(self) -> EvaluationCounts | None:
        """Score the validation set; keep ``best.pt`` if the accuracy improved."""
        if self.val_set is None:
            return None
        counts = evaluate_model(
            self.evaluated_model, self.val_set, self.model_config.num_classes, batch_size=self.config.val_batch_size,
            margin=self.margin(), device=self.device, context=self.context, workers=self.config.workers,
            precision=self.config.precision, progress=self.config.progress and self.context.is_main,
            description=f"validate epoch {self.state.epoch + 1}",
        )  # fmt: skip
        # The routing's scratch pool grew to the validation batch; give it back for training.
        release_workspace()
        self.last_val = counts
        self.state.validated_step = self.state.step
        self.monitor.validation(self.state, counts.loss, counts.accuracy)  # on disk before best.pt
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
            pin_memory=self.device.type == "cuda", worker_init_fn=quiet_worker_init(self.config.workers),
            generator=torch.Generator().manual_seed(epoch_seed(self.config.seed, epoch)),
        )  # fmt: skip

    def fit(self) -> TrainResult:
        """Train until ``total_steps``; returns a summary."""
        self.monitor.open(self.run_dir)
        self.log(
            f"training {count_parameters(self.model):,} parameters on {self.device} "
            f"({self.context.world_size} process(es)), {self.steps_per_epoch} steps/epoch, "
            f"{self.total_steps} steps in all" + (f", run directory {self.run_dir}" if self.run_dir else "")
        )
        if self.config.lr_scales:
            self.log("learning rate per parameter group: " + ", ".join(
                f"{g['group']} {g['lr']:.3g} (x{g['lr_scale']:g})" for g in self.optimizer.param_groups))
        self._started = time.monotonic()
        try:
            self._fit()
        finally:
            self.monitor.close()
        if self.stopped_by == "time":
            self.log(f"stopped at step {self.state.step} after the time limit of {self.config.max_minutes:g} "
                     f"minute(s); continue with --resume")
        elif self.stopped_by is not None:
            self.log(f"stopped at step {self.state.step} by {self.stopped_by}, with a checkpoint; continue with --resume")
        return TrainResult(
            step=self.state.step, epoch=self.state.epoch, skipped_steps=self.state.skipped_steps,
            best_val_accuracy=self.state.best_val_accuracy if self.state.best_step >= 0 else None,
            last_val_accuracy=self.last_val.accuracy if self.last_val else None,
            last_train_loss=self.monitor.last_train_loss, run_dir=self.run_dir, batch_in_epoch=self.state.batch_in_epoch,
            stopped_by=self.stopped_by,
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
            batches = iterate_with_workers_forked_quietly(loader)
            for images, labels in batches:
                self._run_batch(images, labels, bar)
                if self.state.step >= self.total_steps or self._should_stop():
                    break
            if bar is not None:
                bar.close()
            if self.state.batch_in_epoch >= self.steps_per_epoch:  # the epoch is complete
                if config.val_every and (epoch + 1) % config.val_every == 0:
                    self.validate()
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
                self.save_checkpoint()
            self.monitor.flush()
            if self.stopped_by is not None:
                break
        if self.val_set is not None and config.val_every and self.state.validated_step != self.state.step:
            self.validate()  # the run stopped mid-epoch (--max-steps)
        self.save_checkpoint()

    def _should_stop(self) -> bool:
        """True (on every process alike) once ``--max-minutes`` have passed since :meth:`fit` began, or
        once a stop was requested (:attr:`stop_requested`) on any process."""
        if self.config.max_minutes is None and self.stop_requested is None:
            return False
        out_of_time = self.config.max_minutes is not None and \
            time.monotonic() - self._started >= self.config.max_minutes * SECONDS_PER_MINUTE
        request = self.stop_requested() if self.stop_requested is not None else None
        if not all_agree(out_of_time or request is not None, self.context, any_process=True):
            return False
        self.stopped_by = "time" if out_of_time else (request or "a stop request of another process")
        return True

    def _run_batch(self, images: Tensor, labels: Tensor, bar: Any) -> None:
        """Train on one batch; then report, validate and checkpoint as due, and call the hook."""
        config = self.config
        images = images.to(self.device, self.dtype, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True).long().view(-1)
        self.monitor.before_step(self.state.step + 1)
        loss, correct, applied = self.train_step(images, labels)
        self.state.batch_in_epoch += 1
        step = self.state.step
        first = self.optimizer.param_groups[0]
        scalars = {"lr": first["lr"] / first.get("lr_scale", 1.0), "margin": self.margin()}  # the unscaled schedule
        self.monitor.after_step(self.state, float(loss), int(correct), labels.numel(), applied, scalars,
                                self.total_steps)  # fmt: skip
        if bar is not None:
            bar.update(1)
            bar.set_postfix(self.monitor.progress_postfix(), refresh=False)
        if config.val_every_steps and step % config.val_every_steps == 0 and self.state.batch_in_epoch < self.steps_per_epoch:
            self.validate()  # mid-epoch; an epoch's last step is validated by the epoch end
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            self.save_checkpoint()
        if self.step_hook is not None:
            self.step_hook(self)

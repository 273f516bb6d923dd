"""Training: configuration, loop, monitoring, checkpoints, run directories.

Scoring (:mod:`matcaps.scoring`) and the process group (:mod:`matcaps.distributed`) live outside
this package because ``matcaps test`` uses them too; their names are re-exported here.

This is application code (used by ``matcaps train``); the library (``matcaps.models``,
``matcaps.data``, …) never imports it.
"""

from matcaps.distributed import DistributedContext, setup_distributed, teardown_distributed
from matcaps.scoring import EvaluationCounts, evaluate_model
from matcaps.train.checkpoint import BEST_CHECKPOINT, LAST_CHECKPOINT, load_checkpoint, resolve_checkpoint, save_atomic
from matcaps.train.config import TrainConfig, build_config, load_config_file, resolve_model_config, save_config
from matcaps.train.metrics import MetricsWriter, read_metrics
from matcaps.train.run import choose_run_dir, read_run_config, train_run
from matcaps.train.sampler import EpochBatchSampler
from matcaps.train.state import TrainResult, TrainState
from matcaps.train.trainer import Trainer

__all__ = [
    "BEST_CHECKPOINT", "LAST_CHECKPOINT", "DistributedContext", "EpochBatchSampler", "EvaluationCounts",
    "MetricsWriter", "TrainConfig", "TrainResult", "TrainState", "Trainer", "build_config", "choose_run_dir",
    "evaluate_model", "load_checkpoint", "load_config_file", "read_metrics", "read_run_config",
    "resolve_checkpoint", "resolve_model_config", "save_atomic", "save_config", "setup_distributed",
    "teardown_distributed", "train_run",
]  # fmt: skip

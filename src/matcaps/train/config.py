"""The training configuration: one explicit dataclass, read from TOML/YAML/JSON files and flags.

Every option of ``matcaps train`` is a field of :class:`TrainConfig` whose metadata holds
its help text; the command line is generated from these fields (``--batch-size`` for
``batch_size``), so the file format and the flags cannot drift apart.  Precedence is
``defaults < --config FILE < flags``.  The resolved configuration is written into each
run directory as ``config.toml``; ``matcaps train --config RUN/config.toml`` trains the
same run again (in a new run directory).

The defaults are the IBM smallNORB recipe (Gritzman 2019, ``train_val.py``): Adam with
learning rate 3e-3 decayed continuously by 0.96 every 20,000 steps, batch 64, the spread
loss with Hinton's margin schedule, and 2 routing iterations (the preset's).  The L2
penalty of ``2e-7`` (Hinton et al.) is defined by IBM but off by default; ``--l2 2e-7``
turns it on.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from matcaps.allocator import ALLOCATOR_REGIMES
from matcaps.data.folders import BAD_IMAGE_POLICIES, FolderOptions
from matcaps.errors import ConfigError
from matcaps.losses import MarginSchedule
from matcaps.models import CNN_BASELINE, MODEL_NAMES, CNNBaselineConfig, ModelConfig, preset
from matcaps.models.options import apply_model_options
from matcaps.routing import MAX_ITERATIONS, ROUTING_IMPLEMENTATIONS
from matcaps.tomlread import tomllib
from matcaps.train.param_groups import check_lr_scales

if TYPE_CHECKING:
    from matcaps.data import DataConfig

#: Data splits ``matcaps.data`` knows (train/test viewpoints of smallNORB).
SPLITS: tuple[str, ...] = ("standard", "azimuth", "elevation")
#: Numeric precisions: fp32; bf16 autocast (CUDA); fp64 weights and inputs (slow; for checks
#: that must not depend on float32 rounding, e.g. that data parallelism changes nothing).
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp64")
#: Highest number of EM iterations accepted (defined with the routing).
MAX_ROUTING_ITERATIONS = MAX_ITERATIONS
#: Suffixes of the configuration files that ``load_config_file`` reads.
CONFIG_SUFFIXES: tuple[str, ...] = (".toml", ".yaml", ".yml", ".json")
#: Options that may differ from the saved configuration when a run is resumed.
RESUMABLE_CHANGES: frozenset[str] = frozenset(
    {"epochs", "max_steps", "max_minutes", "workers", "device", "log_every", "histogram_every", "checkpoint_every",
     "val_every", "val_every_steps", "val_batch_size", "progress", "data_root", "compile", "allocator", "deterministic",
     "routing_impl"}  # the routing implementations compute the same numbers
)


def _option(default: Any, kind: str, help: str, group: str, **extra: Any) -> Any:
    """A dataclass field carrying what the command line needs to expose it."""
    metadata = {"kind": kind, "help": help, "group": group, **extra}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (not where it is written).

    ``kind`` in each field's metadata is one of ``int``, ``float``, ``bool``, ``str``,
    ``ints`` (a tuple of ints) or ``table`` (a nested mapping); a trailing ``?`` allows
    None ("not set": the value comes from the dataset or the model preset).
    """

    # Data.
    dataset: str = _option("smallnorb", "str", "dataset name (see `matcaps data --help`), or folder: your own "
                           "images in --data-root, one sub-folder per class (or train/ and test/ holding them)", "data")
    data_root: str = _option("data", "str", "directory holding the prepared datasets (the image folder for "
                             "--dataset folder)", "data")
    split: str = _option("standard", "str", "train/test split: standard, or the novel-viewpoint "
                         "azimuth/elevation splits of smallNORB", "data", choices=SPLITS)
    validation: bool = _option(True, "bool", "hold out a validation set from the training data", "data")
    val_instances: tuple[int, ...] = _option((4,), "ints", "smallNORB training instances held out "
                                             "for validation", "data")
    val_size: int = _option(5000, "int", "validation images held out for datasets without "
                            "instances (MNIST-like)", "data")
    image_size: int | None = _option(None, "int?", "image folders: side of the square network input the images are "
                                     "resized (shorter side) and centre-cropped to (default: 32)", "data")
    channels: int | None = _option(None, "int?", "image folders: 1 (grey) or 3 (RGB) (default: 3 if any image is "
                                   "in colour, else 1)", "data", choices=(1, 3))
    val_fraction: float = _option(0.1, "float", "image folders without a val/ folder: share of each class's training "
                                  "images held out for validation", "data")
    test_fraction: float = _option(0.2, "float", "image folders without train/ and test/ folders: share of each "
                                   "class's images held out as the test set (seeded)", "data")
    bad_images: str = _option("stop", "str", "image folders: an unreadable or corrupt image stops with its name "
                              "(stop) or is left out and counted (skip)", "data", choices=BAD_IMAGE_POLICIES)
    canvas: int | None = _option(None, "int?", "MNIST-like: place each digit on a black canvas of this side, at a "
                                 "random position for training and centred for evaluation (Sabour et al.'s "
                                 "affNIST protocol: 40); the network's input size follows", "data")
    hflip: bool = _option(False, "bool", "mirror each training image left-right with probability 1/2 (not in "
                          "the paper; the usual augmentation of Fashion-MNIST and CIFAR-10, wrong for digits; "
                          "not smallNORB or image folders)", "data")
    stereo: bool = _option(False, "bool", "smallNORB: feed both stereo views of a pair as one 2-channel image "
                           "(24,300 items per split, Hinton et al.'s recipe) instead of one item per view (IBM's)",
                           "data")
    # Model.
    model: str | None = _option(None, "str?", "architecture: a capsule preset (default: smallnorb for "
                                "smallNORB, cifar10 for CIFAR-10, mnist for the others) or cnn-baseline, "
                                "Hinton et al.'s CNN trained with softmax cross-entropy", "model", choices=MODEL_NAMES)
    iters: int | None = _option(None, "int?", "EM routing iterations, 1 to 3 (default: the preset's, 2)", "model")
    routing_impl: str | None = _option(None, "str?", "routing implementation: blocked (default; compiled "
                                       "CPU kernel, fused where it cannot run), fused, naive (plain autograd) or "
                                       "triton (CUDA, pip install matcaps[triton])", "model",
                                       choices=ROUTING_IMPLEMENTATIONS)
    model_options: dict[str, Any] = _option({}, "table", "changes to the preset's CapsNetConfig "
                                            "fields, e.g. conv1_channels=32 (repeatable)", "model")
    init_from: str | None = _option(None, "str?", "start from the weights of this network of the same "
                                    "architecture (routing settings may differ): a run directory (its best.pt), a checkpoint "
                                    "file or a pretrained name (mnist, fashion-mnist); optimizer, schedules and step count start afresh "
                                    "(fine-tuning, warm starts)", "model")
    # Optimisation.
    epochs: int = _option(500, "int", "training epochs (IBM's published curve: 500)", "optimisation")
    max_steps: int | None = _option(None, "int?", "stop after this many steps (overrides --epochs)", "optimisation")
    max_minutes: float | None = _option(None, "float?", "stop cleanly after this many minutes of training, with a "
                                        "checkpoint that --resume continues (a time box per invocation)",
                                        "optimisation")
    batch_size: int = _option(64, "int", "global batch size (split over processes)", "optimisation")
    lr: float = _option(3e-3, "float", "Adam learning rate", "optimisation")
    lr_decay: float = _option(0.96, "float", "learning-rate factor per --lr-decay-steps (applied "
                              "continuously, every step)", "optimisation")
    lr_decay_steps: int = _option(20_000, "int", "steps over which the learning rate decays by "
                                  "--lr-decay", "optimisation")
    lr_drop_steps: tuple[int, ...] = _option((), "ints", "steps at which the learning rate is also multiplied by "
                                             "--lr-drop (a step schedule on top of the continuous decay, e.g. "
                                             "5154 6872)", "optimisation")
    lr_drop: float = _option(0.1, "float", "learning-rate factor at each of --lr-drop-steps", "optimisation")
    lr_scales: dict[str, Any] = _option({}, "table", "learning-rate factor per parameter group (features, "
                                        "transforms, beta_a, beta_v; see matcaps.train.param_groups), e.g. "
                                        "transforms=10 (repeatable; default: one learning rate for all, IBM's)",
                                        "optimisation")
    weight_decay: float = _option(0.0, "float", "L2 penalty factor on weights, TensorFlow l2_loss "
                                  "convention (Hinton et al.: 2e-7; IBM default: off)", "optimisation",
                                  aliases=("--l2",))
    clip_grad_norm: float = _option(0.0, "float", "rescale the gradient so that its global L2 norm (all "
                                    "parameters) is at most this before each step; 0: off (IBM: off)",
                                    "optimisation")
    ema_decay: float = _option(0.0, "float", "validate, keep and test an exponential moving average of the "
                               "weights with this decay per step, e.g. 0.999 (TensorFlow's warm-up over the first "
                               "steps; see matcaps.train.ema); 0: off, the trained weights themselves (IBM's)",
                               "optimisation")
    margin_start: float = _option(0.2, "float", "spread-loss margin at the start", "optimisation")
    margin_span: float = _option(0.79, "float", "total growth of the margin", "optimisation")
    margin_steps: float = _option(50_000.0, "float", "steps per unit of the margin's sigmoid", "optimisation")
    margin_offset: float = _option(4.0, "float", "offset of the margin's sigmoid", "optimisation")
    margin_cap: float = _option(10.0, "float", "cap of the margin's sigmoid argument", "optimisation")
    # Execution.
    seed: int = _option(0, "int", "random seed (model init, data order, augmentation; the validation hold-out "
                        "too unless --holdout-seed)", "execution")
    holdout_seed: int | None = _option(None, "int?", "seed of the MNIST-like validation hold-out and of image "
                                       "folders' splits (default: --seed); keep it fixed to compare seeds on one "
                                       "validation set, e.g. seeds of a fine-tune, whose source network trained "
                                       "on the other images of its own hold-out", "execution")
    workers: int = _option(2, "int", "data-loader worker processes per training process", "execution")
    device: str = _option("auto", "str", "auto, cpu, cuda or cuda:N", "execution")
    precision: str = _option("fp32", "str", "fp32; bf16 autocast (CUDA only); fp64 (numerical checks)", "execution",
                             choices=PRECISIONS)
    compile: bool = _option(False, "bool", "torch.compile the model (the fused routing itself runs eagerly)", "execution")
    deterministic: bool = _option(False, "bool", "use only deterministic algorithms (torch.use_deterministic_algorithms; "
                                  "on CUDA the routing's scatter-adds and cuBLAS become reproducible, a little "
                                  "slower); CPU runs are deterministic anyway", "execution")
    allocator: str = _option("tuned", "str", "C allocator regime set at process start: tuned (glibc mallopt "
                             "thresholds raised; faster, see matcaps bench --allocator) or default", "execution",
                             choices=ALLOCATOR_REGIMES)
    # Monitoring.
    val_every: int = _option(1, "int", "validate every N epochs (0: never)", "monitoring")
    val_every_steps: int = _option(0, "int", "also validate every N steps, mid-epoch (0: only at epoch ends); for "
                                   "learning curves such as the steps to a given validation accuracy", "monitoring")
    val_batch_size: int = _option(256, "int", "batch size of validation", "monitoring")
    log_every: int = _option(100, "int", "log training scalars every N steps", "monitoring")
    histogram_every: int = _option(1000, "int", "log activation and beta histograms every N steps "
                                   "(0: never)", "monitoring")
    checkpoint_every: int = _option(1000, "int", "write last.pt every N steps (it is also written "
                                    "after every epoch; 0: epochs only)", "monitoring")
    progress: bool = _option(True, "bool", "show tqdm progress bars", "monitoring")

    def __post_init__(self) -> None:
        validate(self)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (tuples as lists, None kept)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["val_instances"] = list(self.val_instances)
        values["model_options"] = json.loads(json.dumps(self.model_options))
        values["lr_scales"] = dict(self.lr_scales)
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "configuration") -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys and wrong types raise :class:`ConfigError`."""
        return cls(**coerce_values(values, source))

    def folder_options(self) -> FolderOptions:
        """How an image folder is read and split (``--dataset folder``)."""
        return FolderOptions(self.image_size, self.channels, self.val_fraction, self.test_fraction, self.bad_images)

    def margin_schedule(self) -> MarginSchedule:
        """The spread-loss margin schedule of this run."""
        return MarginSchedule(self.margin_start, self.margin_span, self.margin_steps, self.margin_offset, self.margin_cap)

    def lr_factor(self, step: int) -> float:
        """The learning-rate multiplier after ``step`` steps: ``lr_decay ** (step / lr_decay_steps)``
        times ``lr_drop`` for each of ``lr_drop_steps`` already reached."""
        drops = sum(1 for milestone in self.lr_drop_steps if step >= milestone)
        return self.lr_decay ** (step / self.lr_decay_steps) * self.lr_drop**drops


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _check_kind(name: str, value: Any, kind: str, source: str) -> Any:
    """``value`` converted to the field's kind, or :class:`ConfigError` naming the option."""
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None and optional:
        return None
    where = f"{source}: option {name}"
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if kind == "ints":
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise ConfigError(f"{where} must be a list of integers, got {value!r}")
        return tuple(value)
    if kind == "table":
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        return json.loads(json.dumps(value))
    raise AssertionError(f"unknown option kind {kind!r}")  # pragma: no cover


def coerce_values(values: Mapping[str, Any], source: str = "configuration") -> dict[str, Any]:
    """Check names and types of ``values`` (a partial configuration) against :class:`TrainConfig`."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{source}: expected a table of options, got {type(values).__name__}")
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{source}: unknown option(s): {', '.join(unknown)}")
    return {name: _check_kind(name, value, FIELDS[name].metadata["kind"], source) for name, value in values.items()}


def validate(config: TrainConfig) -> None:
    """Raise :class:`ConfigError` for impossible values (called by ``TrainConfig`` itself)."""
    for name, f in FIELDS.items():
        _check_kind(name, getattr(config, name), f.metadata["kind"], "configuration")
        choices = f.metadata.get("choices")
        value = getattr(config, name)
        if choices and value is not None and value not in choices:
            raise ConfigError(f"option {name}: {value!r} is not one of {', '.join(choices)}")
    positive = ("epochs", "batch_size", "lr_decay_steps", "val_batch_size", "log_every", "val_size")
    for name in positive:
        if getattr(config, name) < 1:
            raise ConfigError(f"option {name} must be at least 1, got {getattr(config, name)!r}")
    for name in ("workers", "val_every", "val_every_steps", "histogram_every", "checkpoint_every"):
        if getattr(config, name) < 0:
            raise ConfigError(f"option {name} must not be negative, got {getattr(config, name)!r}")
    if config.max_minutes is not None and not (math.isfinite(config.max_minutes) and config.max_minutes > 0):
        raise ConfigError(f"option max_minutes must be a positive number of minutes, got {config.max_minutes!r}")
    if config.canvas is not None and config.canvas < 1:
        raise ConfigError(f"option canvas must be a positive number of pixels, got {config.canvas!r}")
    if config.max_steps is not None and config.max_steps < 1:
        raise ConfigError(f"option max_steps must be at least 1, got {config.max_steps!r}")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise ConfigError(f"option lr must be a positive number, got {config.lr!r}")
    if not 0 < config.lr_decay <= 1:
        raise ConfigError(f"option lr_decay must be in (0, 1], got {config.lr_decay!r}")
    if not 0 < config.lr_drop <= 1:
        raise ConfigError(f"option lr_drop must be in (0, 1], got {config.lr_drop!r}")
    if any(milestone < 1 for milestone in config.lr_drop_steps):
        raise ConfigError(f"option lr_drop_steps must be steps of at least 1, got {list(config.lr_drop_steps)!r}")
    if not (math.isfinite(config.weight_decay) and config.weight_decay >= 0):
        raise ConfigError(f"option weight_decay must be a non-negative number, got {config.weight_decay!r}")
    if not (math.isfinite(config.clip_grad_norm) and config.clip_grad_norm >= 0):
        raise ConfigError(f"option clip_grad_norm must be a non-negative number (0: off), got {config.clip_grad_norm!r}")
    if not (math.isfinite(config.ema_decay) and 0 <= config.ema_decay < 1):
        raise ConfigError(f"option ema_decay must be in [0, 1) (0: off), got {config.ema_decay!r}")
    if config.iters is not None and not 1 <= config.iters <= MAX_ROUTING_ITERATIONS:
        raise ConfigError(f"option iters must be between 1 and {MAX_ROUTING_ITERATIONS}, got {config.iters!r}")
    if not config.device or not (config.device in ("auto", "cpu") or config.device.startswith("cuda")):
        raise ConfigError(f"option device must be auto, cpu, cuda or cuda:N, got {config.device!r}")
    config.margin_schedule()  # raises ConfigError for an impossible schedule
    check_lr_scales(config.lr_scales)


def data_config(config: TrainConfig, **changes: Any) -> "DataConfig":
    """The :class:`~matcaps.data.DataConfig` of a run (``changes`` override its fields, e.g. the test split)."""
    from matcaps.data import DataConfig

    values: dict[str, Any] = dict(
        dataset=config.dataset, root=Path(config.data_root), split=config.split, val_instances=config.val_instances,
        val_size=config.val_size, validation=config.validation, seed=config.seed, holdout_seed=config.holdout_seed,
        canvas=config.canvas, hflip=config.hflip, stereo=config.stereo, folder=config.folder_options(),
    )  # fmt: skip
    values.update(changes)
    return DataConfig(**values)


def holdout_mismatch(source: dict[str, Any], config: TrainConfig) -> str | None:
    """A warning when a warm start's validation set is not the hold-out its source network was
    trained without, else None.

    ``source`` is the source run's ``TrainConfig.to_dict()``.  MNIST-like datasets and image folders
    draw their hold-out with the hold-out seed: a fine-tune with another seed validates on images that
    the source network trained on (its checkpoint choice is then biased; the test set is unaffected).
    """
    if not source or not config.validation or source.get("dataset") != config.dataset or config.dataset == "smallnorb":
        return None  # smallNORB holds out instances, whatever the seed
    if config.dataset == "folder" and source.get("data_root") != config.data_root:
        return None  # other images altogether
    if not source.get("validation", True):
        return ("warning: the network this run starts from trained without a validation hold-out, on every "
                "image of this run's validation set")

    from matcaps.data.splits import holdout_seed_of

    source_seed = holdout_seed_of(source.get("seed", 0), source.get("holdout_seed"))
    own_seed = holdout_seed_of(config.seed, config.holdout_seed)
    if source.get("val_size") == config.val_size and source_seed == own_seed:
        return None
    return (f"warning: this run holds out another validation set (hold-out seed {own_seed}, {config.val_size} "
            f"images) than the network it starts from (seed {source_seed}, {source.get('val_size')} images), "
            f"which trained on most of these validation images; --holdout-seed {source_seed} keeps its hold-out")


def default_model_name(dataset: str) -> str:
    """The preset trained on ``dataset`` when ``--model`` is not given."""
    return dataset if dataset in ("smallnorb", "cifar10") else "mnist"


def resolve_model_config(config: TrainConfig, num_classes: int, image_size: int, channels: int) -> ModelConfig:
    """The network to train: preset → dataset shape → ``model_options`` → ``iters``/``routing_impl``."""
    if "num_classes" in config.model_options and config.model_options["num_classes"] != num_classes:
        raise ConfigError(
            f"model option num_classes={config.model_options['num_classes']} does not match the {num_classes} "
            f"classes of dataset {config.dataset}"
        )
    if config.model == CNN_BASELINE:
        return _resolve_cnn_config(config, num_classes, image_size, channels)
    base = preset(config.model or default_model_name(config.dataset))
    base = base.replace(num_classes=num_classes, image_size=image_size, in_channels=channels)
    return apply_model_options(base, config.model_options, iterations=config.iters, implementation=config.routing_impl)


def _resolve_cnn_config(config: TrainConfig, num_classes: int, image_size: int, channels: int) -> CNNBaselineConfig:
    """The CNN baseline for the dataset's shape, with ``model_options`` applied."""
    for name in ("iters", "routing_impl"):
        if getattr(config, name) is not None:
            raise ConfigError(f"option {name} applies to capsule networks, not to {CNN_BASELINE}")
    capsule_groups = sorted(set(config.lr_scales) - {"features"})
    if capsule_groups:
        raise ConfigError(f"option lr_scales: {', '.join(capsule_groups)} are capsule parameters; "
                          f"{CNN_BASELINE} has only features")
    values = {"num_classes": num_classes, "image_size": image_size, "in_channels": channels, **config.model_options}
    try:
        return CNNBaselineConfig.from_dict(values)
    except TypeError as error:
        raise ConfigError(f"invalid model options: {error}") from None


def _parse_error_reason(error: Exception) -> str:
    """A parser's error in one line, keeping the line and column (PyYAML puts them on later lines)."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        problem = "; ".join(part for part in (error.context, error.problem) if part) or "invalid YAML"
        return f"{problem} (at line {mark.line + 1}, column {mark.column + 1})"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The options in a TOML, YAML or JSON file (checked, not yet merged with defaults)."""
    path = Path(path)
    if path.suffix.lower() not in CONFIG_SUFFIXES:
        raise ConfigError(f"configuration file {path}: unknown format (use {', '.join(CONFIG_SUFFIXES)})")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read configuration file {path}: {error.strerror or error}") from None
    try:
        if path.suffix.lower() == ".toml":
            values = tomllib.loads(text)
        elif path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            values = yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot parse configuration file {path}: {_parse_error_reason(error)}") from None
    return coerce_values(values, f"configuration file {path}")


def build_config(file_values: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the values of a configuration file, then explicit overrides (flags)."""
    values: dict[str, Any] = {}
    values.update(file_values or {})
    values.update(coerce_values(overrides or {}, "command line"))
    return TrainConfig.from_dict(values)


# --------------------------------------------------------------------------- TOML writing


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan")
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(values: Mapping[str, Any], prefix: str = "") -> str:
    """A TOML document for a nested dict of scalars and lists (None values are left out)."""
    lines = [f"{key} = {_toml_value(v)}" for key, v in values.items() if v is not None and not isinstance(v, Mapping)]
    for key, v in values.items():
        if isinstance(v, Mapping):
            name = f"{prefix}{key}"
            lines += ["", f"[{name}]", to_toml(v, name + ".").rstrip("\n")]
    return "\n".join(lines).strip("\n") + "\n"


def save_config(config: TrainConfig, path: str | Path, header: str = "") -> None:
    """Write ``config`` as TOML (every field, so the file alone reproduces the run)."""
    text = "".join(f"# {line}\n" for line in header.splitlines()) + to_toml(config.to_dict())
    Path(path).write_text(text, encoding="utf-8")

"""Pretrained networks shipped with the package, loaded by name: ``pretrained("mnist")``.

The weights are ordinary matcaps checkpoints (the model's weights, its configuration and the
training configuration; no optimizer state) in ``matcaps/pretrained/``, listed with their test
accuracy and provenance in ``matcaps/pretrained/weights.toml`` (:data:`REGISTRY_FILE`).  Each
file's SHA-256 is checked before it is read, so a damaged installation is reported, not used.

::

    from matcaps.models import pretrained, pretrained_names
    model = pretrained("mnist")                  # a CapsNet in eval mode, on the CPU
    scores = model(images).scores                # images: (N, 1, S, S), S = model.config.image_size (32 for mnist)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from matcaps.errors import CheckpointError, ConfigError
from matcaps.tomlread import tomllib

if TYPE_CHECKING:
    from torch import nn

#: Directory of the shipped weights (package data).
PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"
#: The registry: one TOML table per name.
REGISTRY_FILE = PRETRAINED_DIR / "weights.toml"


@dataclass(frozen=True)
class PretrainedWeights:
    """One entry of the registry.

    Attributes:
        name: What ``pretrained(name)`` and the commands accept (``mnist``).
        file: The checkpoint file, beside the registry.
        dataset: The dataset it was trained on (a name of :data:`matcaps.data.DATASET_NAMES`).
        sha256: SHA-256 (hex) of the file.
        test_accuracy, test_correct, test_images: Its score on the whole official test set.
        check_images, check_correct: Images right among the first ``check_images`` test
            images (a quick re-scoring check).
        source, trained, notes: Where the weights come from.
    """

    name: str
    file: str
    dataset: str
    sha256: str
    test_accuracy: float
    test_correct: int
    test_images: int
    check_images: int
    check_correct: int
    source: str
    trained: str
    notes: str

    @property
    def path(self) -> Path:
        """The checkpoint file."""
        return PRETRAINED_DIR / self.file

    def describe(self) -> str:
        """One short line (a figure's title, a table's heading): name, dataset and test accuracy.

        ``source``, ``trained`` and ``notes`` are paragraphs; they stay in the registry.
        """
        return (f"pretrained {self.name} ({self.dataset}, {100 * self.test_accuracy:.2f} % on the "
                f"{self.test_images:,} test images)")


def _registry() -> dict[str, PretrainedWeights]:
    try:
        tables = tomllib.loads(REGISTRY_FILE.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise CheckpointError(f"cannot read the registry of pretrained networks {REGISTRY_FILE}: {error}") from None
    names = {f.name for f in fields(PretrainedWeights)} - {"name"}
    registry = {}
    for name, values in tables.items():
        if not isinstance(values, dict) or set(values) != names:
            raise CheckpointError(f"{REGISTRY_FILE}: entry [{name}] must have exactly the fields {', '.join(sorted(names))}")
        registry[name] = PretrainedWeights(name=name, **values)
    return registry


def pretrained_names() -> tuple[str, ...]:
    """Every name :func:`pretrained` accepts, in registry order."""
    return tuple(_registry())


def pretrained_weights(name: str) -> PretrainedWeights:
    """The registry entry of ``name``; an unknown name raises :class:`ConfigError` listing the known ones."""
    registry = _registry()
    if name not in registry:
        raise ConfigError(f"unknown pretrained network {name!r}; available: {', '.join(registry)}")
    return registry[name]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pretrained_checkpoint(name: str) -> Path:
    """The checkpoint file of ``name``, after checking that it is the one the registry lists.

    Raises:
        ConfigError: unknown name.
        CheckpointError: the file is missing or its SHA-256 differs from the registry's.
    """
    entry = pretrained_weights(name)
    if not entry.path.is_file():
        raise CheckpointError(f"pretrained {name}: {entry.path} is missing; reinstall matcaps")
    found = _sha256(entry.path)
    if found != entry.sha256:
        raise CheckpointError(f"pretrained {name}: {entry.path} has SHA-256 {found}, the registry lists "
                              f"{entry.sha256}; reinstall matcaps")
    return entry.path


def load_pretrained_payload(name: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict of ``name`` (``model``, ``model_config``, ``config``, ``state``)."""
    path = pretrained_checkpoint(name)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
        payload["model"], payload["model_config"]
    except Exception as error:  # torch raises many types for damaged files
        raise CheckpointError(f"pretrained {name}: cannot read {path}: {error}") from None
    return payload


def pretrained(name: str, device: str | torch.device = "cpu") -> "nn.Module":
    """The network ``name`` with its trained weights, in eval mode, on ``device``.

    Its input is what the dataset's evaluation transform gives, ``(N, C, S, S)`` with ``S =
    model.config.image_size``: the ``mnist`` network takes 28×28 digits centred on a 32×32 canvas
    (``canvas=32`` of :class:`matcaps.data.DataConfig`; standardised per image), since it was
    trained on digits shifted on one.  28×28 input runs too, less accurately (98.95 against 99.40 %
    on the first 2,000 test images).  ``matcaps predict NAME IMAGE`` applies the right transform to
    image files.
    """
    from matcaps.models.capsnet import build_model
    from matcaps.models.config import model_config_from_dict

    payload = load_pretrained_payload(name)
    model = build_model(model_config_from_dict(payload["model_config"]))
    model.load_state_dict(payload["model"])
    return model.to(device).eval()

"""A trained network ready for inference, named by a run directory, a checkpoint file or a pretrained name.

``matcaps predict``, ``matcaps show`` and ``matcaps test`` accept the same targets:

* a run directory (its ``best.pt``, or ``last.pt`` with ``which="last"``);
* a checkpoint file;
* the name of a pretrained network shipped with matcaps (``mnist``, ``fashion-mnist``; see
  :mod:`matcaps.models.weights`), used when no file or directory of that name exists.

:func:`preprocess_image` turns an image file into exactly what the network sees in evaluation:
the image is read as grey or RGB (the network's input channels), fitted to the side of the
images its dataset's cache stores, or to an image folder's input size
(:func:`~matcaps.data.images.fit_square`), and passed through the dataset's evaluation
transform, the one validation and ``matcaps test`` use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from matcaps.data.folders import FOLDER_DATASET, folder_class_names
from matcaps.data.images import load_image
from matcaps.data.sources import dataset_info, stored_image_size
from matcaps.data.splits import dataset_transforms
from matcaps.errors import CheckpointError
from matcaps.models import CapsNet, ModelConfig, build_model, model_config_from_dict
from matcaps.models.weights import PretrainedWeights
from matcaps.train.checkpoint import CLASS_NAMES_KEY, load_checkpoint, resolve_target
from matcaps.train.config import TrainConfig


@dataclass(frozen=True)
class TrainedNetwork:
    """A network loaded from a checkpoint, in eval mode.

    Attributes:
        model: The network (``CapsNet`` or ``CNNBaseline``), eval mode, on ``device``.
        model_config: Its configuration.
        config: The training configuration stored in the checkpoint (dataset, margin, …).
        checkpoint: The checkpoint file.
        step: Training steps taken when it was saved.
        class_names: ``K`` class names, index = label.
        pretrained: The registry entry when loaded by a pretrained name, else None.
        device: Where the model is.
    """

    model: nn.Module
    model_config: ModelConfig
    config: TrainConfig
    checkpoint: Path
    step: int
    class_names: tuple[str, ...]
    pretrained: PretrainedWeights | None
    device: torch.device

    @property
    def dataset(self) -> str:
        """The dataset it was trained on."""
        return self.config.dataset

    @property
    def is_capsule_network(self) -> bool:
        return isinstance(self.model, CapsNet)

    @property
    def score_name(self) -> str:
        """What one score is: a class-capsule ``activation``, or a softmax ``probability`` of the CNN baseline."""
        return "activation" if self.is_capsule_network else "probability"

    @property
    def scores_label(self) -> str:
        """What its scores are, in words for a table's heading."""
        return "class-capsule activations" if self.is_capsule_network else "softmax probabilities"

    def describe(self) -> str:
        """One line naming the network, its data and its training progress."""
        if self.pretrained is not None:
            return self.pretrained.describe()
        return f"{self.checkpoint} ({self.dataset}, step {self.step})"


def load_trained(target: str | Path, which: str = "best", device: str | torch.device = "cpu") -> TrainedNetwork:
    """Load the network ``target`` (see :func:`resolve_target`) in eval mode on ``device``."""
    path, entry = resolve_target(target, which)
    payload = load_checkpoint(path)
    try:
        config = TrainConfig.from_dict(payload["config"], f"checkpoint {path}")
        model_config = model_config_from_dict(payload["model_config"])
        weights = payload["model"]
    except KeyError as error:
        raise CheckpointError(f"checkpoint {path} lacks {error}") from None
    model = build_model(model_config)
    model.load_state_dict(weights)
    device = torch.device(device)
    model.to(device).eval()
    state = payload.get("state", {})
    return TrainedNetwork(
        model=model, model_config=model_config, config=config, checkpoint=path, step=int(state.get("step", 0)),
        class_names=tuple(payload.get(CLASS_NAMES_KEY) or class_names(config, model_config.num_classes)),
        pretrained=entry, device=device,
    )  # fmt: skip


def class_names(config: TrainConfig, num_classes: int) -> tuple[str, ...]:
    """The class names of the dataset a network was trained on, for checkpoints that do not record them
    (an image folder's from the folder, if still there)."""
    if config.dataset == FOLDER_DATASET:
        return folder_class_names(config.data_root, num_classes)
    return tuple(dataset_info(config.dataset).class_names)


def stored_size(config: TrainConfig) -> int:
    """Side of the images the dataset's transforms take: the cached images, or an image folder's input size."""
    return config.folder_options().size if config.dataset == FOLDER_DATASET else stored_image_size(config.dataset)


def preprocess_image(path: str | Path, network: TrainedNetwork) -> Tensor:
    """The image file ``path`` as ``network`` sees it in evaluation: ``(C, S, S)`` float32.

    Raises:
        DataFormatError: the file cannot be read as an image (one line naming it).
    """
    image = load_image(path, network.model_config.in_channels, stored_size(network.config))
    _, evaluation = dataset_transforms(network.dataset, network.config.canvas)
    return evaluation(image)


@torch.no_grad()
def class_scores(network: TrainedNetwork, images: Tensor) -> Tensor:
    """``(N, K)`` scores of ``(N, C, S, S)`` images: activations, or probabilities for the CNN baseline."""
    dtype = next(network.model.parameters()).dtype
    scores = network.model(images.to(network.device, dtype)).scores.float()
    return scores if network.is_capsule_network else scores.softmax(dim=1)

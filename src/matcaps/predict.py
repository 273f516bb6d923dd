"""Classifying image files with a trained network: ``matcaps predict CKPT|RUN_DIR|NAME IMAGE...``.

Each image is preprocessed exactly as the network's test images are
(:func:`matcaps.trained.preprocess_image`) and scored; the result lists every class's score
(class-capsule activations, or the CNN baseline's softmax probabilities) and the ``k`` best
classes, printed as a table (:func:`format_predictions`) or as JSON (:func:`predictions_to_json`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from matcaps.errors import ConfigError
from matcaps.trained import TrainedNetwork, class_scores, preprocess_image


@dataclass(frozen=True)
class ImagePrediction:
    """The scores of one image.

    Attributes:
        image: The file, as given.
        scores: ``K`` scores, index = class.
        top: The ``k`` best ``(class index, score)``, best first (ties: lower index first).
    """

    image: str
    scores: tuple[float, ...]
    top: tuple[tuple[int, float], ...]


def predict_images(
    network: TrainedNetwork, paths: Sequence[str | Path], top_k: int = 3, batch_size: int = 64
) -> list[ImagePrediction]:
    """Score every image file of ``paths`` (all are read first, so a bad file stops before any work).

    Raises:
        ConfigError: ``top_k`` or ``batch_size`` below 1.
        DataFormatError: an image cannot be read (one line naming it).
    """
    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    top_k = min(top_k, len(network.class_names))
    images = [preprocess_image(path, network) for path in paths]
    predictions = []
    for start in range(0, len(images), batch_size):
        scores = class_scores(network, torch.stack(images[start : start + batch_size])).cpu().double()
        for path, row in zip(paths[start : start + batch_size], scores):
            # stable sort: equal scores keep the lower class index first, like argmax
            order = sorted(range(len(row)), key=lambda k: -float(row[k]))[:top_k]
            predictions.append(ImagePrediction(str(path), tuple(row.tolist()), tuple((k, float(row[k])) for k in order)))
    return predictions


def predictions_to_json(network: TrainedNetwork, predictions: Sequence[ImagePrediction]) -> dict:
    """A JSON-serialisable report: the network, what the scores are, and each image's scores and top classes."""
    names = network.class_names
    return {
        "network": {
            "checkpoint": str(network.checkpoint), "pretrained": network.pretrained.name if network.pretrained else None,
            "dataset": network.dataset, "step": network.step, "classes": list(names),
        },
        "score": network.score_name,
        "images": [
            {
                "image": p.image,
                "scores": dict(zip(names, p.scores)),
                "top": [{"class": names[k], "index": k, "score": s} for k, s in p.top],
            }
            for p in predictions
        ],
    }  # fmt: skip


def format_predictions(network: TrainedNetwork, predictions: Sequence[ImagePrediction]) -> str:
    """A table: one row per image with its ``k`` best classes and their scores."""
    names = network.class_names
    k = max((len(p.top) for p in predictions), default=1)
    cells = [[p.image, *(f"{names[c]} {s:.4f}" for c, s in p.top)] for p in predictions]
    header = ["image", *(_ordinal(i + 1) for i in range(k))]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    lines = [f"{network.describe()}; scores: {network.scores_label}", "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def _ordinal(n: int) -> str:
    return f"{n}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(n if n < 20 else n % 10, 'th')}"

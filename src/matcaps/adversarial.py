"""White-box adversarial attacks in pixel space: FGSM and BIM, untargeted and targeted.

Hinton et al. (2018, §6) attack the capsule network and the CNN baseline with the fast gradient
sign method (FGSM, Goodfellow et al. 2015) and the basic iterative method (BIM, Kurakin et al.
2017) and report the accuracy left (untargeted) and the share of images classified as the chosen
class (targeted) against the size ε of the perturbation.

The attacks change **pixels**: images in the valid range ``[0, 1]`` (raw intensity / 255), before
the per-image standardisation that the network's input goes through.  :class:`PixelModel` puts
that preprocessing in front of the network, so the gradient flows through the standardisation
and the whole network, EM routing included (every iteration; the routing has no stop-gradient),
with the network in evaluation mode (batch-norm running statistics, no dropout).  ε is therefore
a change of ``ε · 255`` grey levels per pixel at most, and every adversarial image is clipped to
``[0, 1]``.

* untargeted FGSM: ``x' = clip(x + ε · sign(∇ₓ L(x, y)))``;
* targeted FGSM: ``x' = clip(x − ε · sign(∇ₓ L(x, t)))`` for a target class ``t ≠ y``;
* BIM: ``k`` such steps of size ``α``, each followed by a projection onto the ε ball around ``x``
  (``|x' − x|∞ ≤ ε``) and onto ``[0, 1]``.

``L`` is the softmax cross-entropy of the network's scores (the capsule network's class
activations, the CNN's logits) or, with ``loss="margin"``, the best other class's score minus the
true (target) class's, which does not saturate.  Gradients are summed over the batch, so each
image's gradient is its own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from matcaps.errors import ConfigError

#: Attack methods.
ATTACK_METHODS: tuple[str, ...] = ("fgsm", "bim")
#: Untargeted (reduce accuracy) or targeted (reach a chosen class).
ATTACK_MODES: tuple[str, ...] = ("untargeted", "targeted")
#: Losses whose gradient the attacks follow.
ATTACK_LOSSES: tuple[str, ...] = ("cross-entropy", "margin")
#: The valid pixel range the attacks clip to (raw intensity / 255).
PIXEL_LOW, PIXEL_HIGH = 0.0, 1.0


class PixelModel(nn.Module):
    """``network(normalise(pixels))``: a network that takes ``[0, 1]`` pixels.

    Args:
        network: Returns an output with ``scores`` (``(N, K)``) for ``(N, C, S, S)`` standardised images.
        normalise: ``(N, C, H, W)`` pixels → ``(N, C, S, S)`` network input, differentiable (an
            evaluation transform's ``normalise``).
    """

    def __init__(self, network: nn.Module, normalise: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.network = network
        self.normalise = normalise

    def forward(self, pixels: Tensor) -> Tensor:
        """``(N, C, H, W)`` pixels → ``(N, K)`` class scores."""
        dtype = next(self.network.parameters()).dtype
        return self.network(self.normalise(pixels.to(dtype))).scores


def attack_loss(scores: Tensor, classes: Tensor, loss: str) -> Tensor:
    """Sum over the batch of the loss of ``(N, K)`` scores for ``(N,)`` classes (the true or the target ones)."""
    if loss == "cross-entropy":
        return F.cross_entropy(scores.float() if scores.dtype == torch.float16 else scores, classes, reduction="sum")
    if loss == "margin":
        others = scores.masked_fill(F.one_hot(classes, scores.shape[1]).bool(), float("-inf"))
        return (others.amax(dim=1) - scores.gather(1, classes.view(-1, 1)).squeeze(1)).sum()
    raise ConfigError(f"unknown attack loss {loss!r}; choose one of {', '.join(ATTACK_LOSSES)}")


def input_gradient(model: nn.Module, pixels: Tensor, classes: Tensor, loss: str = "cross-entropy") -> Tensor:
    """``∇ₓ L(model(x), classes)`` for ``(N, C, H, W)`` pixels (the model's parameters get no gradient)."""
    x = pixels.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        value = attack_loss(model(x), classes, loss)
        (gradient,) = torch.autograd.grad(value, x)
    return gradient


def _direction(targeted: bool) -> float:
    """Untargeted attacks climb the loss of the true class; targeted ones descend that of the target."""
    return -1.0 if targeted else 1.0


def fgsm_from_gradient(pixels: Tensor, gradient: Tensor, epsilon: float, targeted: bool = False) -> Tensor:
    """The FGSM image for a precomputed gradient: ``clip(x ± ε · sign(g), 0, 1)``."""
    return (pixels + _direction(targeted) * epsilon * gradient.sign()).clamp(PIXEL_LOW, PIXEL_HIGH)


def fgsm(
    model: nn.Module, pixels: Tensor, classes: Tensor, epsilon: float, targeted: bool = False,
    loss: str = "cross-entropy",
) -> Tensor:  # fmt: skip
    """One signed gradient step of size ε (away from ``classes``, or towards them when ``targeted``).

    Args:
        model: ``(N, C, H, W)`` pixels → ``(N, K)`` scores (a :class:`PixelModel`), in evaluation mode.
        pixels: ``(N, C, H, W)`` images in ``[0, 1]``.
        classes: ``(N,)`` true labels (untargeted) or target classes (targeted).
        epsilon: Largest change of a pixel, in ``[0, 1]`` units.
        targeted: Move towards ``classes`` instead of away from them.
        loss: ``cross-entropy`` or ``margin``.

    Returns:
        ``(N, C, H, W)`` adversarial images in ``[0, 1]``.
    """
    check_epsilon(epsilon)
    return fgsm_from_gradient(pixels, input_gradient(model, pixels, classes, loss), epsilon, targeted)


def bim(
    model: nn.Module, pixels: Tensor, classes: Tensor, epsilon: float, iterations: int, step_size: float,
    targeted: bool = False, loss: str = "cross-entropy",
) -> Tensor:  # fmt: skip
    """``iterations`` FGSM steps of ``step_size``, each projected onto the ε ball around ``pixels`` and ``[0, 1]``.

    Args as :func:`fgsm`, and:
        iterations: Number of steps ``k``.
        step_size: ``α``, the size of each step (``[0, 1]`` units).
    """
    check_epsilon(epsilon)
    if iterations < 1:
        raise ConfigError(f"BIM needs at least 1 iteration, got {iterations}")
    if not step_size > 0:
        raise ConfigError(f"the BIM step size must be positive, got {step_size}")
    low = (pixels - epsilon).clamp(min=PIXEL_LOW)
    high = (pixels + epsilon).clamp(max=PIXEL_HIGH)
    adversarial = pixels.detach().clone()
    for _ in range(iterations):
        gradient = input_gradient(model, adversarial, classes, loss)
        adversarial = adversarial + _direction(targeted) * step_size * gradient.sign()
        adversarial = torch.maximum(torch.minimum(adversarial, high), low)
    return adversarial


def check_epsilon(epsilon: float) -> None:
    """ε must lie in ``[0, 1]`` (the pixel range)."""
    if not PIXEL_LOW <= epsilon <= PIXEL_HIGH - PIXEL_LOW:
        raise ConfigError(f"epsilon must be between 0 and 1 (a fraction of the pixel range), got {epsilon}")

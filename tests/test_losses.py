"""Spread loss, its margin schedule and the L2 penalty."""

from __future__ import annotations

import math

import pytest
import torch

from matcaps.errors import ConfigError, InvalidInputError
from matcaps.losses import (
    MarginSchedule,
    SpreadLoss,
    classification_loss,
    l2_penalty,
    regularised_parameters,
    spread_loss,
)
from matcaps.models import build_model


def test_margin_schedule_values():
    schedule = MarginSchedule()
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert math.isclose(schedule(0), 0.2 + 0.79 * sigmoid(-4))
    assert math.isclose(schedule(200_000), 0.2 + 0.79 * 0.5)
    assert math.isclose(schedule(10_000_000), 0.2 + 0.79 * sigmoid(10))  # argument capped at 10
    assert schedule(0) < schedule(100_000) < schedule(300_000) < 0.99


def test_margin_schedule_rejects_bad_parameters():
    with pytest.raises(ConfigError):
        MarginSchedule(steps_per_unit=0)
    with pytest.raises(ConfigError):
        MarginSchedule(start=0.5, span=0.79)


def test_spread_loss_against_explicit_sum():
    torch.manual_seed(0)
    activations = torch.rand(6, 5)
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    margin = 0.4
    expected = 0.0
    for n in range(6):
        t = targets[n]
        for i in range(5):
            if i != t:
                expected += max(0.0, margin - float(activations[n, t] - activations[n, i])) ** 2
    assert math.isclose(spread_loss(activations, targets, margin).item(), expected / 6, rel_tol=1e-6)


def test_spread_loss_is_zero_when_the_target_wins_by_the_margin():
    activations = torch.tensor([[0.9, 0.1, 0.2], [0.0, 0.0, 0.6]])
    targets = torch.tensor([0, 2])
    assert spread_loss(activations, targets, 0.5).item() == 0.0
    assert spread_loss(activations, targets, 0.75).item() > 0.0


def test_spread_loss_module_uses_the_schedule():
    activations, targets = torch.rand(4, 5), torch.tensor([0, 1, 2, 3])
    loss = SpreadLoss(MarginSchedule())
    assert torch.equal(loss(activations, targets, 300_000), spread_loss(activations, targets, MarginSchedule()(300_000)))


def test_l2_penalty_covers_kernels_and_transforms_only():
    model = build_model("smallnorb")
    names = {name for name, p in model.named_parameters() if any(p is q for q in regularised_parameters(model))}
    assert names == {
        "conv1.weight", "primary_caps.pose.weight", "primary_caps.activation.weight",
        "conv_caps1.weight", "conv_caps2.weight", "class_caps.weight",
    }  # fmt: skip
    parameters = regularised_parameters(model)
    expected = 2e-7 * sum(float(p.detach().double().square().sum()) for p in parameters) / 2
    assert math.isclose(l2_penalty(parameters, 2e-7).item(), expected, rel_tol=1e-5)


@pytest.mark.parametrize(("scores", "targets"), [
    (torch.rand(3, 5), torch.tensor([1.0, 2.0, 3.0])),  # float targets
    (torch.rand(3, 5), torch.tensor([[1], [2], [3]])),  # (N, 1) targets
    (torch.rand(3, 5), torch.tensor([1, 2])),  # another batch size
    (torch.rand(3, 5), torch.tensor([1, 2, 3], dtype=torch.int32)),  # gather and cross-entropy need int64
    (torch.rand(0, 5), torch.zeros(0, dtype=torch.long)),  # an empty batch (the mean would be NaN)
    (torch.rand(5), torch.tensor([1])),  # scores without a batch dimension
])  # fmt: skip
@pytest.mark.parametrize("kind", ["spread", "cross_entropy"])
def test_losses_name_the_expected_and_received_shapes(kind, scores, targets):
    with pytest.raises(InvalidInputError) as error:
        classification_loss(kind, scores, targets, 0.2)
    message = str(error.value)
    assert "(N, K) floating-point class scores and (N,) int64 class indices" in message
    assert str(tuple(scores.shape)) in message and str(tuple(targets.shape)) in message


def test_describe_tensor_names_shape_and_dtype_or_the_type():
    import numpy as np

    from matcaps.errors import describe_tensor

    assert describe_tensor(torch.zeros(2, 3, dtype=torch.int64)) == "(2, 3) int64"
    assert describe_tensor(np.zeros((4,), dtype=np.float32)) == "(4,) float32"
    assert describe_tensor([1, 2]) == "list"
    assert describe_tensor(None) == "NoneType"

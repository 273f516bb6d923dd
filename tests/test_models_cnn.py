"""The CNN baseline (Hinton et al. 2018, §5): parameter count, shapes, configuration, loss."""

from __future__ import annotations

import pytest
import torch

from matcaps.errors import ConfigError, InvalidInputError
from matcaps.losses import classification_loss, spread_loss
from matcaps.models import (
    CNN_BASELINE,
    MODEL_NAMES,
    CNNBaseline,
    CNNBaselineConfig,
    build_model,
    count_parameters,
    model_config_from_dict,
    preset,
)


def expected_parameters(size: int, classes: int, channels: int = 1) -> int:
    """Counted from the description: two 5×5 convolutions (32, 64), two 2×2 poolings, 1,024 units."""
    conv1 = 5 * 5 * channels * 32 + 32
    conv2 = 5 * 5 * 32 * 64 + 64
    hidden = (size // 4) ** 2 * 64 * 1024 + 1024
    output = 1024 * classes + classes
    return conv1 + conv2 + hidden + output


@pytest.mark.parametrize(("size", "classes", "total"), [(32, 5, 4_252_549), (28, 10, 3_274_634)])
def test_parameter_count_is_the_papers_4_2_million_at_32x32(size, classes, total):
    model = build_model(preset(CNN_BASELINE, image_size=size, num_classes=classes))
    assert count_parameters(model) == expected_parameters(size, classes) == total


def test_layers_and_output_shapes():
    model = CNNBaseline(CNNBaselineConfig(num_classes=10, image_size=28))
    convolutions = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.padding) for c in convolutions] == [(32, (5, 5), (2, 2)), (64, (5, 5), (2, 2))]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.modules()) == 2
    dropout = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert [d.p for d in dropout] == [0.5]
    images = torch.randn(4, 1, 28, 28)
    assert model.features(model.input_norm(images)).shape == (4, 64, 7, 7)
    output = model(images)
    assert output.logits.shape == (4, 10) and output.scores is output.logits
    assert model.loss_kind == "cross_entropy"


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    model = build_model(preset(CNN_BASELINE, image_size=16, num_classes=3))
    images = torch.randn(8, 1, 16, 16)
    model.train()
    model.input_norm.eval()  # same normalisation in both passes; only dropout differs
    assert not torch.equal(model(images).logits, model(images).logits)
    model.eval()
    assert torch.equal(model(images).logits, model(images).logits)


def test_config_round_trip_through_the_model_registry():
    config = preset(CNN_BASELINE, num_classes=7, image_size=24, hidden_units=64)
    values = config.to_dict()
    assert values["architecture"] == CNN_BASELINE
    assert model_config_from_dict(values) == config
    assert model_config_from_dict(preset("mnist").to_dict()) == preset("mnist")
    assert CNN_BASELINE in MODEL_NAMES and "smallnorb" in MODEL_NAMES


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image_size": 30}, "divisible by 4"),
        ({"kernel_size": 4}, "must be odd"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"hidden_units": 0}, "hidden_units must be a positive integer"),
        ({"architecture": "capsnet"}, "architecture"),
    ],
)
def test_invalid_configurations_are_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        CNNBaselineConfig(**changes)
    with pytest.raises(ConfigError, match="unknown option"):
        CNNBaselineConfig.from_dict({"routing": {}})


def test_an_image_of_another_size_is_named_not_a_matmul_error():
    network = CNNBaseline(CNNBaselineConfig(image_size=32))
    assert network(torch.randn(2, 1, 32, 32)).logits.shape == (2, network.config.num_classes)
    with pytest.raises(InvalidInputError, match=r"built for 32×32 images .*got \(2, 1, 28, 28\)"):
        network(torch.randn(2, 1, 28, 28))


def test_classification_loss_dispatches_on_the_models_loss_kind():
    torch.manual_seed(0)
    scores, targets = torch.rand(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    assert torch.equal(classification_loss("spread", scores, targets, 0.3), spread_loss(scores, targets, 0.3))
    log_probabilities = scores.log_softmax(dim=1)
    expected = -log_probabilities[torch.arange(6), targets].mean()
    assert torch.allclose(classification_loss("cross_entropy", scores, targets, 0.3), expected)
    with pytest.raises(ConfigError, match="unknown loss kind"):
        classification_loss("hinge", scores, targets, 0.3)

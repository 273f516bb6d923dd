"""FGSM and BIM: the step taken, the ε ball, gradients through the routing, counts, ``matcaps attack``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_fixtures import write_tiny_mnist
from matcaps.adversarial import PixelModel, bim, fgsm, input_gradient
from matcaps.cli import main
from matcaps.data import prepare
from matcaps.data.transforms import DigitsTransform
from matcaps.errors import ConfigError
from matcaps.evaluate import load_for_testing
from matcaps.models import CapsNet, CapsNetConfig, CNNBaseline, CNNBaselineConfig
from matcaps.robustness import AttackSettings, attack_checkpoint, load_attack_report
from matcaps.routing import EMRoutingConfig

#: 16×16 images: conv1 → 8×8, ConvCaps1 → 3×3, ConvCaps2 → 1×1; 3 EM iterations.
TINY_CAPSULES = CapsNetConfig(num_classes=10, image_size=16, conv1_channels=8, primary_types=2, conv_caps1_types=2,
                              conv_caps2_types=2, routing=EMRoutingConfig(iterations=3))  # fmt: skip
QUIET = ["--no-progress", "--workers", "0"]


def exit_code(arguments: list[str]) -> int:
    """``main``'s exit code, also for command-line syntax errors (which argparse ends with SystemExit)."""
    try:
        return main(arguments)
    except SystemExit as exit_info:
        return int(exit_info.code)


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """See :func:`conftest.single_thread`."""


def tiny_pixel_model(kind: str = "capsules", dtype: torch.dtype = torch.float64) -> PixelModel:
    torch.manual_seed(0)
    network = CapsNet(TINY_CAPSULES) if kind == "capsules" else CNNBaseline(
        CNNBaselineConfig(num_classes=10, image_size=16, hidden_units=16))
    network.to(dtype).eval()
    return PixelModel(network, DigitsTransform().normalise).eval()


def interior_pixels(count: int = 6, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Pixels in [0.2, 0.8]: a step of 0.05 never reaches the clipping range."""
    generator = torch.Generator().manual_seed(seed)
    return (0.2 + 0.6 * torch.rand(count, 1, size, size, generator=generator)).double()


@pytest.mark.parametrize("kind", ["capsules", "cnn"])
@pytest.mark.parametrize("targeted", [False, True])
def test_fgsm_moves_every_pixel_by_exactly_epsilon_along_the_gradient_sign(kind, targeted):
    model = tiny_pixel_model(kind)
    pixels, classes = interior_pixels(), torch.arange(6) % 10
    epsilon = 0.05
    adversarial = fgsm(model, pixels, classes, epsilon, targeted=targeted)
    # the gradient, recomputed here from the definition: the cross-entropy of the scores of the standardised image
    x = pixels.clone().requires_grad_(True)
    scores = model.network(DigitsTransform().normalise(x)).scores
    (gradient,) = torch.autograd.grad(F.cross_entropy(scores, classes, reduction="sum"), x)
    assert (gradient != 0).float().mean() > 0.99
    expected_step = (-1 if targeted else 1) * epsilon * gradient.sign()
    torch.testing.assert_close(adversarial - pixels, expected_step, rtol=0, atol=1e-15)
    assert torch.equal((adversarial - pixels).abs() > 0.0499, gradient != 0)


def test_fgsm_clips_to_the_pixel_range():
    model = tiny_pixel_model()
    pixels = interior_pixels()
    pixels[:, :, :4] = 0.0
    pixels[:, :, -4:] = 1.0
    adversarial = fgsm(model, pixels, torch.zeros(6, dtype=torch.long), 0.3)
    gradient = input_gradient(model, pixels, torch.zeros(6, dtype=torch.long))
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    torch.testing.assert_close(adversarial, (pixels + 0.3 * gradient.sign()).clamp(0, 1), rtol=0, atol=1e-15)


def test_the_input_gradient_through_three_em_iterations_equals_finite_differences():
    """The attack's gradient is the exact derivative of the network, routing included, in evaluation mode."""
    model = tiny_pixel_model()
    pixels, labels = interior_pixels(count=2), torch.tensor([3, 7])
    gradient = input_gradient(model, pixels, labels)

    def loss(x: torch.Tensor) -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(x.view_as(pixels)), labels, reduction="sum"))

    def central_difference(index: int, step: float) -> float:
        plus, minus = pixels.clone().view(-1), pixels.clone().view(-1)
        plus[index] += step
        minus[index] -= step
        return (loss(plus) - loss(minus)) / (2 * step)

    for index in np.random.default_rng(0).choice(pixels.numel(), size=12, replace=False):
        # Richardson extrapolation cancels the step² error of the central differences: the routing makes the
        # loss so curved that plain differences with a step of 1e-6 are off by up to 2 %
        numeric = (4 * central_difference(index, 1e-7) - central_difference(index, 2e-7)) / 3
        assert gradient.view(-1)[index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_bim_stays_in_the_epsilon_ball_and_the_pixel_range():
    model = tiny_pixel_model()
    pixels = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(3)).double()
    pixels[0] = 0.0  # a black image: only upward moves are possible
    labels = torch.arange(6)
    for targeted in (False, True):
        adversarial = bim(model, pixels, labels, epsilon=0.03, iterations=6, step_size=0.02, targeted=targeted)
        assert (adversarial - pixels).abs().max() <= 0.03 + 1e-12
        assert adversarial.min() >= 0 and adversarial.max() <= 1
        assert (adversarial - pixels).abs().max() > 0.029  # the steps reach the ball's boundary


def test_bim_with_one_step_of_epsilon_is_fgsm():
    model = tiny_pixel_model()
    pixels, labels = interior_pixels(), torch.arange(6)
    torch.testing.assert_close(bim(model, pixels, labels, 0.04, 1, 0.04), fgsm(model, pixels, labels, 0.04),
                               rtol=0, atol=1e-15)  # fmt: skip


def test_bim_lowers_accuracy_at_least_as_much_as_fgsm_on_a_fitted_model():
    """A sanity check of the direction: FGSM and BIM raise the loss of the true class (untargeted)."""
    model = tiny_pixel_model("cnn")
    pixels, labels = interior_pixels(count=8), torch.arange(8)
    with torch.no_grad():
        clean = F.cross_entropy(model(pixels), labels)
        after_fgsm = F.cross_entropy(model(fgsm(model, pixels, labels, 0.01)), labels)
        after_bim = F.cross_entropy(model(bim(model, pixels, labels, 0.01, 5, 0.005)), labels)
    assert after_fgsm > clean and after_bim > clean


@pytest.mark.parametrize("changes, message", [
    ({"epsilons": (1.5,)}, "epsilon must be between 0 and 1"),
    ({"epsilons": ()}, "at least one epsilon"),
    ({"methods": ("pgd",)}, "unknown attack method 'pgd'"),
    ({"bim_iterations": 0}, "--bim-iterations must be at least 1"),
    ({"limit": 0}, "--limit must be at least 1"),
    ({"loss": "hinge"}, "unknown attack loss"),
])  # fmt: skip
def test_bad_attack_settings(changes, message):
    with pytest.raises(ConfigError, match=message):
        AttackSettings(**changes)


# ------------------------------------------------------------------------------------- on a trained run, end to end


@pytest.fixture(scope="module")
def mnist_runs(tmp_path_factory) -> dict[str, Path]:
    """A capsule run and a CNN run, a few steps each on a tiny generated MNIST."""
    root = tmp_path_factory.mktemp("data")
    write_tiny_mnist(root, n_train=60, n_test=30)
    prepare("mnist", root, download=False, progress=False, verify=False)
    runs = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    common = ["--dataset", "mnist", "--data-root", str(root), "--val-size", "10", "--batch-size", "10",
              "--max-steps", "6", *QUIET]  # fmt: skip
    try:
        assert main(["train", *common, "--run-dir", str(runs / "caps"), "--model-option", "conv1_channels=8",
                     "--model-option", "primary_types=2", "--model-option", "conv_caps1_types=2",
                     "--model-option", "conv_caps2_types=2"]) == 0  # fmt: skip
        assert main(["train", *common, "--run-dir", str(runs / "cnn"), "--model", "cnn-baseline", "--lr", "1e-3",
                     "--model-option", "hidden_units=32"]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return {"caps": runs / "caps", "cnn": runs / "cnn", "data": root}


def recount(run: Path, epsilon: float, limit: int, seed: int) -> tuple[int, int, int]:
    """(correct untargeted FGSM, correct targeted FGSM, targets hit), computed here image by image from the definitions."""
    loaded = load_for_testing(run, "best", device="cpu")
    network, dataset = loaded.model, loaded.test_set
    transform = dataset.transform
    indices = np.sort(np.random.default_rng(seed).choice(len(dataset), size=limit, replace=False))
    labels = torch.as_tensor(dataset.labels[indices])
    targets = (labels + torch.as_tensor(np.random.default_rng([seed, 1]).integers(1, 10, size=limit))) % 10
    images = np.load(dataset.images_path, mmap_mode="r")
    pixels = torch.stack([torch.from_numpy(np.array(images[dataset.rows[i]])).float().div(255).unsqueeze(0)
                          for i in indices])  # fmt: skip
    counts = []
    for classes, sign in ((labels, 1.0), (targets, -1.0)):
        x = pixels.clone().requires_grad_(True)
        loss = F.cross_entropy(network(transform.normalise(x)).scores, classes, reduction="sum")
        (gradient,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            predictions = network(transform.normalise((pixels + sign * epsilon * gradient.sign()).clamp(0, 1))).scores.argmax(1)
        counts.append(predictions)
    return int((counts[0] == labels).sum()), int((counts[1] == labels).sum()), int((counts[1] == targets).sum())


@pytest.mark.parametrize("which", ["caps", "cnn"])
def test_reported_fgsm_accuracy_and_success_equal_a_recount(mnist_runs, which):
    run = mnist_runs[which]
    settings = AttackSettings(methods=("fgsm",), epsilons=(0.0, 0.2), limit=20, seed=4)
    report = attack_checkpoint(load_for_testing(run, "best", device="cpu"), settings, batch_size=20, progress=False)
    correct_untargeted, correct_targeted, hits = recount(run, 0.2, 20, 4)
    untargeted, targeted = report.result("fgsm", "untargeted", 0.2), report.result("fgsm", "targeted", 0.2)
    assert (untargeted["correct"], targeted["correct"], targeted["target_hits"]) == (correct_untargeted, correct_targeted, hits)
    assert untargeted["accuracy"] == correct_untargeted / 20 and targeted["success_rate"] == hits / 20
    assert report.result("fgsm", "untargeted", 0.0)["accuracy"] == report.clean_accuracy
    assert report.num_images == 20 and len(report.subset_indices) == 20 and report.test_set_size == 30


def test_attack_command_writes_the_table_json_and_plot_and_draws_several_runs(mnist_runs, tmp_path, capsys):
    caps, cnn = mnist_runs["caps"], mnist_runs["cnn"]
    arguments = ["--eps", "0", "0.1", "--bim-iterations", "2", "--limit", "12", "--batch-size", "6", "--no-progress"]
    assert main(["attack", str(caps), *arguments]) == 0
    out = capsys.readouterr().out
    report_file = caps / "attack-standard-best.json"
    assert report_file.is_file() and (caps / "attack-standard-best.png").is_file()
    values = json.loads(report_file.read_text())
    assert "25.5 of 255 grey levels" in values["epsilon_units"] and values["pixel_range"] == [0.0, 1.0]
    assert values["num_images"] == 12 and values["bim_step_size"] == "2.5 * epsilon / 2"
    rows = {(r["method"], r["mode"], r["epsilon"]) for r in values["results"]}
    assert rows == {(m, mode, e) for m in ("fgsm", "bim") for mode in ("untargeted", "targeted") for e in (0.0, 0.1)}
    assert all(r["success_rate"] is None for r in values["results"] if r["mode"] == "untargeted")
    assert "fgsm   untargeted" in out and "target success" in out
    # a saved report and a new run on one plot, named
    plot = tmp_path / "both.png"
    assert main(["attack", str(report_file), str(cnn), *arguments, "--plot", str(plot), "--labels", "capsules",
                 "CNN"]) == 0  # fmt: skip
    assert plot.stat().st_size > 10_000
    assert load_attack_report(cnn / "attack-standard-best.json").label == "CNN"
    assert load_attack_report(report_file).label == "caps"  # a report given again is drawn, not rewritten
    # --output names the report (and the plot beside it)
    assert main(["attack", str(cnn), *arguments, "--methods", "fgsm", "--output", str(tmp_path / "fgsm.json")]) == 0
    assert {r["method"] for r in load_attack_report(tmp_path / "fgsm.json").results} == {"fgsm"}
    assert (tmp_path / "fgsm.png").is_file()


@pytest.mark.parametrize("arguments, message", [
    (["--eps", "2"], "epsilon must be between 0 and 1"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--labels", "a", "b"], "--labels names 2 target(s) but 1 were given"),
    (["--plot", "x.pdf"], "--plot must name a .png file"),
    (["--output", "x.txt"], "--output names the .json report of one attacked target"),
    (["--split", "azimuth"], "needs viewpoint information"),
    (["--methods", "pgd"], "invalid choice: 'pgd'"),
])  # fmt: skip
def test_bad_attack_options_give_one_line(mnist_runs, arguments, message, capsys):
    assert exit_code(["attack", str(mnist_runs["caps"]), "--no-progress", *arguments]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]


def test_attack_targets_that_are_not_runs_or_reports_give_one_line(mnist_runs, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"label": 1}')
    for arguments, message in (
        ([str(tmp_path / "missing")], "is neither a run directory nor a checkpoint file"),
        ([str(mnist_runs["caps"]), str(mnist_runs["cnn"])], "several targets are drawn on one plot"),
        ([str(bad)], "is not an attack report"),
    ):  # fmt: skip
        assert main(["attack", *arguments, "--no-progress"]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and message in error[0], (arguments, error)

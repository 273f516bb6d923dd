"""Image folders (``--dataset folder``): layouts, seeded and folder splits, grey and colour, broken files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from train_support import TINY_MODEL_OPTIONS

from matcaps.cli import main
from matcaps.data import DataConfig, load_splits
from matcaps.data.folders import FolderOptions, scan_folder
from matcaps.errors import ConfigError, DataFormatError, DatasetNotFoundError
from matcaps.train import load_checkpoint

CLASSES = ("circle", "square")


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """See :func:`conftest.single_thread`."""


def draw(path: Path, label: int, size: tuple[int, int] = (24, 20), colour: bool = False, seed: int = 0) -> Path:
    """A PNG or JPEG (by suffix) with a bright disc (label 0) or square (label 1) on noise."""
    rng = np.random.default_rng(seed)
    height, width = size
    y, x = np.mgrid[:height, :width]
    cy, cx, r = height / 2, width / 2, min(height, width) / 3
    shape = (np.hypot(y - cy, x - cx) < r) if label == 0 else ((abs(y - cy) < r) & (abs(x - cx) < r))
    grey = (rng.integers(0, 50, (height, width)) + 200 * shape).clip(0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.stack([grey, grey // 2, 255 - grey], axis=-1) if colour else grey)
    image.save(path)
    return path


def make_folder(root: Path, per_class: int = 10, colour_one: bool = False) -> Path:
    for label, name in enumerate(CLASSES):
        for i in range(per_class):
            suffix = ".jpg" if i % 3 == 2 else ".png"
            draw(root / name / f"{i:02d}{suffix}", label, size=(20 + i, 24), seed=10 * label + i)
    if colour_one:
        draw(root / "square" / "colour.PNG", 1, colour=True)
    (root / "circle" / "notes.txt").write_text("not an image\n")
    draw(root / "circle" / ".hidden.png", 0)
    return root


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def folder_config(root: Path, **options) -> DataConfig:
    validation = options.pop("validation", True)
    return DataConfig(dataset="folder", root=root, validation=validation, seed=options.pop("seed", 0),
                      folder=FolderOptions(**options))  # fmt: skip


def test_seeded_split_is_stratified_disjoint_and_reproducible(tmp_path):
    root = make_folder(tmp_path / "images")
    scan = scan_folder(root, FolderOptions(val_fraction=0.25, test_fraction=0.2), validation=True, seed=0)
    assert scan.class_names == CLASSES
    every = [item for files in scan.files.values() for item in files]
    assert len(every) == len(set(every)) == 20  # hidden files and notes.txt are not images
    for split, per_class in (("test", 2), ("val", 2), ("train", 6)):  # 10 → 2 test; 8 → 2 validation; 6 left
        labels = [label for _, label in scan.files[split]]
        assert labels.count(0) == labels.count(1) == per_class, split
    assert scan_folder(root, FolderOptions(val_fraction=0.25), True, seed=0) == scan_folder(root, FolderOptions(val_fraction=0.25), True, seed=0)
    assert scan_folder(root, FolderOptions(val_fraction=0.25), True, seed=1).files["test"] != scan.files["test"]


def test_split_by_folders_and_the_loaded_images(tmp_path):
    root = tmp_path / "images"
    make_folder(root / "train", per_class=4)
    make_folder(root / "test", per_class=2)
    make_folder(root / "val", per_class=1)
    splits = load_splits(folder_config(root, image_size=16))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 2, 4)
    assert splits.info.class_names == CLASSES and splits.info.channels == 1 and splits.info.image_size == 16
    image, label = splits.test[0]
    assert image.shape == (1, 16, 16) and abs(float(image.mean())) < 1e-5 and label.item() in (0, 1)
    expected = np.asarray(Image.open(root / "test" / "circle" / "00.png").convert("L"))
    from matcaps.data.images import fit_square

    assert np.array_equal(splits.test.images()[0], fit_square(expected, 16))  # shorter side resized, centre crop
    no_val = load_splits(folder_config(root, validation=False))
    assert no_val.val is None and len(no_val.train) == 8


def test_colour_is_detected_and_can_be_forced_to_grey(tmp_path):
    root = make_folder(tmp_path / "images", per_class=5, colour_one=True)
    colour = load_splits(folder_config(root, validation=False))
    assert colour.info.channels == 3 and colour.train[0][0].shape == (3, 32, 32)
    grey = load_splits(folder_config(root, validation=False, channels=1))
    assert grey.info.channels == 1 and grey.train[0][0].shape == (1, 32, 32)


def test_a_broken_image_stops_with_its_name_or_is_skipped_and_counted(tmp_path):
    root = make_folder(tmp_path / "images")
    broken = truncate(root / "square" / "03.png")
    with pytest.raises(DataFormatError) as caught:
        load_splits(folder_config(root))
    assert str(broken) in str(caught.value) and "\n" not in str(caught.value) and "--bad-images skip" in str(caught.value)
    splits = load_splits(folder_config(root, bad_images="skip"))
    skipped = [item for d in (splits.train, splits.val, splits.test) for item in d.skipped]
    assert [path for path, _ in skipped] == [broken]
    assert len(splits.train) + len(splits.val) + len(splits.test) == 19


@pytest.mark.parametrize("layout, message", [
    ("missing", "does not exist"),
    ("empty", "no class sub-folder"),
    ("train-only", "has train/ but no test/"),
    ("stray-test-class", "'triangle' of the test set is not a class of the training set"),
    ("one-image-class", "no training image left for class 'square'"),
])  # fmt: skip
def test_folder_layout_errors_name_the_folder(layout, message, tmp_path):
    root = tmp_path / "images"
    if layout == "empty":
        root.mkdir()
    elif layout == "train-only":
        make_folder(root / "train", per_class=2)
    elif layout == "stray-test-class":
        make_folder(root / "train", per_class=2)
        make_folder(root / "test", per_class=1)
        draw(root / "test" / "triangle" / "0.png", 0)
    elif layout == "one-image-class":
        make_folder(root, per_class=3)
        for path in sorted((root / "square").iterdir())[1:]:
            path.unlink()
    with pytest.raises((DataFormatError, DatasetNotFoundError), match=message) as caught:
        load_splits(folder_config(root, test_fraction=0.5))
    assert "\n" not in str(caught.value)


def test_folder_options_are_checked():
    with pytest.raises(ConfigError, match="--test-fraction"):
        FolderOptions(test_fraction=1.0)
    with pytest.raises(ConfigError, match="--channels"):
        FolderOptions(channels=2)
    with pytest.raises(ConfigError, match="--image-size"):
        FolderOptions(image_size=8)
    with pytest.raises(ConfigError, match="image folders"):
        DataConfig(dataset="mnist", folder=FolderOptions(image_size=32))


def test_train_test_and_predict_on_an_image_folder(tmp_path, capsys, monkeypatch):
    root = make_folder(tmp_path / "images", per_class=8)
    broken = truncate(root / "circle" / "05.jpg")  # a truncated JPEG
    run = tmp_path / "run"
    options = ["train", "--dataset", "folder", "--data-root", str(root), "--image-size", "16", "--run-dir", str(run),
               "--epochs", "2", "--batch-size", "4", "--workers", "0", "--no-progress", "--device", "cpu",
               "--histogram-every", "0"]  # fmt: skip
    for key, value in TINY_MODEL_OPTIONS.items():
        options += ["--model-option", f"{key}={value}"]
    assert main(options) == 2  # the broken file stops the run, named
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(broken) in lines[0]

    assert main([*options, "--bad-images", "skip"]) == 0
    err = capsys.readouterr().err
    assert f"skipped {broken}: corrupted or truncated image" in err and "skipped 1 of 16 images" in err
    monkeypatch.chdir(tmp_path)
    assert main(["test", str(run), "--no-progress", "--workers", "0"]) == 0
    report = json.loads((run / "test-standard-best.json").read_text())
    assert report["dataset"] == "folder" and report["class_names"] == list(CLASSES) and report["num_images"] == 4
    capsys.readouterr()
    image = draw(tmp_path / "new.jpg", 1, size=(40, 30))
    assert main(["predict", str(run), str(image), "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["images"][0]["scores"]) == set(CLASSES)
    assert load_checkpoint(run / "best.pt")["class_names"] == list(CLASSES)

    # a renamed class folder changes the labels the folder's order gives: refused, not mis-scored
    (root / CLASSES[0]).rename(root / f"z{CLASSES[0]}")
    report_bytes, last_bytes = (run / "test-standard-best.json").read_bytes(), (run / "last.pt").read_bytes()
    for command in (["test", str(run), "--no-progress", "--workers", "0"],
                    ["train", "--resume", str(run), "--epochs", "3", "--no-progress", "--workers", "0"]):
        assert main(command) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("skipped ")]
        assert len(errors) == 1 and f"was trained on {', '.join(CLASSES)}" in errors[0], errors
    assert (run / "test-standard-best.json").read_bytes() == report_bytes
    assert (run / "last.pt").read_bytes() == last_bytes
    assert main(["predict", str(run), str(image), "--format", "json"]) == 0  # the names travel in the checkpoint
    assert json.loads(capsys.readouterr().out) == result

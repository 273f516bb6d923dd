"""Checkpoint files: atomic writes, clear errors for damaged files, RNG round trip, sampler positions."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from train_support import TinyImages, tiny_config, tiny_model_config

from matcaps.errors import CheckpointError
from matcaps.train import LAST_CHECKPOINT, EpochBatchSampler, load_checkpoint, resolve_checkpoint, save_atomic, train_run
from matcaps.train.checkpoint import CHECKPOINT_FORMAT, capture_rng_state, restore_rng_state


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / LAST_CHECKPOINT
    save_atomic({"format": CHECKPOINT_FORMAT, "value": torch.arange(3)}, path)
    with pytest.raises(Exception):
        save_atomic({"format": CHECKPOINT_FORMAT, "value": lambda: None}, path)  # cannot be pickled
    assert torch.equal(load_checkpoint(path)["value"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == [LAST_CHECKPOINT]  # no temporary file left behind


def test_checkpoints_get_the_permissions_of_an_ordinary_new_file(tmp_path):
    import os
    import stat

    ordinary = tmp_path / "ordinary"
    ordinary.write_bytes(b"")
    save_atomic({"format": CHECKPOINT_FORMAT}, tmp_path / LAST_CHECKPOINT)
    mode = stat.S_IMODE(os.stat(tmp_path / LAST_CHECKPOINT).st_mode)
    assert mode == stat.S_IMODE(os.stat(ordinary).st_mode)


def test_damaged_or_foreign_files_raise_checkpoint_errors(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic({"format": CHECKPOINT_FORMAT, "value": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="is not a matcaps checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt")


def test_rng_states_round_trip():
    state = capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    restore_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


#: Devices a checkpoint can be loaded onto here (``train_run`` loads onto the training device).
MAP_LOCATIONS = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("map_location", MAP_LOCATIONS)
def test_rng_states_round_trip_through_a_checkpoint_loaded_onto_any_device(tmp_path, map_location):
    """``--resume`` on CUDA loads the checkpoint onto the GPU, RNG states included."""
    path = tmp_path / LAST_CHECKPOINT
    save_atomic({"format": CHECKPOINT_FORMAT, "rng": capture_rng_state()}, path)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    cuda_expected = torch.rand(3, device="cuda") if torch.cuda.is_available() else None
    loaded = load_checkpoint(path, map_location=map_location)["rng"]
    assert loaded["torch"].device.type == map_location and loaded["numpy"]["keys"].device.type == map_location
    restore_rng_state(loaded)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]
    if cuda_expected is not None:
        assert torch.equal(torch.rand(3, device="cuda"), cuda_expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_a_run_on_cuda_resumes(tmp_path):
    config = tiny_config(epochs=1, device="cuda")
    train_run(config, tiny_model_config(config), TinyImages(40), None, tmp_path / "run")
    longer = config.replace(epochs=2)
    result = train_run(longer, tiny_model_config(longer), TinyImages(40), None, tmp_path / "run", resume=True)
    assert load_checkpoint(tmp_path / "run" / LAST_CHECKPOINT)["state"]["step"] == 10, result


def test_sampler_order_depends_only_on_seed_and_epoch_and_can_skip():
    sampler = EpochBatchSampler(50, 8, seed=5)
    sampler.set_epoch(2)
    epoch_two = list(sampler)
    sampler.set_epoch(3)
    assert list(sampler) != epoch_two
    again = EpochBatchSampler(50, 8, seed=5)
    again.set_epoch(2, start_batch=4)
    assert list(again) == epoch_two[4:]
    assert sorted(i for batch in epoch_two for i in batch) == sorted(set(i for batch in epoch_two for i in batch))


def test_a_run_without_validation_keeps_no_best_and_tests_the_last(tmp_path):
    config = tiny_config(epochs=1)
    train_run(config, tiny_model_config(config), TinyImages(40), None, tmp_path / "run")
    assert not (tmp_path / "run" / "best.pt").exists()
    assert resolve_checkpoint(tmp_path / "run", "best") == tmp_path / "run" / LAST_CHECKPOINT
    with pytest.raises(CheckpointError, match="has no last.pt"):
        resolve_checkpoint(tmp_path, "last")

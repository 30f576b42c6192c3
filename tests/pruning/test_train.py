from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_vit
from vitslim.pruning.data import digits_splits
from vitslim.pruning.errors import PruningError
from vitslim.pruning.train import TrainConfig, cosine_lr_factor, distillation_loss, evaluate, fit


def test_cosine_schedule_warms_up_then_decays():
    factors = [cosine_lr_factor(s, 100, 10, 0.01) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:])) and factors[-1] == pytest.approx(0.01, abs=1e-3)


def test_distillation_loss_is_zero_for_equal_logits():
    logits = torch.randn(4, 10)
    assert distillation_loss(logits, logits, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(logits, -logits, 2.0).item() > 0.1


def test_bad_config_is_refused():
    with pytest.raises(PruningError, match="distill_weight"):
        TrainConfig(distill_weight=2.0)
    with pytest.raises(PruningError, match="batch_size"):
        TrainConfig(batch_size=0)


def test_short_training_learns_digits(tmp_path):
    data = digits_splits(3, (16, 16))
    model = tiny_vit(num_classes=10)
    before = evaluate(model, data.val)
    result = fit(
        model,
        data,
        TrainConfig(epochs=10, lr=2e-3, augment="none"),
        checkpoint_path=tmp_path / "train.pt",
        progress=False,
    )
    assert len(result.history) == 10 and result.history[-1]["loss"] < result.history[0]["loss"]
    # Learning, not a trained accuracy (which moves by CPU): the loss falls by a third and top-1 is
    # well above chance (10 %).
    assert result.history[-1]["loss"] < 0.67 * result.history[0]["loss"]
    assert result.val_top1 > max(before, 25.0)
    assert (tmp_path / "train.pt").is_file()
    assert not model.training


def test_fit_resumes_where_it_was_interrupted_with_identical_weights(tmp_path):
    data = digits_splits(3, (16, 16))
    config = TrainConfig(epochs=3, batch_size=128, augment="affine")  # affine: the torch generator matters
    reference = tiny_vit(num_classes=10)
    fit(reference, data, config, progress=False)
    steps = iter(range(10**6))

    def interrupt_in_epoch_2():
        if next(steps) == 15:  # 11 steps per epoch
            raise KeyboardInterrupt
        return 0.0

    with pytest.raises(KeyboardInterrupt):
        fit(
            tiny_vit(num_classes=10),
            data,
            config,
            checkpoint_path=tmp_path / "train.pt",
            extra_loss=interrupt_in_epoch_2,
            progress=False,
        )
    resumed = tiny_vit(num_classes=10)
    result = fit(resumed, data, config, checkpoint_path=tmp_path / "train.pt", progress=False)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()))


def test_pure_distillation_moves_the_student_toward_the_teacher():
    data = digits_splits(3, (16, 16))
    teacher, student = tiny_vit(num_classes=10, seed=5), tiny_vit(num_classes=10, seed=6)
    images = torch.stack([data.val[i][0] for i in range(64)])

    def gap() -> float:
        with torch.no_grad():
            return distillation_loss(student(images), teacher(images), 1.0).item()

    before = gap()
    fit(
        student,
        data,
        TrainConfig(epochs=1, lr=1e-3, distill_weight=1.0, augment="none"),
        teacher=teacher,
        progress=False,
    )
    assert gap() < 0.5 * before


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(tmp_path):
    """torchrun with the gloo backend: both ranks train and end with identical weights."""
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(worker.parents[1])}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(worker),
        str(tmp_path),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    ranks = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert ranks[0][0] == ranks[1][0] == "2"
    assert ranks[0][2] == ranks[1][2], "DDP replicas diverged"
    assert ranks[0][1] != ranks[0][2], "weights did not change"


def test_augmentation_defaults_follow_the_data(tmp_path):
    """DeiT's recipe on ImageFolder data, affine jitter on digits; explicit settings win; Mixup needs even batches."""
    import numpy as np
    from PIL import Image
    from vitslim.pruning.data import augmented_dataset, load_data
    from vitslim.pruning.train import resolve_augmentation

    digits = resolve_augmentation(TrainConfig(), digits_splits(3, (16, 16)))
    assert (digits.policy, digits.mixup, digits.cutmix) == ("affine", 0.0, 0.0)
    jittered = augmented_dataset(digits_splits(3, (16, 16)).train, "affine")
    assert jittered[0][0].shape == (3, 16, 16) and jittered[0][1] == digits_splits(3, (16, 16)).train[0][1]
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(4):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                tmp_path / name / f"{i}.png"
            )
    folder = load_data(str(tmp_path), 3, (16, 16))
    deit = resolve_augmentation(TrainConfig(), folder)
    assert deit.policy == "rand-m9-mstd0.5-inc1" and (deit.mixup, deit.cutmix) == (0.8, 1.0)
    assert resolve_augmentation(TrainConfig(augment="none", mixup=0, cutmix=0), folder).policy is None
    # 'affine' and 'none' on image files: no Mixup/CutMix unless asked for (issue 24)
    for plain in ("affine", "none"):
        assert (
            resolve_augmentation(TrainConfig(augment=plain), folder).mixup,
            resolve_augmentation(TrainConfig(augment=plain), folder).cutmix,
        ) == (0.0, 0.0)
    assert resolve_augmentation(TrainConfig(augment="affine", mixup=0.2), folder).mixup == 0.2
    augmented = augmented_dataset(folder.train, deit.policy)
    assert len(augmented) == len(folder.train) and augmented[0][0].shape == folder.train[0][0].shape
    assert torch.equal(folder.train[0][0], folder.train[0][0]), "the plain training set stays deterministic"
    with pytest.raises(PruningError, match="must be even"):
        resolve_augmentation(TrainConfig(batch_size=33), folder)
    with pytest.raises(PruningError, match="needs image files"):
        augmented_dataset(digits_splits(3, (16, 16)).train, deit.policy)


def test_mixup_and_label_smoothing_train(tmp_path):
    model = tiny_vit(num_classes=10)
    result = fit(
        model,
        digits_splits(3, (16, 16)),
        TrainConfig(epochs=1, batch_size=32, augment="none", mixup=0.8, cutmix=1.0, label_smoothing=0.1),
        progress=False,
    )
    assert result.augmentation == {"policy": None, "mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1}
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_training_that_diverges_stops_with_one_line_and_no_nan_weights(tmp_path):
    """A learning rate so large that the weights overflow: the next non-finite loss stops training
    (nothing NaN is returned or saved), and NaN or infinite settings are refused up front."""
    from vitslim.pruning.errors import PruningError

    data = digits_splits(3, (16, 16))
    with pytest.raises(PruningError, match="training diverged in epoch 1"):
        fit(tiny_vit(num_classes=10), data, TrainConfig(epochs=1, lr=1e30, augment="none"), progress=False)
    for bad in ({"lr": float("inf")}, {"warmup_epochs": float("nan")}):
        with pytest.raises(PruningError, match="must be a finite number"):
            TrainConfig(**bad)

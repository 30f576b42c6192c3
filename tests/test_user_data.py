"""A user's own ImageFolder, as a user meets it: `train`, each method's fine-tuning in `prune`, a
recipe and the API, all with the default augmentation (DeiT's RandAugment, Mixup, CutMix) and the
same augmentation settings; a failure inside the data loader is one line with exit 3."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from vitslim.pruning.data import guarded_batches
from vitslim.pruning.errors import PruningError

from vitslim.cli import main
from vitslim.core.errors import EXIT_BAD_INPUT, EXIT_OK

KWARGS = ["img_size=16", "patch_size=4", "embed_dim=32", "depth=2", "num_heads=2", "num_classes=2"]
MODEL = ["--model", "deit_tiny_patch16_224", "--model-kwargs", *KWARGS]
DEIT_POLICY = "rand-m9-mstd0.5-inc1"


def write_image_folder(root, per_class: int = 6) -> None:
    """Two classes of 20x24 RGB images (not the model's 16x16: resized like a user's photos)."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 120, (20, 24, 3)) + 100 * label
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A dense run trained on an ImageFolder with every default (DeiT's augmentation, Mixup, CutMix)."""
    root = tmp_path_factory.mktemp("user-data")
    write_image_folder(root / "photos")
    common = ["--batch-size", "4", "--num-workers", "0"]
    assert (
        main(["train", *MODEL, "--data", str(root / "photos"), "--epochs", "1", *common, "--out", str(root / "dense")])
        == 0
    )
    info = json.loads((root / "dense" / "info.json").read_text())
    assert info["augmentation"] == {"policy": DEIT_POLICY, "mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.0}
    return root


METHOD_ARGS = {
    "vtp": ["--prune-ratio", "0.3", "--sparsity-epochs", "1"],
    "patch-slim": ["--epsilon", "0.05", "--calibration-images", "4", "--block-tuning-images", "4"],
    "dgssa-glad": ["--static-blocks", "1"],
}


@pytest.mark.parametrize("method", sorted(METHOD_ARGS))
def test_each_method_fine_tunes_on_an_image_folder_with_the_default_augmentation(dense, method):
    out = dense / f"{method}-default"
    argv = ["prune", str(dense / "dense"), "--method", method, *METHOD_ARGS[method], "--data", str(dense / "photos")]
    common = ["--finetune-epochs", "1", "--batch-size", "4", "--out", str(out)]
    assert main([*argv, *common]) == EXIT_OK
    report = json.loads((out / "info.json").read_text())
    assert report["augmentation"]["policy"] == DEIT_POLICY and report["augmentation"]["mixup"] == 0.8


def test_prune_takes_the_same_augmentation_settings_as_train(dense):
    """'affine' means no Mixup/CutMix unless asked; label smoothing reaches the fine-tuning."""
    out = dense / "vtp-affine"
    argv = ["prune", str(dense / "dense"), "--method", "vtp", *METHOD_ARGS["vtp"], "--data", str(dense / "photos")]
    common = ["--finetune-epochs", "1", "--batch-size", "3", "--out", str(out)]
    assert main([*argv, *common, "--augment", "affine", "--label-smoothing", "0.1"]) == EXIT_OK
    report = json.loads((out / "info.json").read_text())
    assert report["augmentation"] == {"policy": "affine", "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.1}


def test_the_api_prunes_an_image_folder_with_its_augmentation_settings(dense):
    from vitslim.pruning.run_dir import load_run

    import vitslim

    _, model = load_run(dense / "dense")
    data = vitslim.load_data(str(dense / "photos"), model)
    settings = dict(epsilon=0.05, calibration_images=4, block_tuning_images=4, finetune_epochs=1, batch_size=4)
    result = vitslim.prune(model, data, "patch-slim", augment="none", **settings)
    assert result.report["augmentation"]["policy"] is None and result.plan.method == "patch-slim"


def test_a_recipe_on_an_image_folder_passes_train_augmentation_to_each_method(dense):
    """`vitslim run` in a subprocess, as a user runs it; the method's section sets none of the
    augmentation settings, so its fine-tuning takes train's."""
    recipe = dense / "recipe.yaml"
    recipe.write_text(
        "name: photos\n"
        "model: {name: deit_tiny_patch16_224, kwargs: {" + ", ".join(k.replace("=", ": ") for k in KWARGS) + "}}\n"
        f"data: {dense / 'photos'}\n"
        "train: {epochs: 1, batch_size: 4, num_workers: 0, augment: affine, label_smoothing: 0.1}\n"
        "methods:\n  vtp: {prune_ratio: 0.3, sparsity_epochs: 1, finetune_epochs: 1, batch_size: 4}\n"
        "deploy: {latency: false, int8: false, engines: false}\n"
        f"out_dir: {dense / 'runs'}\n"
    )
    completed = subprocess.run(
        [sys.executable, "-m", "vitslim", "run", str(recipe)], capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == EXIT_OK, completed.stderr[-2000:]
    info = json.loads((dense / "runs" / "photos" / "vtp" / "info.json").read_text())
    assert info["augmentation"] == {"policy": "affine", "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.1}
    assert (dense / "runs" / "photos" / "summary.md").is_file()
    # progress by stage, with an overall ETA once a stage has been timed
    stages = [line for line in completed.stdout.splitlines() if line.startswith("run: stage")]
    assert stages[0] == "run: stage 1/4: dense (ETA after the first stage)", stages
    assert [line.split(": ")[2].split(" (")[0] for line in stages] == ["dense", "vtp", "export dense", "export vtp"]
    assert all(" s left)" in line or " min left)" in line for line in stages[1:]), stages


class Broken(Dataset):
    """A transform that fails on the third image, as a third-party augmentation can."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int):
        if index == 2:
            raise ValueError("bits must be between or equal to 1 and 8")
        return torch.zeros(3), 0


@pytest.mark.parametrize("workers", [0, 1])
def test_a_failure_inside_the_data_loader_is_one_line(workers):
    loader = DataLoader(Broken(), batch_size=2, num_workers=workers)
    with pytest.raises(PruningError) as raised:
        list(guarded_batches(loader, "training"))
    message = str(raised.value)
    assert "\n" not in message and "bits must be between or equal to 1 and 8" in message
    assert message.startswith("preparing a training batch failed") and "--augment" in message


def test_an_unreadable_image_in_a_loader_worker_is_one_line_exit_3(dense, capsys):
    broken = dense / "broken"
    write_image_folder(broken)
    (broken / "cat" / "0.png").write_bytes((broken / "cat" / "0.png").read_bytes()[:60])  # truncated
    argv = ["train", *MODEL, "--data", str(broken), "--epochs", "1", "--batch-size", "4", "--num-workers", "1"]
    assert main([*argv, "--out", str(dense / "never")]) == EXIT_BAD_INPUT
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "0.png" in lines[0] and "cannot be read" in lines[0], lines


def test_data_of_other_classes_is_refused_and_other_images_of_the_same_classes_are_named(dense, capsys, caplog):
    """The run records what it was trained on (source, class names, a digest of the file list)."""
    info = json.loads((dense / "dense" / "info.json").read_text())
    assert info["data_identity"]["classes"] == ["cat", "dog"] and info["data_identity"]["images"] == 12
    renamed = dense / "renamed"
    write_image_folder(renamed)
    (renamed / "dog").rename(renamed / "wolf")
    argv = ["prune", str(dense / "dense"), "--method", "vtp", *METHOD_ARGS["vtp"], "--finetune-epochs", "0"]
    assert main([*argv, "--data", str(renamed), "--out", str(dense / "never")]) == EXIT_BAD_INPUT
    assert "classes [cat, dog] but" in capsys.readouterr().err and not (dense / "never").exists()
    more = dense / "more"
    write_image_folder(more, per_class=7)
    assert main([*argv, "--batch-size", "4", "--data", str(more), "--out", str(dense / "more-run")]) == EXIT_OK
    assert "holds other images (14) than" in caplog.text

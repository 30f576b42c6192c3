from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from vitslim.pruning.data import digits_splits, load_data, split_indices
from vitslim.pruning.errors import PruningError


def test_split_is_deterministic_and_disjoint():
    train, val = split_indices(100)
    assert (train, val) == split_indices(100)
    assert not set(train) & set(val) and len(train) + len(val) == 100 and len(val) == 20


def test_digits_resized_and_replicated():
    data = digits_splits(3, (32, 32))
    image, label = data.train[0]
    assert image.shape == (3, 32, 32) and torch.equal(image[0], image[2])
    assert data.num_classes == 10 and len(data.train) + len(data.val) == 1797
    assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0


def _write_images(root, classes=("cat", "dog"), per_class=5):
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((20, 24, 3), 40 * i, dtype=np.uint8)).save(root / name / f"{i}.png")


def test_image_folder_split(tmp_path):
    _write_images(tmp_path)
    data = load_data(str(tmp_path), 3, (16, 16))
    assert data.num_classes == 2 and len(data.train) == 8 and len(data.val) == 2
    assert data.train[0][0].shape == (3, 16, 16)


def test_image_folder_with_train_and_val(tmp_path):
    _write_images(tmp_path / "train")
    _write_images(tmp_path / "val", per_class=2)
    data = load_data(str(tmp_path), 3, (16, 16))
    assert len(data.train) == 10 and len(data.val) == 4


def test_unreadable_data_dir(tmp_path):
    with pytest.raises(PruningError, match="neither 'digits' nor a readable directory"):
        load_data(str(tmp_path / "nope"), 3, (16, 16))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PruningError, match="is not an ImageFolder"):
        load_data(str(tmp_path / "empty"), 3, (16, 16))


def test_calibration_set_of_a_class_sorted_image_folder_holds_every_class(tmp_path):
    """ImageFolder sorts by class: the first images are all class 0; the draw must not be."""
    from vitslim.pruning.data import calibration_set

    _write_images(tmp_path / "data", classes=("a", "b", "c", "d"), per_class=6)
    data = load_data(str(tmp_path / "data"), 3, (8, 8))
    drawn = calibration_set(data.train, 8, seed=1)
    assert sorted(drawn.class_histogram) == [0, 1, 2, 3] and sum(drawn.class_histogram.values()) == 8
    assert max(drawn.class_histogram.values()) - min(drawn.class_histogram.values()) <= 1, "stratified"
    assert drawn.indices == calibration_set(data.train, 8, seed=1).indices, "seeded"
    assert drawn.indices != calibration_set(data.train, 8, seed=2).indices
    first, rest = drawn.split(4)
    assert len(set(first.class_histogram)) == 4 and not set(first.indices) & set(rest.indices)
    torch.testing.assert_close(drawn.images[0], data.train[drawn.indices[0]][0])


def test_deit_augmentation_survives_its_strongest_posterize(tmp_path):
    """DeiT's policy maps magnitude 10 (which mstd0.5 samples) to keeping 0 bits; Pillow >= 12
    refuses 0 bits, so ImageFolder training crashed in its first epoch. 0 bits is a black image."""
    from vitslim.pruning.data import DEIT_AUGMENT, augmented_dataset

    _write_images(tmp_path, per_class=3)
    data = load_data(str(tmp_path), 3, (16, 16))
    augmented = augmented_dataset(data.train, DEIT_AUGMENT)
    steps = augmented.dataset.transform.transforms
    (rand_augment,) = [step for step in steps if hasattr(step, "ops")]
    (posterize,) = [op for op in rand_augment.ops if "Posterize" in op.name]
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10, 0
    image = Image.fromarray(np.full((16, 16, 3), 200, dtype=np.uint8))
    assert np.asarray(posterize(image)).max() == 0
    posterize.magnitude = 5  # 2 bits kept: 200 -> 192
    assert np.asarray(posterize(image)).max() == 192
    image, _ = augmented[0]  # the whole transform still runs
    assert image.shape == (3, 16, 16)


def test_train_on_an_image_folder_with_the_default_augmentation(tmp_path):
    """`train` on a user's ImageFolder with every default (DeiT's RandAugment, Mixup, CutMix)."""
    from vitslim.cli import main

    _write_images(tmp_path / "data", per_class=4)
    model = [
        "--model",
        "deit_tiny_patch16_224",
        "--model-kwargs",
        "img_size=16",
        "patch_size=4",
        "embed_dim=32",
        "depth=1",
        "num_heads=2",
        "num_classes=2",
    ]
    assert (
        main(
            [
                "train",
                *model,
                "--data",
                str(tmp_path / "data"),
                "--epochs",
                "2",
                "--batch-size",
                "4",
                "--num-workers",
                "0",
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 0
    )
    info = json.loads((tmp_path / "run" / "info.json").read_text())
    assert info["augmentation"]["policy"] == "rand-m9-mstd0.5-inc1" and info["augmentation"]["mixup"] == 0.8


def test_an_image_over_pillow_s_pixel_limit_is_one_line(tmp_path, monkeypatch):
    """A decompression bomb: a small file that decodes to more pixels than Pillow allows."""
    from PIL import Image as PILImage
    from vitslim.pruning.data import read_image

    Image.new("RGB", (20, 24)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # 480 pixels: over twice the limit
    with pytest.raises(PruningError, match="bomb.png cannot be read \\(DecompressionBombError\\)"):
        read_image(str(tmp_path / "bomb.png"))


def test_a_subset_made_of_links_is_read_and_a_link_that_repeats_images_is_refused(tmp_path):
    from vitslim.pruning.data import load_data

    _write_images(tmp_path / "full")
    (tmp_path / "subset").mkdir()
    for name in ("cat", "dog"):
        (tmp_path / "subset" / name).symlink_to(tmp_path / "full" / name, target_is_directory=True)
    assert load_data(str(tmp_path / "subset"), 3, (16, 16)).identity["images"] == 10
    (tmp_path / "loop").mkdir()
    _write_images(tmp_path / "loop", classes=("a",))
    (tmp_path / "loop" / "a" / "up").symlink_to(tmp_path / "loop", target_is_directory=True)
    with pytest.raises(PruningError, match="holds a symlinked folder .* that repeats its images"):
        load_data(str(tmp_path / "loop"), 3, (16, 16))

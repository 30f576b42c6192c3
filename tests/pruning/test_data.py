from __future__ import annotations

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

"""Data sets: the built-in `digits` (scikit-learn's bundled handwritten digits) or an ImageFolder
directory, with deterministic train/val splits, resized to the model's input."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .errors import PruningError

SPLIT_SEED = 0
VAL_FRACTION = 0.2
# ImageNet statistics: what timm's ViT/DeiT checkpoints expect.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataSplits:
    train: Dataset
    val: Dataset
    num_classes: int
    source: str


def split_indices(n: int, val_fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """A deterministic shuffled split of range(n) into (train, val)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(round(n * val_fraction)))
    return sorted(order[n_val:]), sorted(order[:n_val])


def digits_images(in_chans: int, img_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits as [N, in_chans, H, W] normalised images and [N] labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    images = torch.nn.functional.interpolate(pixels, size=img_size, mode="bilinear", align_corners=False)
    images = (images - 0.5) / 0.5
    return images.expand(-1, in_chans, -1, -1).contiguous(), torch.tensor(digits.target, dtype=torch.long)


def digits_splits(in_chans: int, img_size: tuple[int, int]) -> DataSplits:
    images, labels = digits_images(in_chans, img_size)
    train, val = split_indices(len(labels))
    return DataSplits(TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val]), 10, "digits")


def _image_transform(in_chans: int, img_size: tuple[int, int]):
    from torchvision import transforms

    steps = [transforms.Resize(img_size), transforms.CenterCrop(img_size)]
    if in_chans == 1:
        steps.append(transforms.Grayscale(1))
    steps += [transforms.ToTensor(), transforms.Normalize(MEAN[:in_chans], STD[:in_chans])]
    return transforms.Compose(steps)


def _image_folder(path: Path, transform):
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, OSError) as error:
        raise PruningError(f"data directory {path} is not an ImageFolder ({error}): use DIR/CLASS/IMAGE.jpg") from None


def folder_splits(path: Path, in_chans: int, img_size: tuple[int, int]) -> DataSplits:
    """DIR/train and DIR/val if both exist, else a deterministic split of DIR/CLASS/*."""
    if not path.is_dir():
        raise PruningError(f"data {str(path)!r} is neither 'digits' nor a readable directory")
    transform = _image_transform(in_chans, img_size)
    if (path / "train").is_dir() and (path / "val").is_dir():
        train, val = _image_folder(path / "train", transform), _image_folder(path / "val", transform)
        if train.classes != val.classes:
            raise PruningError(f"data directory {path}: train and val have different classes")
        return DataSplits(train, val, len(train.classes), str(path))
    dataset = _image_folder(path, transform)
    if len(dataset) < 2:
        raise PruningError(f"data directory {path} holds {len(dataset)} image(s): need at least 2 to split")
    train, val = split_indices(len(dataset))
    return DataSplits(Subset(dataset, train), Subset(dataset, val), len(dataset.classes), str(path))


def load_data(source: str, in_chans: int, img_size: tuple[int, int]) -> DataSplits:
    """`source` is 'digits' or an ImageFolder directory."""
    if source == "digits":
        return digits_splits(in_chans, img_size)
    return folder_splits(Path(source), in_chans, img_size)


def calibration_batch(dataset: Dataset, count: int) -> torch.Tensor:
    """The first `count` images of `dataset` stacked as [count, C, H, W] (deterministic)."""
    count = min(count, len(dataset))
    return torch.stack([dataset[i][0] for i in range(count)])

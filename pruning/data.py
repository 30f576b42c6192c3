"""Data sets: the built-in `digits` (scikit-learn's bundled handwritten digits) or an ImageFolder
directory, with deterministic train/val splits, resized to the model's input."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .errors import PruningError

DIGITS = "digits"  # the built-in data set's name
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
    # What the data is, for run directories to record and later commands to check: the source, the
    # class names, the image count and a digest of the file list (names and labels, not contents)
    identity: dict = field(default_factory=dict, compare=False)

    @property
    def image_files(self) -> bool:
        """Decoded from image files (an ImageFolder), not held in memory as tensors (digits)."""
        return self.source != DIGITS


def split_indices(n: int, val_fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """A deterministic shuffled split of range(n) into (train, val)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(round(n * val_fraction)))
    return sorted(order[n_val:]), sorted(order[:n_val])


def preprocessing(source: str, in_chans: int, img_size: tuple[int, int]) -> dict:
    """How a raw image of `source` becomes the model's input: what the transforms below do, and
    what an exported model and its engine carry (ONNX metadata, engine manifest) so that whoever
    feeds them prepares images the same way."""
    height, width = img_size
    common = {
        "layout": "NCHW",
        "dtype": "float32",
        "channels": in_chans,
        "resize": [height, width],
        "crop": [height, width],
    }
    if source == DIGITS:
        return {
            **common,
            "source": DIGITS,
            "input": "8x8 grayscale, values 0..16",
            "scale": 1 / 16,
            "interpolation": "bilinear",
            "channel_order": "gray" if in_chans == 1 else f"gray repeated to {in_chans} channels",
            "mean": [0.5] * in_chans,
            "std": [0.5] * in_chans,
        }
    return {
        **common,
        "source": "image files",
        "input": "8-bit RGB (PIL)",
        "scale": 1 / 255,
        "interpolation": "bilinear (antialiased)",
        "channel_order": "gray" if in_chans == 1 else "RGB",
        "mean": list(MEAN[:in_chans]),
        "std": list(STD[:in_chans]),
    }


def digits_images(in_chans: int, img_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits as [N, in_chans, H, W] normalised images and [N] labels."""
    from sklearn.datasets import load_digits

    steps = preprocessing(DIGITS, in_chans, img_size)
    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) * steps["scale"]  # [N, 1, 8, 8] in [0, 1]
    images = torch.nn.functional.interpolate(pixels, size=img_size, mode="bilinear", align_corners=False)
    images = (images.expand(-1, in_chans, -1, -1) - torch.tensor(steps["mean"]).view(1, -1, 1, 1)) / torch.tensor(
        steps["std"]
    ).view(1, -1, 1, 1)
    return images.contiguous(), torch.tensor(digits.target, dtype=torch.long)


def digits_splits(in_chans: int, img_size: tuple[int, int]) -> DataSplits:
    images, labels = digits_images(in_chans, img_size)
    train, val = split_indices(len(labels))
    identity = {"source": DIGITS, "classes": [str(c) for c in range(10)], "images": len(labels), "files": DIGITS}
    return DataSplits(
        TensorDataset(images[train], labels[train]), TensorDataset(images[val], labels[val]), 10, DIGITS, identity
    )


def folder_identity(path: Path, *folders) -> dict:
    """The identity of ImageFolder data: its class names and a digest of every file's path
    (relative to `path`) and label."""
    digest = hashlib.sha256()
    for folder in folders:
        for file, label in folder.samples:
            digest.update(f"{Path(file).relative_to(path)}\t{label}\n".encode())
    return {
        "source": str(path.resolve()),
        "classes": list(folders[0].classes),
        "images": sum(len(folder.samples) for folder in folders),
        "files": digest.hexdigest(),
    }


def _image_transform(in_chans: int, img_size: tuple[int, int]):
    from torchvision import transforms

    steps = preprocessing("image files", in_chans, img_size)
    pipeline = [transforms.Resize(steps["resize"]), transforms.CenterCrop(steps["crop"])]
    if steps["channel_order"] == "gray":
        pipeline.append(transforms.Grayscale(1))
    pipeline += [transforms.ToTensor(), transforms.Normalize(steps["mean"], steps["std"])]
    return transforms.Compose(pipeline)


def read_image(path: str):
    """ImageFolder's loader, with a one-line error naming an unreadable file (module level: loader
    workers pickle it)."""
    from PIL import Image

    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:  # the bomb: over Pillow's pixel limit
        raise PruningError(f"image {path} cannot be read ({type(error).__name__}): remove or replace it") from None


def guarded_batches(batches: Iterable, what: str) -> Iterator:
    """`batches` (a DataLoader, or a progress bar over one) with any exception raised while
    reading or transforming images (in a loader worker too) turned into one line of PruningError:
    it is the data's or the augmentation's problem, not a crash. The original stays chained for
    --debug."""
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Exception as error:
            # a loader worker's exception arrives as "Caught X in DataLoader worker process N." plus
            # the worker's traceback: its last line names the problem
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            reason = lines[-1] if lines else type(error).__name__
            if isinstance(error, PruningError):
                if len(lines) == 1:
                    raise
                raise PruningError(re.sub(r"^[\w.]*PruningError: ", "", reason)) from error  # ours, from a worker
            raise PruningError(
                f"preparing a {what} batch failed ({reason[:300]}): check the images, or choose another --augment "
                "(affine or none)"
            ) from error
        yield batch


def _refuse_linked_folders(path: Path) -> None:
    """torchvision's ImageFolder follows symlinked folders: a link to the data folder, one of its
    parents or a folder inside it counts the same images twice or without end (and puts copies in
    both splits), as do two links to one folder. Those are refused; links elsewhere (a subset of a
    data set made of links) are fine."""
    import os

    root, seen = path.resolve(), set()
    for folder, subfolders, _ in os.walk(path):
        for name in subfolders:
            link = Path(folder) / name
            if not link.is_symlink():
                continue
            real = link.resolve()
            if real == root or root.is_relative_to(real) or real.is_relative_to(root) or real in seen:
                raise PruningError(
                    f"data directory {root} holds a symlinked folder {link} that repeats its images (it points to "
                    f"{real}): copy the images in or remove the link"
                )
            seen.add(real)


def _image_folder(path: Path, transform):
    from torchvision.datasets import ImageFolder

    _refuse_linked_folders(path)
    try:
        return ImageFolder(str(path), transform=transform, loader=read_image)
    except (FileNotFoundError, OSError) as error:
        raise PruningError(f"data directory {path} is not an ImageFolder ({error}): use DIR/CLASS/IMAGE.jpg") from None


def folder_splits(path: Path, in_chans: int, img_size: tuple[int, int]) -> DataSplits:
    """DIR/train and DIR/val if both exist, else a deterministic split of DIR/CLASS/*."""
    if not path.is_dir():
        raise PruningError(f"data {str(path)!r} ({path.resolve()}) is neither 'digits' nor a readable directory")
    transform = _image_transform(in_chans, img_size)
    if (path / "train").is_dir() and (path / "val").is_dir():
        train, val = _image_folder(path / "train", transform), _image_folder(path / "val", transform)
        if train.classes != val.classes:
            raise PruningError(f"data directory {path}: train and val have different classes")
        return DataSplits(train, val, len(train.classes), str(path), folder_identity(path, train, val))
    dataset = _image_folder(path, transform)
    if len(dataset) < 2:
        raise PruningError(f"data directory {path} holds {len(dataset)} image(s): need at least 2 to split")
    train, val = split_indices(len(dataset))
    identity = folder_identity(path, dataset)
    return DataSplits(Subset(dataset, train), Subset(dataset, val), len(dataset.classes), str(path), identity)


DEIT_AUGMENT = "rand-m9-mstd0.5-inc1"  # DeiT's RandAugment policy (timm's auto_augment string)
AFFINE = "affine"  # small random rotations, shifts and scalings of image tensors (digits)


class _Transformed(Dataset):
    """`dataset` with `transform` applied to each image tensor (labels unchanged)."""

    def __init__(self, dataset: Dataset, transform) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return self.transform(image), label


def augmented_dataset(dataset: Dataset, policy: str) -> Dataset:
    """The same training images, augmented. `policy` "affine": random rotation (±10°), shift
    (±10 %) and scale (0.9-1.1) of the image tensors (any data; what digits uses). Otherwise a
    timm RandAugment policy with timm's training transform on an ImageFolder (or a Subset of
    one): random resized crop, flip, RandAugment, random erasing (DeiT's recipe). The dataset
    itself keeps its deterministic transform, so calibration draws stay reproducible."""
    import copy

    from timm.data import create_transform
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    if policy == AFFINE:
        fill = float(dataset[0][0].min())  # the background value of normalised images
        return _Transformed(
            dataset, transforms.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), fill=fill)
        )
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    if not isinstance(base, ImageFolder):
        raise PruningError(f"--augment {policy}: RandAugment needs image files (ImageFolder data); use --augment none")
    channels, height, width = base[0][0].shape
    if channels != 3:
        raise PruningError(
            f"--augment {policy}: timm's training transform makes RGB images, the model reads {channels} channel(s); use --augment none"
        )
    augmented = copy.copy(base)
    augmented.transform = create_transform(
        (3, height, width),
        is_training=True,
        auto_augment=policy,
        interpolation="bicubic",
        re_prob=0.25,
        mean=MEAN,
        std=STD,
    )
    _posterize_to_zero_bits(augmented.transform)
    return Subset(augmented, dataset.indices) if isinstance(dataset, Subset) else augmented


def _posterize_zero_safe(image, bits_to_keep: int, **_):
    """timm's posterize, with what Pillow < 12 did for 0 bits (every bit cleared: a black image)."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return image.point(lambda _: 0)
    return ImageOps.posterize(image, bits_to_keep)


def _posterize_to_zero_bits(transform) -> None:
    """Let timm's posterize ops keep 0 bits again. timm maps the strongest magnitudes to 0 bits
    (DeiT's `inc1` policy at magnitude 10, which `mstd0.5` samples; plain `Posterize` below
    magnitude 2.5; AutoAugment's v0 policies), which Pillow < 12 turned into a black image and
    Pillow >= 12 refuses ("bits must be between or equal to 1 and 8"), so that DeiT's recipe
    crashed in the first epochs. The ops of this transform get the old meaning; timm is not
    changed."""
    for step in getattr(transform, "transforms", ()):
        ops = list(getattr(step, "ops", ()))  # RandAugment, AugMixAugment
        ops += [op for sub_policy in getattr(step, "policy", ()) for op in sub_policy]  # AutoAugment
        for op in ops:
            if "Posterize" in getattr(op, "name", ""):
                op.aug_fn = _posterize_zero_safe


def load_data(source: str, in_chans: int, img_size: tuple[int, int]) -> DataSplits:
    """`source` is 'digits' or an ImageFolder directory."""
    if source == DIGITS:
        return digits_splits(in_chans, img_size)
    return folder_splits(Path(source), in_chans, img_size)


def dataset_labels(dataset: Dataset) -> list[int]:
    """Every label of `dataset`, without decoding images where the dataset keeps them apart
    (TensorDataset, ImageFolder and Subsets of either); otherwise by reading each item."""
    if isinstance(dataset, Subset):
        labels = dataset_labels(dataset.dataset)
        return [labels[i] for i in dataset.indices]
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].tolist()
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return list(targets)
    return [int(dataset[i][1]) for i in range(len(dataset))]


@dataclass(frozen=True)
class CalibrationSet:
    """Images drawn at random with a seed, stratified by class, and where they came from."""

    images: torch.Tensor  # [count, C, H, W]
    indices: tuple[int, ...]  # into the dataset they were drawn from
    labels: tuple[int, ...]

    @property
    def class_histogram(self) -> dict[int, int]:
        """class -> images drawn (what info.json records)."""
        return {label: self.labels.count(label) for label in sorted(set(self.labels))}

    def split(self, count: int) -> tuple["CalibrationSet", "CalibrationSet"]:
        """The first `count` images and the rest, disjoint; both stratified (the draw interleaves classes)."""
        return (
            CalibrationSet(self.images[:count], self.indices[:count], self.labels[:count]),
            CalibrationSet(self.images[count:], self.indices[count:], self.labels[count:]),
        )


def calibration_set(dataset: Dataset, count: int, seed: int = 0) -> CalibrationSet:
    """`count` images of `dataset` (all of them if it is smaller) drawn at random with `seed`,
    stratified by class: classes take turns, each in a seeded random order, so every class is
    represented as evenly as its size allows and any prefix of the draw is stratified too."""
    labels = dataset_labels(dataset)
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for index in torch.randperm(len(labels), generator=generator).tolist():
        by_class.setdefault(labels[index], []).append(index)
    order, depth = [], 0
    while len(order) < min(count, len(labels)):
        order += [members[depth] for _, members in sorted(by_class.items()) if depth < len(members)]
        depth += 1
    order = order[:count]
    return CalibrationSet(torch.stack([dataset[i][0] for i in order]), tuple(order), tuple(labels[i] for i in order))

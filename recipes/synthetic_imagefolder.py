"""Write a small synthetic ImageFolder (DIR/train/CLASS/*.png, DIR/val/CLASS/*.png) to try a
recipe where ImageNet is not at hand: class c is a pattern of stripes at frequency c + 1 and a
class colour, with random phase, orientation and noise, so a ViT learns it in a few hundred steps.

    python recipes/synthetic_imagefolder.py DIR [--classes 10 --train 200 --val 40 --size 224]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def image(label: int, classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, np.pi)
    wave = np.sin(2 * np.pi * (label + 1) * (x * np.cos(angle) + y * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
    colour = np.array([np.cos(2 * np.pi * label / classes), np.sin(2 * np.pi * label / classes), 0.5]) * 0.5 + 0.5
    pixels = 0.5 + 0.35 * wave[..., None] * colour + rng.normal(0, 0.08, (size, size, 3))
    return (np.clip(pixels, 0, 1) * 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train", type=int, default=200, help="images per class in train/")
    parser.add_argument("--val", type=int, default=40, help="images per class in val/")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    for split, count in (("train", args.train), ("val", args.val)):
        for label in range(args.classes):
            folder = args.out / split / f"class{label:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                Image.fromarray(image(label, args.classes, args.size, rng)).save(folder / f"{index:05d}.png")
    print(
        f"wrote {args.classes} classes x ({args.train} train + {args.val} val) images of {args.size}x{args.size} to {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

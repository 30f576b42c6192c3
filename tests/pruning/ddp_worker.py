"""Run under torchrun by test_train.py: fine-tune a tiny ViT on digits with DDP, then write this
rank's final weights digest and the initial digest to OUT_DIR/rank{N}.txt."""

import hashlib
import os
import sys

import torch
from conftest import tiny_vit  # tests/ is on PYTHONPATH (test_train.py sets it)
from vitslim.pruning.data import digits_splits
from vitslim.pruning.train import TrainConfig, distributed_context, fit


def digest(model: torch.nn.Module) -> str:
    return hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()


def main(out_dir: str) -> None:
    context = distributed_context()
    model = tiny_vit(num_classes=10)
    initial = digest(model)
    result = fit(model, digits_splits(3, (16, 16)), TrainConfig(epochs=1, batch_size=32, lr=1e-3), progress=False)
    with open(os.path.join(out_dir, f"rank{context.rank}.txt"), "w") as handle:
        handle.write(f"{context.world_size} {initial} {digest(model)} {result.val_top1}\n")


if __name__ == "__main__":
    main(sys.argv[1])

"""PNG plots for people (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

from pruning.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    _pyplot().close(figure)
    return path


def training_curve_png(history: list[dict], path: Path, title: str) -> Path:
    """Loss and validation top-1 per epoch."""
    plt = _pyplot()
    figure, loss_axis = plt.subplots(figsize=(6, 3.5))
    epochs = [h["epoch"] for h in history]
    loss_axis.plot(epochs, [h["loss"] for h in history], color="tab:blue", label="train loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("train loss", color="tab:blue")
    top1_axis = loss_axis.twinx()
    top1_axis.plot(epochs, [h["val_top1"] for h in history], color="tab:orange", label="val top-1")
    top1_axis.set_ylabel("val top-1 (%)", color="tab:orange")
    loss_axis.set_title(title)
    return _save(figure, path)


def block_macs_png(rows_by_variant: dict[str, list[dict]], path: Path, title: str) -> Path:
    """Per-block MACs (millions) of each variant as grouped bars."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 3.5))
    count = len(rows_by_variant)
    width = 0.8 / max(1, count)
    for offset, (variant, rows) in enumerate(rows_by_variant.items()):
        axis.bar([r["block"] + offset * width for r in rows], [r["macs"] / 1e6 for r in rows], width=width, label=variant)
    axis.set_xlabel("block")
    axis.set_ylabel("MMACs per image")
    axis.set_title(title)
    axis.legend()
    return _save(figure, path)


def kept_dims_png(kept_dims: list[dict], sizes: dict[str, int], path: Path, title: str) -> Path:
    """VTP: fraction of each gated channel space kept, per block."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 3.5))
    spaces = list(sizes)
    width = 0.8 / len(spaces)
    for offset, space in enumerate(spaces):
        axis.bar([row["block"] + offset * width for row in kept_dims], [row[space] / sizes[space] for row in kept_dims], width=width, label=f"{space} (of {sizes[space]})")
    axis.set_xlabel("block")
    axis.set_ylabel("fraction of dims kept")
    axis.set_ylim(0, 1.35)
    axis.set_title(title)
    axis.legend(fontsize="small", ncol=4, loc="upper center")
    return _save(figure, path)

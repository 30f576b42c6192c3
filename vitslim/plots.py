"""PNG plots for people (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from vitslim.core.files import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _block_axis(axis, blocks, offset: float = 0.0) -> None:
    """Blocks are integers: one tick per block (at the centre of its group of bars), labelled."""
    blocks = sorted(set(blocks))
    axis.set_xticks([b + offset for b in blocks])
    axis.set_xticklabels([str(b) for b in blocks])
    axis.set_xlabel("block")


def _legend_outside(axis, handles=None, labels=None) -> None:
    """The legend right of the plot, never over the data."""
    if handles is None:
        handles, labels = axis.get_legend_handles_labels()
    axis.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", borderaxespad=0)


def _legend_below(axis) -> None:
    """The legend under the plot (for panels side by side), never over the data."""
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize="small")


def save_png(figure, path: Path) -> Path:
    """Write `figure` as a PNG whole (a temporary name, then a rename) and close it."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    _pyplot().close(figure)
    return path


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    return save_png(figure, path)


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
    if len(epochs) < 12:
        loss_axis.set_xticks(epochs)  # whole epochs
    loss_axis.set_title(title, fontsize=9)
    return _save(figure, path)


def block_macs_png(rows_by_variant: dict[str, list[dict]], path: Path, title: str) -> Path:
    """Per-block MACs (millions) of each variant as grouped bars."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 3.8))
    count = len(rows_by_variant)
    width = 0.8 / max(1, count)
    blocks = []
    for offset, (variant, rows) in enumerate(rows_by_variant.items()):
        axis.bar(
            [r["block"] + offset * width for r in rows], [r["macs"] / 1e6 for r in rows], width=width, label=variant
        )
        blocks += [r["block"] for r in rows]
    _block_axis(axis, blocks, offset=(count - 1) * width / 2)
    axis.set_ylabel("MMACs per image")
    axis.set_title(title, fontsize=9)
    _legend_outside(axis)
    return _save(figure, path)


def kept_dims_png(kept_dims: list[dict], sizes: dict[str, int], path: Path, title: str) -> Path:
    """VTP: fraction of each gated channel space kept, per block."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 3.8))
    spaces = list(sizes)
    width = 0.8 / len(spaces)
    for offset, space in enumerate(spaces):
        axis.bar(
            [row["block"] + offset * width for row in kept_dims],
            [row[space] / sizes[space] for row in kept_dims],
            width=width,
            label=f"{space} (of {sizes[space]})",
        )
    _block_axis(axis, [row["block"] for row in kept_dims], offset=(len(spaces) - 1) * width / 2)
    axis.set_ylabel("fraction of dims kept")
    axis.set_ylim(0, 1.05)
    axis.set_title(title, fontsize=9)
    _legend_outside(axis)
    return _save(figure, path)


def kept_patches_png(
    images, token_sets: list[list[int]], num_prefix: int, grid: tuple[int, int], path: Path, title: str
) -> Path:
    """Patch Slimming: sample images (rows) with the patches each block outputs (columns) shown
    and the dropped ones dimmed. images: [S, C, H, W]; token_sets: original token ids per block."""
    import numpy as np

    plt = _pyplot()
    rows, cols = grid
    samples = images.float()
    columns = 1 + len(token_sets)
    figure, axes = plt.subplots(len(samples), columns, figsize=(1.3 * columns, 1.4 * len(samples)), squeeze=False)
    for row, image in enumerate(samples):
        picture = image.mean(dim=0).numpy()
        picture = (picture - picture.min()) / max(1e-6, float(picture.max() - picture.min()))
        patch_h, patch_w = picture.shape[0] // rows, picture.shape[1] // cols
        for column in range(columns):
            shown = picture.copy()
            if column > 0:
                kept = np.zeros(rows * cols, dtype=bool)
                kept[[t - num_prefix for t in token_sets[column - 1] if t >= num_prefix]] = True
                mask = np.kron(kept.reshape(rows, cols), np.ones((patch_h, patch_w)))
                shown = np.where(mask > 0, shown, 0.15 + 0.2 * shown)
            axis = axes[row][column]
            axis.imshow(shown, cmap="gray", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(
                    "input" if column == 0 else f"block {column - 1}\n{len(token_sets[column - 1])} tok", fontsize=8
                )
    figure.suptitle(title, fontsize=9)
    return _save(figure, path)


def attention_analysis_png(analysis: list[dict], static_blocks: int, path: Path, title: str) -> Path:
    """DGSSA/GLAD: per block, cross-image similarity of attention maps (left) and their
    low-rankness (right: effective rank on the left axis, top singular energy on the right)."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    blocks = [row["block"] for row in analysis]
    left.plot(blocks, [row["cosine"] for row in analysis], "o-", label="cosine to mean map")
    left.plot(blocks, [row["kl"] for row in analysis], "s--", label="KL to mean map")
    left.set_title("similarity across images", fontsize=9)
    left.set_ylabel("cosine / KL divergence")
    right.plot(blocks, [row["effective_rank"] for row in analysis], "o-", color="tab:green", label="effective rank")
    right.set_title("rank of attention maps", fontsize=9)
    right.set_ylabel("effective rank", color="tab:green")
    energy = right.twinx()
    energy.plot(blocks, [row["top_energy"] for row in analysis], "s--", color="tab:red", label="top singular energy")
    energy.set_ylim(0, 1.05)
    energy.set_ylabel("top singular energy", color="tab:red")
    for axis in (left, right):
        _block_axis(axis, blocks)
        if static_blocks:
            axis.axvspan(-0.5, static_blocks - 0.5, color="grey", alpha=0.15, label="static blocks")
    _legend_outside(left)
    handles, labels = right.get_legend_handles_labels()
    more_handles, more_labels = energy.get_legend_handles_labels()
    # the right panel's legend goes below it: right of it is its second axis
    right.legend(
        handles + more_handles,
        labels + more_labels,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.18),
        ncol=3,
        fontsize="small",
    )
    figure.suptitle(title, fontsize=9)
    return _save(figure, path)


def latency_table_png(table, path: Path) -> Path:
    """A latency table (vitslim.pruning.latency.LatencyTable) for people: block latency against
    tokens read for each kind and the kept axis' ends, and against each side's width."""
    figure, (tokens_axis, width_axis) = _pyplot().subplots(1, 2, figsize=(11, 5.2))
    from vitslim.pruning.latency import FULL_BLOCK  # imports torch: only when a table is drawn

    reads = sorted({row["read"] for row in table.blocks})

    def row_ms(**match) -> float:
        return next(r["ms"] for r in table.blocks if all(r[k] == v for k, v in match.items()))

    for label, match, style in (
        ("dynamic, all tokens written", {"static": False, **FULL_BLOCK}, "o-"),
        ("dynamic, half the patches written", {"static": False, **FULL_BLOCK, "kept": 0.5}, "s--"),
        ("dynamic, prefix tokens only written", {"static": False, **FULL_BLOCK, "kept": 0.0}, "v:"),
        ("static attention", {"static": True, **FULL_BLOCK}, "^-"),
    ):
        tokens_axis.plot(reads, [row_ms(read=read, **match) for read in reads], style, label=label)
    tokens_axis.set_xlabel("tokens the block reads")
    tokens_axis.set_ylabel(f"ms per batch of {table.batch}")
    tokens_axis.set_title("one block, every channel kept")
    _legend_below(tokens_axis)
    for read, color in ((reads[len(reads) // 2], "tab:blue"), (reads[-1], "tab:orange")):
        for side, style in (("attention_width", "o-"), ("mlp_width", "s--")):
            widths = sorted({row[side] for row in table.blocks})
            width_axis.plot(
                widths,
                [row_ms(static=False, read=read, **{**FULL_BLOCK, side: w}) for w in widths],
                style,
                color=color,
                label=f"{side.replace('_', ' ')}, {read} tokens",
            )
    width_axis.set_xlabel("fraction of the side's channels kept (just below 1: a few input channels fewer)", fontsize=9)
    width_axis.set_ylabel(f"ms per batch of {table.batch}")
    width_axis.set_title("one dynamic block, all tokens written, one side narrower")
    _legend_below(width_axis)
    figure.suptitle(f"{table.model['name']}: {table.label}")
    return _save(figure, path)

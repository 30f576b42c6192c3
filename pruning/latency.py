"""Latency tables: what a model's blocks cost on one runtime, and the latency a plan is predicted
to have there. The one reader and writer of the table format; `vitslim latency-table` measures
the tables, the methods search their structures against them.

A table holds, for one model geometry, runtime, device, precision and batch (its `where`):

- ``blocks``: one block of the model timed alone over a grid of the tokens it reads (``read``),
  the fraction of its patch tokens it writes (``kept``: 0 writes only the prefix tokens, 1 all,
  anything less than 1 drops at least one patch), the fraction kept of each side's channel spaces
  (``attention_width``: LayerNorm-1 channels and value channels per head; ``mlp_width``:
  LayerNorm-2 channels and hidden units) and static attention or not;
- ``aggregations``: a GLAD aggregation alone over the tokens arriving and the fraction of their
  patches it pools to (``pooled``);
- ``fixed_ms``: the model with no blocks (patch embedding, prefix tokens, final norm, head);
- ``timm_ms``: timm's own model run the same way (what a target speed-up is measured against);
- ``dense_ms``: the model as vitslim builds it with every block dense, whole;
- ``few_tokens_ms``: the same model whose first block keeps an eighth of the patches, whole
  (with ``dense_ms``, the calibration).

A block of a plan is predicted separably (few points, minutes to measure): its kind's time at its
read count with every token and channel kept, times the dynamic blocks' ratio for the fraction it
writes, times their ratio for its widths. The two sides are measured apart and their savings
added (the attention and the MLP run one after the other); along each side, time follows the
side's MACs (a block's side MACs over the same side with every channel kept) plus steps: reading
fewer input channels adds a Gather (qkv_in, fc1_in), which the grid's point just below 1
(STEP_CHANNELS input channels fewer) measures; value heads narrower than the query heads change
how attention runs (a step of their own, told from the MACs by the attention side's narrower
points, among them the value step), while narrower hidden units add none. Each side's saving is
timed writing every token read; a block that writes fewer saves in proportion to the side's MACs
at the tokens it writes (a composed plan: widths and tokens cut).
Every axis is interpolated piecewise linearly and held at its end values beyond the grid.

A block timed alone costs more or less than inside the model (on a GPU the launch and
synchronisation around one block, and how much of its work overlaps its neighbours'; on a CPU the
session's input and output handling), so every block's prediction is ``scale * alone - offset``:
the two numbers that make both whole models of the calibration exact (aggregations are added as
timed; when the two models do not pin a plausible scale, it is 1 and the offset makes the dense
model exact). A block faster alone than the few-tokens model's blocks, below both calibration
points, keeps the ratio to its time alone that those blocks have: the line through the two points
is not extrapolated below them. Everything else is predicted from the grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, Optional

from vitslim.core.files import read_json, sha256_of, write_json_atomic
from vitslim.core.limits import MAX_BATCH
from vitslim.core.settings import setting

from .errors import PruningError
from .macs import block_macs
from .plan import BlockPlan, SlimPlan, TokenCounts, token_counts
from .timm_adapter import ViTGeometry

TABLE_VERSION = 3
FIX = "measure it again with 'vitslim latency-table'"
GEOMETRY_FIELDS = ("depth", "dim", "num_heads", "head_dim", "mlp_hidden", "num_prefix_tokens", "num_patches")


def table_geometry(geometry: ViTGeometry) -> dict[str, int]:
    """The sizes a table is valid for (a model of other sizes has other blocks)."""
    return {name: getattr(geometry, name) for name in GEOMETRY_FIELDS}


class WidthSide(NamedTuple):
    """One width axis: the side's MAC parts (macs.block_macs), the channel space whose narrowing
    adds a Gather (its input channels) and its other space (value channels, hidden units), narrowed
    by slicing weights. `narrowing_step`: narrowing that other space costs time of its own, which
    the predictor takes as a step like the Gather's: value heads narrower than the query heads
    leave PyTorch's fused attention kernel, or are padded for it (the attention-op form)."""

    parts: tuple[str, ...]
    input_space: str
    output_space: str
    narrowing_step: bool


WIDTH_SIDES = {
    "attention_width": WidthSide(("qk_proj", "qk_scores", "v_proj", "attn_v", "proj"), "qkv_in", "proj_in", True),
    "mlp_width": WidthSide(("fc1", "fc2"), "fc1_in", "hidden", False),
}
# A block point with every token and channel kept (the full block of its kind)
FULL_BLOCK = {"kept": 1.0, **{side: 1.0 for side in WIDTH_SIDES}}
# The few-tokens model of the calibration keeps this fraction of the patches after its first block
# (blocks reading few tokens are where timing a block alone differs most from the model).
CALIBRATION_KEPT = 1 / 8
# The width ratio of a block never falls below this: the sides' savings are measured apart and
# added, and two large savings could otherwise add up to more than the block costs.
MIN_WIDTH_RATIO = 0.05


def written_count(geometry: ViTGeometry, read: int, kept: float) -> int:
    """Tokens a block writes when it reads `read` and keeps the fraction `kept` of their patches:
    fewer than all of them when kept < 1 (a Gather, as a method's kept set is), and at least one
    token (a model without prefix tokens keeps a patch)."""
    prefix, patches = geometry.num_prefix_tokens, read - geometry.num_prefix_tokens
    if kept >= 1:
        return read
    return max(1, prefix + max(0, min(round(kept * patches), patches - 1)))


def kept_fraction(geometry: ViTGeometry, read: int, written: int) -> float:
    """The fraction of its patches a block reading `read` tokens and writing `written` keeps."""
    prefix = geometry.num_prefix_tokens
    return 1.0 if read <= prefix else (written - prefix) / (read - prefix)


# The width grid's step keeps this many input channels fewer than all. Not one: GPU GEMMs in fp16
# run a channel count that is not a multiple of 8 on slower kernels, so a point one channel short
# times that slowdown as the Gather's cost and mispredicts every narrower block, while plans round
# their channels to 8 (VTP's --round-to). table_version 3 predicts VTP 20 % and 40 % within 3.8 %
# on an H200 (PyTorch, batch 64 and 256: benchmarks/results/latency_model_gpu_*.json).
STEP_CHANNELS = 8


def step_channels(geometry: ViTGeometry) -> int:
    """Input channels the width step drops: STEP_CHANNELS, or one in a model narrower than
    8 * STEP_CHANNELS (the tests' tiny models), where STEP_CHANNELS would be more than an eighth of
    them and no longer a step."""
    return STEP_CHANNELS if geometry.dim >= 8 * STEP_CHANNELS else 1


def width_step(geometry: ViTGeometry) -> float:
    """The width grid's point just below 1: step_channels input channels fewer, the rest of the
    side whole (the Gather, few MACs)."""
    return 1 - step_channels(geometry) / geometry.dim


def value_step(geometry: ViTGeometry) -> Optional[float]:
    """The attention side's point where the value heads first narrow: step_channels fewer per head
    (and that fraction of the LayerNorm-1 channels); None for heads too narrow to lose them.
    Value heads narrower than the query heads change how attention runs (PyTorch's
    scaled_dot_product_attention leaves its fused kernel; the attention-op form pads them): on an
    H200 a block keeping 48 of 64 per head ran slower than the full block in both runtimes, at
    batch 64 and 256 (benchmarks/results/latency_model_*gpu_*.json). So the
    MACs between the 3/4 point and the step (whole value heads) do not tell the time of the widths
    VTP keeps most (one step fewer per head): this point measures them."""
    fewer = step_channels(geometry)
    return None if geometry.head_dim <= fewer else 1 - fewer / geometry.head_dim


def width_block(geometry: ViTGeometry, attention_width: float = 1.0, mlp_width: float = 1.0) -> BlockPlan:
    """A block keeping the first fraction of each side's channel spaces (attention: LayerNorm-1
    channels and value channels per head; MLP: LayerNorm-2 channels and hidden units); None where
    it keeps all. From the step just below 1 on, only the input channels narrow (step_channels
    fewer at the step). What the table's width axes measure."""
    step = width_step(geometry)

    def first(width: float, count: int) -> Optional[tuple[int, ...]]:
        return None if width >= 1 else tuple(range(max(1, round(width * count))))

    def output_side(width: float) -> float:
        return 1.0 if width >= step else width

    per_head = max(1, round(output_side(attention_width) * geometry.head_dim))
    return BlockPlan(
        qkv_in=first(attention_width, geometry.dim),
        proj_in=None
        if per_head == geometry.head_dim
        else tuple(h * geometry.head_dim + c for h in range(geometry.num_heads) for c in range(per_head)),
        fc1_in=first(mlp_width, geometry.dim),
        hidden=first(output_side(mlp_width), geometry.mlp_hidden),
    )


def few_tokens_counts(geometry: ViTGeometry) -> list[TokenCounts]:
    """The tokens of the calibration's few-tokens model: its first block reads every token and
    writes the prefix tokens and CALIBRATION_KEPT of the patches, every later block reads those."""
    few = max(written_count(geometry, geometry.num_tokens, CALIBRATION_KEPT), geometry.num_prefix_tokens + 1)
    return [TokenCounts(geometry.num_tokens, geometry.num_tokens, few)] + [
        TokenCounts(few, few, few) for _ in range(geometry.depth - 1)
    ]


# ------------------------------------------------------------------------------------ the format


@dataclass(frozen=True)
class LatencyTable:
    """A validated latency table (see the module docstring); `source` is where it was read from."""

    model: dict
    geometry: dict
    where: dict
    batch: int
    fixed_ms: float
    timm_ms: float
    dense_ms: float
    few_tokens_ms: float
    blocks: tuple[dict, ...]
    aggregations: tuple[dict, ...]
    source: str = ""
    sha256: Optional[str] = None  # of the bytes it was read from (None: made in memory)
    # calibration() per geometry, with a few-tokens block's time alone (inside_model_ms): the
    # methods' searches predict many plans on one table
    _calibrations: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {
            "table_version": TABLE_VERSION,
            "model": self.model,
            "geometry": self.geometry,
            "where": self.where,
            "batch": self.batch,
            "fixed_ms": self.fixed_ms,
            "timm_ms": self.timm_ms,
            "dense_ms": self.dense_ms,
            "few_tokens_ms": self.few_tokens_ms,
            "blocks": list(self.blocks),
            "aggregations": list(self.aggregations),
        }

    @property
    def label(self) -> str:
        """Where it was measured, in a few words (reports name the table by it)."""
        where = self.where
        return f"{where.get('runtime', '?')} on {where.get('device_name') or where.get('device', '?')}, {where.get('precision', '?')}, batch {self.batch}"

    @property
    def sizes(self) -> ViTGeometry:
        """The table's sizes as a geometry (what calibration() and the reports read)."""
        return table_sizes(self.geometry)

    def check_geometry(self, geometry: ViTGeometry) -> None:
        """Refuse a table measured on a model of other sizes."""
        mine = table_geometry(geometry)
        if mine != self.geometry:
            field = next(name for name in GEOMETRY_FIELDS if mine[name] != self.geometry.get(name))
            raise PruningError(
                f"latency table {self.source or ''} was measured for {field} = {self.geometry.get(field)} but this model has "
                f"{mine[field]}: measure a table for this model with 'vitslim latency-table --model ...'"
            )

    # -------------------------------------------------------------------------- the predictor

    def _rows(self, **match) -> list[dict]:
        return [row for row in self.blocks if all(row[key] == value for key, value in match.items())]

    def timed_alone_ms(self, block: BlockPlan, geometry: ViTGeometry, counts: TokenCounts) -> tuple[float, float]:
        """One block of a plan as the table times it: (the block alone, its aggregation alone or 0)."""
        prefix = geometry.num_prefix_tokens
        read, written = counts.read, counts.written
        base = _lookup(self._rows(static=block.static_attention is not None, **FULL_BLOCK), "read", read)
        kept_ratio = _kept_ratio(
            geometry,
            self._rows(static=False, attention_width=1.0, mlp_width=1.0),
            kept_fraction(geometry, read, written),
            read,
        )
        aggregation = 0.0
        if block.token_aggregation is not None:
            pooled = (read - prefix) / max(1, counts.arriving - prefix)
            aggregation = _lookup2(self.aggregations, "arriving", counts.arriving, "pooled", pooled)
        return base * kept_ratio * self._width_ratio(block, geometry, counts, kept_ratio), aggregation

    def _width_ratio(self, block: BlockPlan, geometry: ViTGeometry, counts: TokenCounts, kept_ratio: float) -> float:
        """How much a block's channels change its time: each side's saving, added (module docstring).
        The widths are timed writing every token read; a block that writes fewer (`kept_ratio` of
        its time) saves on a side in proportion to the side's MACs at the tokens it writes."""
        all_channels = BlockPlan(static_attention=block.static_attention)
        every_token_written = TokenCounts(counts.arriving, counts.read, counts.read)
        ratio = 1.0
        for side, (parts, input_space, output_space, _) in WIDTH_SIDES.items():
            side_macs = _side_macs(all_channels, geometry, counts, parts)
            fraction = _side_macs(block, geometry, counts, parts) / max(1, side_macs)
            share = side_macs / max(1, _side_macs(all_channels, geometry, every_token_written, parts)) / kept_ratio
            # the exporter reads a listed input space through a Gather, all of it listed or not
            gathers = getattr(block, input_space) is not None
            # (static attention multiplies its values by a constant: no attention kernel to leave)
            output = getattr(block, output_space)
            narrows = (
                block.static_attention is None
                and output is not None
                and len(output) < geometry.channel_sizes[output_space]
            )
            other = next(name for name in WIDTH_SIDES if name != side)
            rows = self._rows(static=False, kept=1.0, **{other: 1.0})
            factors = [
                (
                    count,
                    _side_factor(geometry, side, [r for r in rows if r["read"] == count], fraction, gathers, narrows),
                )
                for count in sorted({row["read"] for row in rows})
            ]
            ratio -= (1 - _interpolate(factors, counts.read)) * share
        return max(ratio, MIN_WIDTH_RATIO)

    def _blocks_alone_ms(self, geometry: ViTGeometry, counts: list[TokenCounts]) -> float:
        return sum(self.timed_alone_ms(BlockPlan(), geometry, c)[0] for c in counts)

    def calibration(self, geometry: ViTGeometry) -> tuple[float, float]:
        """(scale, offset_ms): a block inside the model takes scale * its time alone - offset_ms,
        the two numbers that make the dense and the few-tokens model exact. When the two do not
        pin a scale (CALIBRATION_SCALES), the scale is 1 and the offset makes the dense model
        exact: a block's time that barely grows with its tokens (a launch-bound GPU) leaves the
        scale to noise."""
        if geometry not in self._calibrations:
            dense = self._blocks_alone_ms(geometry, [TokenCounts(*(geometry.num_tokens,) * 3)] * geometry.depth)
            few = self._blocks_alone_ms(geometry, few_tokens_counts(geometry))
            scale = (self.dense_ms - self.few_tokens_ms) / (dense - few) if dense > few else math.nan
            low, high = CALIBRATION_SCALES
            if not low <= scale <= high:
                scale = 1.0
            offset = (self.fixed_ms + scale * dense - self.dense_ms) / geometry.depth
            smallest = self.timed_alone_ms(BlockPlan(), geometry, few_tokens_counts(geometry)[1])[0]
            self._calibrations[geometry] = (scale, offset, smallest)
        return self._calibrations[geometry][:2]

    def few_tokens_block_ms(self, geometry: ViTGeometry) -> float:
        """The time alone of a block of the few-tokens model after its first, the smaller
        calibration point (cached with the calibration)."""
        self.calibration(geometry)
        return self._calibrations[geometry][2]

    def inside_model_ms(self, alone_ms: float, geometry: ViTGeometry) -> float:
        """A block's time inside the model from its time alone: the calibration's line down to the
        few-tokens model's blocks (the smaller calibration point) and, below them, their ratio to
        their time alone, held; never below a tenth of the time alone. Profiled on a 2-core CPU
        (benchmarks/results/calibration_profile.json), blocks reading 13 tokens ran inside the model
        at about the ratio the few-tokens model's blocks (25 tokens) ran at, not at the line's."""
        scale, offset = self.calibration(geometry)
        smallest = self.few_tokens_block_ms(geometry)
        if alone_ms < smallest:
            return max(alone_ms * (scale * smallest - offset) / smallest, 0.1 * alone_ms)
        return max(scale * alone_ms - offset, 0.1 * alone_ms)

    def predict(self, plan: SlimPlan, geometry: ViTGeometry) -> "LatencyPrediction":
        """The plan's predicted latency on the table's runtime, at the table's batch: each block
        timed alone, calibrated (inside_model_ms), plus its aggregation as timed alone. The
        calibration is not applied to aggregations: it is measured on blocks, and applying
        table_version 1's per-block offset to them too moved GLAD structures' predictions further
        from the clock on onnxruntime (H200) and a 2-core CPU (BENCHMARKS.md)."""
        self.check_geometry(geometry)
        blocks = tuple(
            self.inside_model_ms(block, geometry) + aggregation
            for block, aggregation in (
                self.timed_alone_ms(block, geometry, counts)
                for block, counts in zip(plan.blocks, token_counts(plan, geometry))
            )
        )
        return LatencyPrediction(total_ms=self.fixed_ms + sum(blocks), fixed_ms=self.fixed_ms, blocks_ms=blocks)

    def ms_for_target(self, target_ms: Optional[float], target_speedup: Optional[float]) -> float:
        """A latency target in ms: given, or timm's model's time on this table over a speed-up."""
        return target_ms if target_ms is not None else self.timm_ms / target_speedup


def _side_macs(block: BlockPlan, geometry: ViTGeometry, counts: TokenCounts, parts: tuple[str, ...]) -> int:
    macs = block_macs(block, geometry, counts)
    return sum(macs[name] for name in parts)


def _side_factor(
    geometry: ViTGeometry, side: str, rows: list[dict], fraction: float, gathers: bool, narrows: bool
) -> float:
    """At one read count: a dynamic block's time ratio when `side` keeps `fraction` of its MACs,
    from the rows along that side. Every narrower row pays the Gather (the step) and, on a side
    with a narrowing step, that step too (its other space is narrower); the point just below 1
    (step_channels input channels fewer, the other space whole) pays the Gather alone. The two
    narrower rows nearest the step pay the same steps, so the line through them is the MACs' own
    slope; taken on to 1, it tells the Gather from the MACs the step point removes, and the
    narrowing step from the MACs the nearer of those rows removes. The curve without the steps follows the
    MACs; each step is added back only when the block pays it (`gathers`: it reads fewer input
    channels; `narrows`: its other space is narrower)."""
    parts = WIDTH_SIDES[side].parts
    full = next(row["ms"] for row in rows if row[side] == 1.0)
    read = rows[0]["read"]
    counts = TokenCounts(read, read, read)
    all_macs = max(1, _side_macs(BlockPlan(), geometry, counts, parts))
    *narrower, (at_step, ratio_at_step) = [
        (_side_macs(width_block(geometry, **{side: row[side]}), geometry, counts, parts) / all_macs, row["ms"] / full)
        for row in sorted((row for row in rows if row[side] < 1.0), key=lambda row: row[side])
    ]
    # the reader checks that the step and the point below it keep different input channel counts
    if WIDTH_SIDES[side].narrowing_step and len(narrower) >= 2:
        (below, ratio_below), (last, ratio_last) = narrower[-2:]
        slope = (ratio_last - ratio_below) / (last - below)
        step = ratio_at_step - 1 + (1 - at_step) * slope
        narrowing = ratio_last - step - 1 + (1 - last) * slope
    else:  # the line from the last narrower row to the step point
        (last, ratio_last), narrowing = narrower[-1], 0.0
        step = ratio_at_step - 1 + (1 - at_step) * (ratio_at_step - ratio_last) / (at_step - last)
    without_steps = [(macs, ratio - step - narrowing) for macs, ratio in narrower] + [(1.0, 1.0)]
    paid = (step if gathers else 0.0) + (narrowing if narrows else 0.0)
    return max(_interpolate(without_steps, fraction) + paid, 1e-6)


@dataclass(frozen=True)
class LatencyPrediction:
    total_ms: float
    fixed_ms: float
    blocks_ms: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"total_ms": self.total_ms, "fixed_ms": self.fixed_ms, "blocks_ms": list(self.blocks_ms)}


def _interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear y(x) through `points` (x distinct), held at the end values outside them
    (a width or a token count beyond the grid is never extrapolated towards zero time)."""
    points = sorted(points)
    if x <= points[0][0]:
        return points[0][1]
    if x >= points[-1][0]:
        return points[-1][1]
    index = next(i for i in range(1, len(points)) if x <= points[i][0])
    (x0, y0), (x1, y1) = points[index - 1], points[index]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _lookup(rows: list[dict], axis: str, x: float, at=None) -> float:
    """ms at x along `axis` (each row placed at `at(row)` if given); rows at one place averaged."""
    points: dict[float, list[float]] = {}
    for row in rows:
        points.setdefault(row[axis] if at is None else at(row), []).append(row["ms"])
    if not points:
        raise PruningError(f"latency table has no rows along {axis}: {FIX}")
    return max(_interpolate([(x0, sum(ms) / len(ms)) for x0, ms in points.items()], x), 1e-6)


def _lookup2(rows: list[dict], outer: str, x: float, inner: str, y: float) -> float:
    """Bilinear: along `inner` at each `outer` grid value, then along `outer`."""
    values = sorted({row[outer] for row in rows})
    if not values:
        raise PruningError(f"latency table has no {outer} rows: {FIX}")
    return max(_interpolate([(v, _lookup([r for r in rows if r[outer] == v], inner, y)) for v in values], x), 1e-6)


def _kept_ratio(geometry: ViTGeometry, rows: list[dict], kept: float, read: float) -> float:
    """How much a dynamic block's time changes when it writes the fraction `kept` of its patches
    instead of all: the ratio at each read count of the grid, interpolated to `read`. Each row is
    placed at the fraction it wrote (a grid value rounds to whole patches: "one patch fewer" is
    7 of 8 at 9 tokens)."""
    ratios = []
    for count in sorted({row["read"] for row in rows}):
        at = [row for row in rows if row["read"] == count]
        full = next(row["ms"] for row in at if row["kept"] == 1.0)

        def written(row: dict, count: int = count) -> float:
            return kept_fraction(geometry, count, written_count(geometry, count, row["kept"]))

        ratios.append((count, _lookup(at, "kept", kept, at=written) / full))
    if not ratios:
        raise PruningError(f"latency table has no rows along kept: {FIX}")
    return max(_interpolate(ratios, read), 1e-6)


# --------------------------------------------------------------------------- reading and writing


def _number(value: Any, where: str, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PruningError(f"{where} must be a finite number, not {value!r}: {FIX}")
    if positive and value <= 0:
        raise PruningError(f"{where} must be > 0, not {value!r}: {FIX}")
    return float(value)


def _fraction(value: Any, where: str) -> float:
    number = _number(value, where, positive=False)
    if not 0 <= number <= 1:
        raise PruningError(f"{where} must be in [0, 1], not {value!r}: {FIX}")
    return number


def _count(value: Any, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PruningError(f"{where} must be an integer in [{low}, {high}], not {value!r}: {FIX}")
    return value


def table_from_dict(data: Any, source: str = "") -> LatencyTable:
    """A LatencyTable from its JSON form; every field checked (types, ranges, finiteness, a
    complete grid) so that a damaged or edited table is one line, never a wrong prediction."""
    name = f"latency table {source}".strip()
    if not isinstance(data, dict):
        raise PruningError(f"{name} is not a JSON object: {FIX}")
    if data.get("table_version") != TABLE_VERSION:
        raise PruningError(f"{name} has table_version {data.get('table_version')!r}, not {TABLE_VERSION}: {FIX}")
    for key, kind in (("model", dict), ("geometry", dict), ("where", dict), ("blocks", list), ("aggregations", list)):
        if not isinstance(data.get(key), kind):
            raise PruningError(f"{name}: {key} must be a JSON {kind.__name__}: {FIX}")
    if not isinstance(data["model"].get("name"), str) or not isinstance(data["model"].get("kwargs", {}), dict):
        raise PruningError(f"{name}: model must name a timm model: {FIX}")
    # every size at least 1 (a model may have no prefix tokens)
    geometry = {
        key: _count(data["geometry"].get(key), f"{name}: geometry.{key}", int(key != "num_prefix_tokens"), 1 << 20)
        for key in GEOMETRY_FIELDS
    }
    tokens = geometry["num_prefix_tokens"] + geometry["num_patches"]
    batch = _count(data.get("batch"), f"{name}: batch", 1, MAX_BATCH)
    blocks = []
    for index, row in enumerate(data["blocks"]):
        where = f"{name}: blocks[{index}]"
        if not isinstance(row, dict) or not isinstance(row.get("static"), bool):
            raise PruningError(f"{where} must be an object with static true or false: {FIX}")
        blocks.append(
            {
                "static": row["static"],
                "read": _count(row.get("read"), f"{where}.read", geometry["num_prefix_tokens"] + 1, tokens),
                "kept": _fraction(row.get("kept"), f"{where}.kept"),
                **{side: _fraction(row.get(side), f"{where}.{side}") for side in WIDTH_SIDES},
                "ms": _number(row.get("ms"), f"{where}.ms"),
            }
        )
    aggregations = []
    for index, row in enumerate(data["aggregations"]):
        where = f"{name}: aggregations[{index}]"
        if not isinstance(row, dict):
            raise PruningError(f"{where} must be an object: {FIX}")
        aggregations.append(
            {
                "arriving": _count(row.get("arriving"), f"{where}.arriving", geometry["num_prefix_tokens"] + 1, tokens),
                "pooled": _fraction(row.get("pooled"), f"{where}.pooled"),
                "ms": _number(row.get("ms"), f"{where}.ms"),
            }
        )
    _check_grid(name, table_sizes(geometry), blocks, aggregations)
    table = LatencyTable(
        model={"name": data["model"]["name"], "kwargs": dict(data["model"].get("kwargs", {}))},
        geometry=geometry,
        where=dict(data["where"]),
        batch=batch,
        fixed_ms=_number(data.get("fixed_ms"), f"{name}: fixed_ms"),
        timm_ms=_number(data.get("timm_ms"), f"{name}: timm_ms"),
        dense_ms=_number(data.get("dense_ms"), f"{name}: dense_ms"),
        few_tokens_ms=_number(data.get("few_tokens_ms"), f"{name}: few_tokens_ms"),
        blocks=tuple(blocks),
        aggregations=tuple(aggregations),
        source=source,
    )
    _check_calibration(name, table)
    return table


def table_sizes(geometry: dict) -> ViTGeometry:
    """A table's sizes as the geometry the predictor reads (it never reads the embedding's or the
    head's MACs)."""
    return ViTGeometry(**geometry, patch_embed_macs=0, head_macs=0, pools_patch_tokens=False)


def _check_grid(name: str, geometry: ViTGeometry, blocks: list[dict], aggregations: list[dict]) -> None:
    """Every axis the predictor walks must be a full grid that spans what plans hold: read counts
    from one patch to every token, each with the full block of each kind; the same kept values
    (0 and 1 among them) and width values of each side (1, the step of step_channels input channels fewer,
    and a narrower point) at every read count; no point twice."""
    prefix, tokens = geometry.num_prefix_tokens, geometry.num_tokens
    reads = sorted({row["read"] for row in blocks})
    if not reads or reads[0] != prefix + 1 or reads[-1] != tokens:
        raise PruningError(
            f"{name}: the read counts must run from {prefix + 1} to {tokens} (one patch to every token): {FIX}"
        )
    axes = ("kept", *WIDTH_SIDES)
    for static in (False, True):
        for read in reads:
            if not [r for r in blocks if r["static"] == static and r["read"] == read and all(r[a] == 1 for a in axes)]:
                kind = "static" if static else "dynamic"
                raise PruningError(f"{name} has no full {kind} block at read {read}: {FIX}")
    for axis in axes:
        grids = {
            read: tuple(
                sorted(
                    {
                        r[axis]
                        for r in blocks
                        if not r["static"] and r["read"] == read and all(r[a] == 1 for a in axes if a != axis)
                    }
                )
            )
            for read in reads
        }
        if len(set(grids.values())) != 1:
            raise PruningError(f"{name}: the {axis} grid differs between read counts: {FIX}")
        grid = next(iter(grids.values()))
        if axis == "kept":
            if not {0.0, 1.0} <= set(grid) or len(grid) < 2:
                raise PruningError(f"{name}: the kept grid {list(grid)} must hold [0.0, 1.0] and another value: {FIX}")
            continue
        # input channels kept at each width: 1 ends the grid, the step keeps all but step_channels,
        # and the points below it keep fewer (else the step could not be told from the MACs it removes)
        space = WIDTH_SIDES[axis].input_space
        kept = [len(getattr(width_block(geometry, **{axis: width}), space) or range(geometry.dim)) for width in grid]
        fewer = step_channels(geometry)
        increasing = all(a < b for a, b in zip(kept, kept[1:]))
        if grid[-1] != 1.0 or len(grid) < 3 or kept[-2] != geometry.dim - fewer or not increasing:
            raise PruningError(
                f"{name}: the {axis} grid {list(grid)} must hold 1, the step of {fewer} input channel(s) fewer "
                f"({width_step(geometry):.4g}) and narrower points, each keeping fewer input channels: {FIX}"
            )
    keys = [(r["static"], r["read"], *(r[a] for a in axes)) for r in blocks]
    if len(set(keys)) != len(keys):
        raise PruningError(f"{name} holds a block point twice: {FIX}")
    if aggregations:
        points = [(r["arriving"], r["pooled"]) for r in aggregations]
        if len(set(points)) != len(points):
            raise PruningError(f"{name} holds an aggregation point twice: {FIX}")
        arriving = sorted({a for a, _ in points})
        if len({tuple(sorted(p for a2, p in points if a2 == a)) for a in arriving}) != 1:
            raise PruningError(f"{name}: the pooled grid differs between arriving counts: {FIX}")


# A calibration scale outside these bounds is not taken (calibration() falls back to the dense
# model's offset): the whole models and their blocks timed alone would disagree by far more than
# timing a block alone explains (0.96 in benchmarks/results/latency_model_cpu.json); noise, most likely.
CALIBRATION_SCALES = (0.5, 2.0)


def _check_calibration(name: str, table: LatencyTable) -> None:
    """The dense model timed whole must take longer than the few-tokens model, and that longer than
    the model without its blocks (measure_table checks this before it times the grid)."""
    if not table.dense_ms > table.few_tokens_ms > table.fixed_ms:
        raise PruningError(
            f"{name}: the dense model ({table.dense_ms:.4g} ms), the few-tokens model ({table.few_tokens_ms:.4g} ms) and "
            f"the model without its blocks ({table.fixed_ms:.4g} ms) must each take longer than the next: {FIX} on a quiet machine"
        )


def read_latency_table(path: str | Path) -> LatencyTable:
    """The table at `path`, validated, with the sha256 of the bytes read (what reports record)."""
    path = Path(path)
    data = read_json(path, "latency table", FIX, PruningError)
    table = table_from_dict(data, source=str(path.resolve()))
    return replace(table, sha256=sha256_of(path))


def write_latency_table(table: LatencyTable, path: str | Path) -> Path:
    """Write `table` as JSON, after the reader's checks (a table that could not be read back is never written)."""
    table_from_dict(table.to_dict(), source=str(path))
    return write_json_atomic(path, table.to_dict())


# ------------------------------------------------------------------------ the methods' settings


@dataclass(frozen=True)
class LatencyTargetSettings:
    """What every method takes to compress to a latency instead of a MAC count (or to report its
    predicted latency): a table and a target in ms or as a speed-up over timm's model."""

    latency_table: Optional[str] = setting(
        None,
        "a latency table from 'vitslim latency-table': the report predicts the structure's latency on its runtime, "
        "and with --target-ms / --target-speedup the method searches its structure to meet that latency",
    )
    target_ms: Optional[float] = setting(None, "with --latency-table: the latency to meet, in ms at the table's batch")
    target_speedup: Optional[float] = setting(
        None, "with --latency-table: instead of --target-ms, the speed-up over timm's model on the table's runtime"
    )

    def check_latency_settings(self) -> None:
        """Call from the method's __post_init__ (after the finiteness check)."""
        if self.target_ms is not None and self.target_speedup is not None:
            raise PruningError("give --target-ms or --target-speedup, not both")
        for flag, value in (("--target-ms", self.target_ms), ("--target-speedup", self.target_speedup)):
            if value is not None and not value > 0:
                raise PruningError(f"{flag} {value} must be > 0")
        if self.has_latency_target and self.latency_table is None:
            raise PruningError(
                "a latency target needs the table it is read on: add --latency-table TABLE.json "
                "(measure one with 'vitslim latency-table')"
            )

    @property
    def has_latency_target(self) -> bool:
        return self.target_ms is not None or self.target_speedup is not None


@dataclass(frozen=True)
class LatencyBudget:
    """A method's latency target on a table: `fits(plan)` is what its structure search asks."""

    table: LatencyTable
    geometry: ViTGeometry
    target_ms: Optional[float]  # None: the table only predicts (no target)

    @classmethod
    def from_settings(
        cls, settings: LatencyTargetSettings, geometry: ViTGeometry, start: SlimPlan
    ) -> Optional["LatencyBudget"]:
        """The budget of a method's settings, or None without a table. A target that the plan
        the method starts from already meets is refused: the search would cut nothing."""
        if settings.latency_table is None:
            return None
        table = read_latency_table(settings.latency_table)
        table.check_geometry(geometry)
        target = (
            table.ms_for_target(settings.target_ms, settings.target_speedup) if settings.has_latency_target else None
        )
        budget = cls(table, geometry, target)
        if target is not None and budget.fits(start):
            what = "the dense model" if start.is_dense else f"the {start.method} run it starts from"
            raise PruningError(
                f"{what} is already predicted at {budget.predicted_ms(start):.4g} ms on {table.label}, within the "
                f"target {target:.4g} ms: nothing to cut; lower --target-ms (or raise --target-speedup)"
            )
        return budget

    def predicted_ms(self, plan: SlimPlan) -> float:
        return self.table.predict(plan, self.geometry).total_ms

    def fits(self, plan: SlimPlan) -> bool:
        return self.predicted_ms(plan) <= self.target_ms

    def unreachable(self, fastest: SlimPlan, method: str) -> PruningError:
        return PruningError(
            f"{method} cannot meet {self.target_ms:.4g} ms on {self.table.label}: its fastest structure is predicted "
            f"at {self.predicted_ms(fastest):.4g} ms; raise --target-ms (or lower --target-speedup)"
        )

    def report(self, plan: SlimPlan) -> dict:
        """What the prune report shows: the prediction beside the target and where it holds."""
        prediction = self.table.predict(plan, self.geometry)
        return {
            "table": self.table.source,
            "table_sha256": self.table.sha256,
            "where": self.table.label,
            "batch": self.table.batch,
            "target_ms": self.target_ms,
            "predicted_ms": prediction.total_ms,
            "timm_ms": self.table.timm_ms,
            "predicted_speedup": self.table.timm_ms / prediction.total_ms,
            "prediction": prediction.to_dict(),
        }

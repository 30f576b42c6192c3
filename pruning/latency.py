"""Latency tables: what a model's blocks cost on one runtime, and the latency a plan is predicted
to have there. The one reader and writer of the table format; `vitslim latency-table` measures
the tables, the methods search their structures against them.

A table holds, for one model geometry, runtime, device, precision and batch (its `where`):

- ``blocks``: one block of the model timed alone over a grid of the tokens it reads (``read``),
  the fraction of its patch tokens it writes (``kept``: 0 writes only the prefix tokens, 1 all),
  a uniform fraction of every prunable channel space (``width``) and static attention or not;
- ``aggregations``: a GLAD aggregation alone over the tokens arriving and the fraction of their
  patches it pools to (``pooled``);
- ``fixed_ms``: the model with no blocks (patch embedding, prefix tokens, final norm, head);
- ``timm_ms``: timm's own model run the same way (what a target speed-up is measured against);
- ``dense_ms``: the model as vitslim builds it with every block dense, whole (the calibration).

A block of a plan is predicted separably (few points, minutes to measure): its kind's time at its
read count with every token and channel kept, times the dynamic blocks' ratio for the fraction it
writes, times their ratio for its width, where width is read as the block's MACs over the MACs of
the same block with every channel kept (a uniform-width block of equal MACs). Every axis is
interpolated piecewise linearly and held at its end values beyond the grid.

A block timed alone costs a little more or less than inside the model (on a GPU the launch and
synchronisation around one block; on a CPU the session's input and output handling), so every
block's prediction is corrected by one per-block offset: the difference between the sum of the
dense model's parts and `dense_ms`, spread over its blocks (aggregations are added as timed).
The dense model is therefore predicted exactly; everything else is predicted from the grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from vitslim.core.files import read_json, sha256_of, write_json_atomic
from vitslim.core.limits import MAX_BATCH
from vitslim.core.settings import setting

from .errors import PruningError
from .macs import block_macs
from .plan import BlockPlan, SlimPlan, TokenCounts, token_counts
from .timm_adapter import ViTGeometry

TABLE_VERSION = 1
FIX = "measure it again with 'vitslim latency-table'"
GEOMETRY_FIELDS = ("depth", "dim", "num_heads", "head_dim", "mlp_hidden", "num_prefix_tokens", "num_patches")


def table_geometry(geometry: ViTGeometry) -> dict[str, int]:
    """The sizes a table is valid for (a model of other sizes has other blocks)."""
    return {name: getattr(geometry, name) for name in GEOMETRY_FIELDS}


def written_count(geometry: ViTGeometry, read: int, kept: float) -> int:
    """Tokens a block writes when it reads `read` and keeps the fraction `kept` of their patches."""
    prefix = geometry.num_prefix_tokens
    return prefix + round(kept * (read - prefix))


def uniform_width_block(geometry: ViTGeometry, width: float) -> BlockPlan:
    """A block keeping the first `width` fraction of every prunable channel space (value
    channels per head); None where it keeps all. What the table's width axis measures."""
    if width >= 1:
        return BlockPlan()

    def first(count: int) -> tuple[int, ...]:
        return tuple(range(max(1, round(width * count))))

    per_head = max(1, round(width * geometry.head_dim))
    return BlockPlan(
        qkv_in=first(geometry.dim),
        proj_in=tuple(h * geometry.head_dim + c for h in range(geometry.num_heads) for c in range(per_head)),
        fc1_in=first(geometry.dim),
        hidden=first(geometry.mlp_hidden),
    )


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
    blocks: tuple[dict, ...]
    aggregations: tuple[dict, ...]
    source: str = ""
    sha256: Optional[str] = None  # of the bytes it was read from (None: made in memory)

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
            "blocks": list(self.blocks),
            "aggregations": list(self.aggregations),
        }

    @property
    def label(self) -> str:
        """Where it was measured, in a few words (reports name the table by it)."""
        where = self.where
        return f"{where.get('runtime', '?')} on {where.get('device_name') or where.get('device', '?')}, {where.get('precision', '?')}, batch {self.batch}"

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
        base = _lookup(self._rows(static=block.static_attention is not None, kept=1.0, width=1.0), "read", read)
        kept = 1.0 if read <= prefix else (written - prefix) / (read - prefix)
        kept_ratio = _ratio_along(self._rows(static=False, width=1.0), "kept", kept, read)
        all_channels = _macs(
            BlockPlan(kept_tokens=block.kept_tokens, static_attention=block.static_attention), geometry, counts
        )
        fraction = _macs(block, geometry, counts) / all_channels if all_channels else 1.0
        width_rows = [
            {**row, "fraction": _uniform_width_fraction(geometry, row["width"], row["read"])}
            for row in self._rows(static=False, kept=1.0)
        ]
        width_ratio = _ratio_along(width_rows, "fraction", fraction, read)
        aggregation = 0.0
        if block.token_aggregation is not None:
            pooled = (read - prefix) / max(1, counts.arriving - prefix)
            aggregation = _lookup2(self.aggregations, "arriving", counts.arriving, "pooled", pooled)
        return base * kept_ratio * width_ratio, aggregation

    def block_offset_ms(self, geometry: ViTGeometry) -> float:
        """What timing a block alone adds (or, if negative, misses) per block: the dense model's
        parts summed, less the dense model timed whole, over its depth."""
        full = _lookup(self._rows(static=False, kept=1.0, width=1.0), "read", geometry.num_tokens)
        return (self.fixed_ms + geometry.depth * full - self.dense_ms) / geometry.depth

    def predict(self, plan: SlimPlan, geometry: ViTGeometry) -> "LatencyPrediction":
        """The plan's predicted latency on the table's runtime, at the table's batch: each block
        timed alone less the offset of timing a block alone (never below a tenth of its time
        alone), plus its aggregation as timed alone. The offset is not taken from aggregations:
        it is measured on blocks, and taking it from them too moved GLAD structures' predictions
        further from the clock on onnxruntime (H200) and a 2-core CPU (BENCHMARKS.md)."""
        self.check_geometry(geometry)
        offset = self.block_offset_ms(geometry)
        blocks = tuple(
            max(block - offset, 0.1 * block) + aggregation
            for block, aggregation in (
                self.timed_alone_ms(block, geometry, counts)
                for block, counts in zip(plan.blocks, token_counts(plan, geometry))
            )
        )
        return LatencyPrediction(total_ms=self.fixed_ms + sum(blocks), fixed_ms=self.fixed_ms, blocks_ms=blocks)

    def ms_for_target(self, target_ms: Optional[float], target_speedup: Optional[float]) -> float:
        """A latency target in ms: given, or timm's model's time on this table over a speed-up."""
        return target_ms if target_ms is not None else self.timm_ms / target_speedup


def _macs(block: BlockPlan, geometry: ViTGeometry, counts: TokenCounts) -> int:
    """A block's MACs without its aggregation (the table times aggregations apart)."""
    return sum(value for name, value in block_macs(block, geometry, counts).items() if name != "aggregation")


def _uniform_width_fraction(geometry: ViTGeometry, width: float, read: int) -> float:
    """MACs of a dynamic block of uniform `width` over the full block's, at `read` tokens (>= 1)."""
    counts = TokenCounts(read, read, read)
    return _macs(uniform_width_block(geometry, width), geometry, counts) / max(1, _macs(BlockPlan(), geometry, counts))


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


def _lookup(rows: list[dict], axis: str, x: float) -> float:
    points = {}
    for row in rows:
        points[row[axis]] = row["ms"]
    if not points:
        raise PruningError(f"latency table has no rows along {axis}: {FIX}")
    return max(_interpolate(list(points.items()), x), 1e-6)


def _lookup2(rows: list[dict], outer: str, x: float, inner: str, y: float) -> float:
    """Bilinear: along `inner` at each `outer` grid value, then along `outer`."""
    values = sorted({row[outer] for row in rows})
    if not values:
        raise PruningError(f"latency table has no {outer} rows: {FIX}")
    return max(_interpolate([(v, _lookup([r for r in rows if r[outer] == v], inner, y)) for v in values], x), 1e-6)


def _ratio_along(rows: list[dict], axis: str, x: float, read: float) -> float:
    """How much a dynamic block's time changes when `axis` goes from its largest grid value
    (everything kept) to x: the ratio at each read count of the grid, interpolated to `read`."""
    ratios = []
    for count in sorted({row["read"] for row in rows}):
        at = [row for row in rows if row["read"] == count]
        full = max(at, key=lambda row: row[axis])["ms"]
        ratios.append((count, _lookup(at, axis, x) / full))
    if not ratios:
        raise PruningError(f"latency table has no rows along {axis}: {FIX}")
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
    geometry = {
        key: _count(data["geometry"].get(key), f"{name}: geometry.{key}", 0, 1 << 20) for key in GEOMETRY_FIELDS
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
                "width": _fraction(row.get("width"), f"{where}.width"),
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
    _check_grid(name, geometry, blocks, aggregations)
    table = LatencyTable(
        model={"name": data["model"]["name"], "kwargs": dict(data["model"].get("kwargs", {}))},
        geometry=geometry,
        where=dict(data["where"]),
        batch=batch,
        fixed_ms=_number(data.get("fixed_ms"), f"{name}: fixed_ms"),
        timm_ms=_number(data.get("timm_ms"), f"{name}: timm_ms"),
        dense_ms=_number(data.get("dense_ms"), f"{name}: dense_ms"),
        blocks=tuple(blocks),
        aggregations=tuple(aggregations),
        source=source,
    )
    _check_calibration(name, table)
    return table


def _check_grid(name: str, geometry: dict, blocks: list[dict], aggregations: list[dict]) -> None:
    """Every axis the predictor walks must be a full grid that spans what plans hold: read counts
    from one patch to every token, each with the full block of each kind; the same kept values
    (0 and 1 among them) and width values (1 and at least one less) at every read count; no
    point twice."""
    prefix, tokens = geometry["num_prefix_tokens"], geometry["num_prefix_tokens"] + geometry["num_patches"]
    reads = sorted({row["read"] for row in blocks})
    if not reads or reads[0] != prefix + 1 or reads[-1] != tokens:
        raise PruningError(
            f"{name}: the read counts must run from {prefix + 1} to {tokens} (one patch to every token): {FIX}"
        )
    for static in (False, True):
        for read in reads:
            if not [
                r for r in blocks if r["static"] == static and r["read"] == read and r["kept"] == 1 and r["width"] == 1
            ]:
                kind = "static" if static else "dynamic"
                raise PruningError(f"{name} has no full {kind} block at read {read}: {FIX}")
    for axis, other, needed in (("kept", "width", {0.0, 1.0}), ("width", "kept", {1.0})):
        grids = {
            read: tuple(sorted({r[axis] for r in blocks if not r["static"] and r["read"] == read and r[other] == 1}))
            for read in reads
        }
        if len(set(grids.values())) != 1:
            raise PruningError(f"{name}: the {axis} grid differs between read counts: {FIX}")
        grid = next(iter(grids.values()))
        if not needed <= set(grid) or len(grid) < 2:
            raise PruningError(
                f"{name}: the {axis} grid {list(grid)} must hold {sorted(needed)} and another value: {FIX}"
            )
    keys = [(r["static"], r["read"], r["kept"], r["width"]) for r in blocks]
    if len(set(keys)) != len(keys):
        raise PruningError(f"{name} holds a block point twice: {FIX}")
    if aggregations:
        points = [(r["arriving"], r["pooled"]) for r in aggregations]
        if len(set(points)) != len(points):
            raise PruningError(f"{name} holds an aggregation point twice: {FIX}")
        arriving = sorted({a for a, _ in points})
        if len({tuple(sorted(p for a2, p in points if a2 == a)) for a in arriving}) != 1:
            raise PruningError(f"{name}: the pooled grid differs between arriving counts: {FIX}")


def _check_calibration(name: str, table: LatencyTable) -> None:
    """The dense model timed whole must take longer than the model without its blocks (a larger
    or smaller sum of parts is what the offset corrects; predict() keeps every block above a tenth
    of its time alone)."""
    if table.dense_ms <= table.fixed_ms:
        raise PruningError(
            f"{name}: dense_ms {table.dense_ms:.4g} is not above fixed_ms {table.fixed_ms:.4g} (the model without "
            f"its blocks): {FIX}"
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
    def from_settings(cls, settings: LatencyTargetSettings, geometry: ViTGeometry) -> Optional["LatencyBudget"]:
        if settings.latency_table is None:
            return None
        table = read_latency_table(settings.latency_table)
        table.check_geometry(geometry)
        target = (
            table.ms_for_target(settings.target_ms, settings.target_speedup) if settings.has_latency_target else None
        )
        return cls(table, geometry, target)

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

"""`vitslim latency-table`: measure what a model's blocks cost on one runtime (the table format and
the predictor are vitslim.pruning.latency).

Each grid point is one block of the model built as the exporter builds it (export.compact) and
timed alone by deploy's runners the way `vitslim bench` times artifacts: in PyTorch (eager, CUDA
graphs or compiled) or, exported through the exporter's own graph passes, in onnxruntime (CPU or
CUDA). Weights are random: latency does not depend on them.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import multiprocessing
import pickle
import tempfile
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, Iterable, Optional

import numpy as np
import torch
from torch import nn

from vitslim.core.errors import VitslimError
from vitslim.core.files import write_text_atomic
from vitslim.core.limits import MAX_BATCH
from vitslim.core.settings import setting
from vitslim.deploy.bench import BenchSettings, benchmark, device_name, host_description, measure_round
from vitslim.deploy.runners import OnnxRuntimeRunner, Runner, TensorRTRunner, TorchRunner
from vitslim.deploy.runners.torch_runner import TORCH_DTYPES, TORCH_MODES
from vitslim.export.attention_form import DEFAULT_ATTENTION_FORM, attention_form
from vitslim.export.compact import CompactBlock, compact_from_plan
from vitslim.export.onnx_export import onnx_graph
from vitslim.pruning.latency import (
    CALIBRATION_KEPT,
    FULL_BLOCK,
    WIDTH_SIDES,
    LatencyTable,
    few_tokens_counts,
    table_from_dict,
    table_geometry,
    value_step,
    width_block,
    width_step,
    write_latency_table,
    written_count,
)
from vitslim.pruning.models import create_model
from vitslim.pruning.plan import BlockPlan, ModelSpec, SlimPlan, dense_plan
from vitslim.pruning.reference import aggregate_tokens
from vitslim.pruning.timm_adapter import (
    BlockParts,
    ViTGeometry,
    block_parts,
    blocks_of,
    replace_blocks,
    supported_geometry,
)

from .plots import latency_table_png

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt")
ONNX_PRECISIONS = ("fp32", "fp16")
# The grid: read counts are the prefix tokens plus one patch and these fractions of the patches;
# the other axes are fractions of the patches written (and one patch fewer than all: the Gather's
# step), of each side's channel spaces (and the step of a few input channels fewer, width_step; the
# attention side also one step fewer per value head, value_step), and
# of the patches an aggregation pools to (GLAD halves the grid per stage).
READ_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 3 / 4, 1.0)
KEPT_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
WIDTH_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
POOLED_FRACTIONS = (0.125, 0.25, 0.5, 1.0)
# The calibration's whole models are timed this many times, in a session each, keeping the median:
# onnxruntime sessions of one model on a 2-vCPU VM time over 20 % apart, and every plan's predicted
# latency moves with the few-tokens model's (keeping the quietest of 3 made the smallest structures
# predicted 23 % fast, the median of 3 17 % slow, in two runs on one machine).
WHOLE_MODEL_ROUNDS = 5
# The grid is timed this many times over, each point keeping its quieter pass's median: a shared
# machine slows down for minutes at a time, and one slow point skews every ratio at its read count.
GRID_PASSES = 2
# A block that reads more tokens cannot be faster: a point slower than the same block reading the
# next larger count (by more than this) was caught slow in every pass (onnxruntime's sessions on a
# 2-vCPU VM sometimes get one core), and is timed up to EXTRA_PASSES more times.
OUT_OF_ORDER_SLACK = 0.05
EXTRA_PASSES = 2
TABLE_TIMING = BenchSettings(warmup_seconds=0.2, min_seconds=0.3, min_iterations=10, max_rounds=2)
# A shared 2-vCPU VM alternates between quiet spells and slow ones of seconds to minutes, and a
# slow spell adds 1-2 ms to every run of a block rather than a factor: DeiT-S blocks alone reading
# 25 and 197 tokens timed medians of 3.9 and 32.9 ms quiet, 5.3 and 33.9 ms slow
# (benchmarks/results/machine_drift.json). Two passes still caught a few small points slow both
# times, and one slow point skews every prediction at its read count. So before each timing a
# sentinel (the dense block reading the few-tokens model's count, in one session kept open) runs
# for SENTINEL_TIMING; while its median is more than QUIET_SLACK over the machine's quiet level
# (the QUIET_PERCENTILE-th percentile of its medians so far: the quietest one alone can be a lucky
# reading that no later check reaches, and a tiny model's table then waited out every timing), the
# timing waits (TableSpec's quiet_wait_seconds at most), checking every QUIET_POLL_SECONDS.
# The sentinel's session saw the same spells as new sessions of a block (118 of 124 rounds there).
SENTINEL_TIMING = BenchSettings(warmup_seconds=0.0, min_seconds=0.02, min_iterations=5, max_rounds=1)
QUIET_PERCENTILE = 10
QUIET_SLACK = 0.15
QUIET_POLL_SECONDS = 1.0
KNOWN_LEVEL_TIMEOUTS = 3


@dataclass(frozen=True)
class TableSpec:
    """Where a table is measured: the model, the runtime and its settings, the batch. Every field
    but `model` is a flag of `vitslim latency-table`."""

    model: ModelSpec
    backend: str = setting(
        "onnxruntime",
        "the runtime: onnxruntime, torch, or tensorrt (an engine built per point with the installed TensorRT; a GPU "
        "machine's job, minutes per batch)",
    )
    device: str = setting("cpu", "cpu or cuda")
    precision: str = setting("fp32", "onnxruntime: the exported graph's, fp32 or fp16; torch: fp32, fp16 or bf16")
    batch: int = setting(8, "the batch the latencies are for")
    torch_mode: str = setting("eager", "torch: eager, cuda_graph or compile")
    attention: str = setting(
        DEFAULT_ATTENTION_FORM,
        "onnxruntime: the attention form the ONNX will be exported with (as 'vitslim export --attention')",
    )
    threads: Optional[int] = setting(None, "CPU threads for torch and onnxruntime (None: their own default)")
    cuda_graph: bool = setting(True, "onnxruntime on CUDA and tensorrt: replay a captured CUDA graph, as bench does")
    quiet_wait_seconds: float = setting(
        60.0,
        "before each timing, wait up to this long for a sentinel block to run at its quiet speed (a shared "
        "machine's slow spells last tens of seconds; 0: never wait)",
    )
    export_workers: int = setting(
        1,
        "onnxruntime and tensorrt: processes that export the grid's points to ONNX before any is timed (1: this "
        "process; on a GPU machine several save minutes: exporting a point takes longer than timing it there)",
    )

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise VitslimError(f"--backend {self.backend!r}: latency tables are measured with {BACKENDS}")
        if self.backend == "tensorrt" and self.device != "cuda":
            raise VitslimError("--backend tensorrt runs engines on a GPU: add --device cuda (on a machine with one)")
        if not 1 <= self.batch <= MAX_BATCH:
            raise VitslimError(f"--batch {self.batch} must be >= 1 and at most {MAX_BATCH}")
        precisions = tuple(TORCH_DTYPES) if self.backend == "torch" else ONNX_PRECISIONS
        if self.precision not in precisions:
            raise VitslimError(f"--precision {self.precision!r} is not one of {precisions} for {self.backend}")
        if self.torch_mode not in TORCH_MODES:
            raise VitslimError(f"--torch-mode {self.torch_mode!r} is not one of {TORCH_MODES}")
        if self.device not in ("cpu", "cuda"):
            raise VitslimError(f"--device {self.device!r} must be cpu or cuda")
        attention_form(self.attention)  # an unknown form is one line here, not after minutes
        if not (math.isfinite(self.quiet_wait_seconds) and self.quiet_wait_seconds >= 0):
            raise VitslimError(f"--quiet-wait-seconds {self.quiet_wait_seconds} must be >= 0 (0 never waits)")
        if self.export_workers < 1:
            raise VitslimError(f"--export-workers {self.export_workers} must be >= 1 (1 exports in this process)")

    @property
    def runtime(self) -> str:
        if self.backend == "torch":
            return f"torch {self.torch_mode}"
        return f"{self.backend} {self.attention}" + (
            " (CUDA graphs)" if self.device == "cuda" and self.cuda_graph else ""
        )

    @property
    def exports(self) -> bool:
        """Whether each point is exported to ONNX first (everything but PyTorch)."""
        return self.backend != "torch"


class _Aggregation(nn.Module):
    """A GLAD aggregation alone: [B, P + N, C] -> [B, P + M, C]."""

    def __init__(self, matrix: torch.Tensor, num_prefix: int) -> None:
        super().__init__()
        self.matrix, self.num_prefix = nn.Parameter(matrix, requires_grad=False), num_prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return aggregate_tokens(x, self.matrix, self.num_prefix)


def read_counts(geometry: ViTGeometry) -> list[int]:
    prefix, patches = geometry.num_prefix_tokens, geometry.num_patches
    return sorted({prefix + 1, *(prefix + max(1, round(f * patches)) for f in READ_FRACTIONS)})


def _spread(prefix: int, read: int, written: int) -> Optional[tuple[int, ...]]:
    """The prefix tokens and `written - prefix` patches spread over those read (a Gather, as a
    method's kept set is); None when every token is written."""
    if written >= read:
        return None
    patches = np.linspace(prefix, read - 1, written - prefix).round().astype(int).tolist() if written > prefix else []
    return tuple(range(prefix)) + tuple(patches)


def block_point(
    geometry: ViTGeometry, static: bool, read: int, kept: float, attention_width: float, mlp_width: float
) -> BlockPlan:
    """The plan of one grid point's block."""
    written = written_count(geometry, read, kept)
    widths = width_block(geometry, attention_width, mlp_width)
    return BlockPlan(
        kept_tokens=_spread(geometry.num_prefix_tokens, read, written),
        qkv_in=widths.qkv_in,
        proj_in=widths.proj_in,
        fc1_in=widths.fc1_in,
        hidden=widths.hidden,
        static_attention=torch.full((geometry.num_heads, written, read), 1.0 / read) if static else None,
    )


def grid_points(geometry: ViTGeometry) -> list[dict]:
    """Every block point of a table: the full block of each kind at every read count, the
    dynamic block along the kept axis and along each side's width axis (the predictor is
    separable); the attention side also at its value step."""
    full = FULL_BLOCK
    kept_grid = sorted({*KEPT_FRACTIONS, 1 - 1 / geometry.num_patches})
    widths = {side: {*WIDTH_FRACTIONS, width_step(geometry)} - {1.0} for side in WIDTH_SIDES}
    widths["attention_width"] |= {value_step(geometry)} - {None}
    points = []
    for read in read_counts(geometry):
        points.append({"static": True, "read": read, **full})
        points += [{"static": False, "read": read, **full, "kept": kept} for kept in kept_grid]
        points += [
            {"static": False, "read": read, **full, side: w} for side in WIDTH_SIDES for w in sorted(widths[side])
        ]
    return points


def sentinel_point(geometry: ViTGeometry) -> dict:
    """The quiet gate's sentinel: the grid's dense block nearest the few-tokens model's read count."""
    few_tokens_read = few_tokens_counts(geometry)[1].read
    return min(
        (p for p in grid_points(geometry) if not p["static"] and all(p[k] == v for k, v in FULL_BLOCK.items())),
        key=lambda p: abs(p["read"] - few_tokens_read),
    )


def few_tokens_plan(model: ModelSpec, geometry: ViTGeometry) -> SlimPlan:
    """The calibration's few-tokens model (pruning.latency.few_tokens_counts) as a plan."""
    first = few_tokens_counts(geometry)[0]
    kept = _spread(geometry.num_prefix_tokens, first.read, first.written)
    return dense_plan(model, geometry.depth).with_block(0, BlockPlan(kept_tokens=kept))


def aggregation_points(geometry: ViTGeometry) -> list[dict]:
    return [
        {"arriving": read, "pooled": pooled}
        for read in read_counts(geometry)
        if read > geometry.num_prefix_tokens + 1
        for pooled in POOLED_FRACTIONS
    ]


def export_point(module: nn.Module, shape: tuple[int, ...], path: Path, attention: str, precision: str) -> None:
    """`module` as the exporter ships it, to `path`."""
    import onnx

    with torch.no_grad():
        # traced at batch 2, as the exporter does (the batch stays symbolic)
        graph = onnx_graph(
            module.float().eval(), torch.randn(2, *shape), path, attention_form(attention), precision=precision
        )
    onnx.save(graph, str(path))


def _export_pickled(module: bytes, shape: tuple[int, ...], path: Path, attention: str, precision: str) -> None:
    """export_point in a worker process, of a module pickled by this package's own ModuleTimer.
    Pickled bytes, not the module: a module sent as is moves each tensor to shared memory with a file
    handle open in the parent until the pool ends (over a thousand for a DeiT-S grid)."""
    export_point(pickle.loads(module), shape, path, attention, precision)


def _export_worker_start() -> None:
    torch.set_num_threads(1)  # the workers share the cores; exporting is mostly Python
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.onnx")  # as the CLI does


class ModuleTimer:
    """Times modules on the spec's runtime (exported first for onnxruntime and TensorRT) at the
    spec's batch. A module timed under a `key` is exported (and built) once, however often it is
    timed: export_all exports many at once, before any is timed."""

    def __init__(self, spec: TableSpec, settings: BenchSettings, work: Path) -> None:
        self.spec, self.settings, self.work, self.count = spec, settings, work, 0
        self.noisy: list[str] = []  # modules whose quietest round stayed above the settings' max CoV
        self.form = attention_form(spec.attention)
        self.description: Optional[dict] = None
        # the exporter pads narrower value heads for forms that need it; PyTorch runs them as they are
        self.pads_value_heads = spec.exports and self.form.pad_value_heads
        self.exported: dict[Hashable, Path] = {}

    def block(self, parts: BlockParts, geometry: ViTGeometry, **point) -> nn.Module:
        """One grid point's block (block_point's plan), built as the exporter builds it for this runtime."""
        plan = block_point(geometry, **point)
        return CompactBlock(parts, plan, geometry, pad_value_heads=self.pads_value_heads).eval()

    def _next_path(self) -> Path:
        self.count += 1
        return self.work / f"point{self.count}.onnx"

    def export_all(self, modules: Iterable[tuple[Hashable, nn.Module, tuple[int, ...]]]) -> None:
        """Export each (key, module, input shape) not exported yet, in the spec's export workers at
        once. `modules` may be a generator: a few modules are built and pickled at a time."""
        if not self.spec.exports:
            return
        todo = ((key, module, shape) for key, module, shape in modules if key is not None and key not in self.exported)
        settings = (self.spec.attention, self.spec.precision)
        if self.spec.export_workers == 1:
            for key, module, shape in todo:
                self.onnx_path(module, shape, key)
            return
        context = multiprocessing.get_context("spawn")  # never fork a process that holds CUDA or thread pools
        pool = ProcessPoolExecutor(self.spec.export_workers, mp_context=context, initializer=_export_worker_start)
        running: dict = {}
        try:
            for key, module, shape in todo:
                if len(running) >= 2 * self.spec.export_workers:
                    self._collect(running, wait(running, return_when=FIRST_COMPLETED).done)
                path = self._next_path()
                running[pool.submit(_export_pickled, pickle.dumps(module), shape, path, *settings)] = (key, path)
            self._collect(running, list(running))
        except BrokenProcessPool:
            raise VitslimError(
                "an export worker died (out of memory?): measure with fewer --export-workers, or 1"
            ) from None
        finally:
            pool.shutdown(cancel_futures=True)

    def _collect(self, running: dict, done) -> None:
        for future in done:
            future.result()  # an export's error, raised here
            key, path = running.pop(future)
            self.exported[key] = path

    def onnx_path(self, module: nn.Module, shape: tuple[int, ...], key: Optional[Hashable]) -> Path:
        """The module's ONNX: exported now, or under `key` only the first time."""
        if key is not None and key in self.exported:
            return self.exported[key]
        path = self._next_path()
        export_point(module, shape, path, self.spec.attention, self.spec.precision)
        if key is not None:
            self.exported[key] = path
        return path

    def runner(self, module: nn.Module, shape: tuple[int, ...], key: Optional[Hashable] = None) -> Runner:
        spec = self.spec
        if spec.backend == "torch":
            return TorchRunner(copy.deepcopy(module), spec.device, spec.torch_mode, spec.precision)
        path = self.onnx_path(module, shape, key)
        if spec.backend == "tensorrt":
            # one engine per point, for exactly the table's batch, as `vitslim build --batch B:B:B` builds it
            from vitslim.deploy.build import BatchProfile, BuildSettings, engine_from_onnx

            engine = path.with_suffix(".engine")
            if not engine.is_file():
                batch = BatchProfile(spec.batch, spec.batch, spec.batch)
                engine = engine_from_onnx(path, engine, BuildSettings(profiles=(batch,))).engine_path
            return TensorRTRunner(engine, cuda_graph=spec.cuda_graph)
        return OnnxRuntimeRunner(path, spec.device, spec.threads, cuda_graph=spec.device == "cuda" and spec.cuda_graph)

    def inputs(self, shape: tuple[int, ...]) -> np.ndarray:
        """The batch every timing of a module of this input shape runs on."""
        return np.random.default_rng(0).standard_normal((self.spec.batch, *shape)).astype(np.float32)

    def ms(self, module: nn.Module, shape: tuple[int, ...], key: Optional[Hashable] = None) -> float:
        """The module's median latency; under `key`, exported (and built) only the first time."""
        runner = self.runner(module, shape, key)
        with runner:
            result = benchmark(runner, self.inputs(shape), self.spec.precision, None, self.settings)
            self.description = self.description or runner.description
        if result["noisy"]:
            self.noisy.append(f"{type(module).__name__} {shape}")
        return result["median_ms"]


@dataclass
class QuietGate:
    """Holds each timing until the machine runs `runner` (the sentinel, active) at its quiet speed:
    its median over SENTINEL_TIMING at most QUIET_SLACK over the quiet level (quiet_ms), or
    `max_wait_seconds` spent waiting (0: never waits, never runs the sentinel). Counts what it did."""

    runner: Optional[Runner]
    inputs: Optional[np.ndarray]
    max_wait_seconds: float
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.perf_counter
    # a quiet level known from an earlier gate of the same sentinel (a table's
    # where.quiet_gate.sentinel_quiet_ms): the level never rises above it, so timings that start in
    # a slow spell wait for a quiet one; dropped after KNOWN_LEVEL_TIMEOUTS timings in a row waited
    # out max_wait_seconds (the machine's quiet speed has moved since)
    known_quiet_ms: Optional[float] = None
    readings: list[float] = field(default_factory=list)  # every check's median (ms)
    reading: Optional[float] = None  # the check the last wait() let its timing run on (None: not held)
    waits: int = 0  # timings that waited for a quiet spell
    waited_seconds: float = 0.0
    timed_slow: int = 0  # timings that waited max_wait_seconds and ran in a slow spell all the same
    timed_slow_in_a_row: int = 0

    def sentinel_ms(self) -> float:
        return float(np.median(measure_round(self.runner, self.inputs, SENTINEL_TIMING)))

    @property
    def quiet_ms(self) -> Optional[float]:
        """The machine's quiet level: the QUIET_PERCENTILE-th percentile of the checks so far, at
        most the known quiet level."""
        levels = [
            *([float(np.percentile(self.readings, QUIET_PERCENTILE))] if self.readings else []),
            *([self.known_quiet_ms] if self.known_quiet_ms is not None else []),
        ]
        return min(levels) if levels else None

    def wait(self) -> float:
        """Wait for a quiet spell; the seconds waited (0.0 when the first check found one)."""
        if self.max_wait_seconds <= 0:
            return 0.0
        started, slept = self.clock(), False
        while True:
            ms = self.reading = self.sentinel_ms()
            self.readings.append(ms)
            waited = self.clock() - started
            if not self.slow(ms):
                self.timed_slow_in_a_row = 0
                break
            if waited >= self.max_wait_seconds:
                self.timed_slow += 1
                self.timed_slow_in_a_row += 1
                if self.timed_slow_in_a_row >= KNOWN_LEVEL_TIMEOUTS:
                    self.known_quiet_ms = None
                break
            self.sleep(QUIET_POLL_SECONDS)
            slept = True
        if not slept:
            return 0.0
        self.waits += 1
        self.waited_seconds += waited
        return waited

    def slow(self, reading: Optional[float]) -> bool:
        """Whether a sentinel reading is more than QUIET_SLACK over the quiet level known now (a
        timing let run on a reading the level known then passed, in a run that started in a slow
        spell, may be slow by the level known at its end)."""
        return reading is not None and reading > (1 + QUIET_SLACK) * self.quiet_ms

    def to_dict(self) -> dict:
        return {
            "max_wait_seconds": self.max_wait_seconds,
            "waits": self.waits,
            "waited_seconds": round(self.waited_seconds, 1),
            "timed_slow": self.timed_slow,
            "checks": len(self.readings),
            "sentinel_quiet_ms": self.quiet_ms,
            "known_quiet_ms": self.known_quiet_ms,
        }


def quiet_gate(
    timer: ModuleTimer,
    parts: BlockParts,
    geometry: ViTGeometry,
    stack: contextlib.ExitStack,
    known_quiet_ms: Optional[float] = None,
) -> QuietGate:
    """The quiet gate of timings on `timer`'s runtime (its spec's quiet_wait_seconds): the sentinel
    (sentinel_point's block, under the key a table's grid times it by) in one runner kept open on
    `stack`; `known_quiet_ms`: see QuietGate."""
    gate = QuietGate(None, None, timer.spec.quiet_wait_seconds, known_quiet_ms=known_quiet_ms)
    if gate.max_wait_seconds > 0:
        sentinel = sentinel_point(geometry)
        shape = (sentinel["read"], geometry.dim)
        module = timer.block(parts, geometry, **sentinel)
        gate.runner = stack.enter_context(timer.runner(module, shape, ("block", *sentinel.values())))
        gate.inputs = timer.inputs(shape)
    return gate


def out_of_order(rows: list[dict], slack: float) -> list[dict]:
    """The grid rows slower (by more than `slack`) than the same block reading the next larger
    token count: timed slow, since reading more tokens is more work."""
    series: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["static"], row["kept"], row["attention_width"], row["mlp_width"])
        series.setdefault(key, []).append(row)
    suspects = []
    for same_block in series.values():
        ordered = sorted(same_block, key=lambda row: row["read"])
        suspects += [row for row, larger in zip(ordered, ordered[1:]) if row["ms"] > (1 + slack) * larger["ms"]]
    return suspects


def measure_table(
    spec: TableSpec,
    model: Optional[nn.Module] = None,
    settings: BenchSettings = TABLE_TIMING,
    progress: Callable[[str], None] = log.info,
) -> LatencyTable:
    """Measure a latency table for `spec` (its model with random weights unless `model` is given)."""
    if spec.backend == "torch" and spec.threads:
        torch.set_num_threads(spec.threads)
    # a copy: the caller's model keeps its mode, dtype and device
    model = copy.deepcopy(model) if model is not None else create_model(spec.model)
    model = model.eval().float().cpu()
    geometry = supported_geometry(model)
    parts = block_parts(blocks_of(model)[0])
    image_shape = tuple(model.patch_embed.img_size)
    in_chans = model.patch_embed.proj.in_channels
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vitslim-latency-") as work, contextlib.ExitStack() as stack:
        timer = ModuleTimer(spec, settings, Path(work))
        points, aggregations = grid_points(geometry), aggregation_points(geometry)
        total = GRID_PASSES * (len(points) + len(aggregations)) + 3 * WHOLE_MODEL_ROUNDS + 1
        done = 0

        def point_module(kind: str, row: dict) -> tuple[nn.Module, tuple[int, ...]]:
            """A grid row's module and its input shape (an aggregation's matrix is random)."""
            if kind == "block":
                point = {name: value for name, value in row.items() if name != "ms"}
                return timer.block(parts, geometry, **point), (row["read"], geometry.dim)
            patches = row["arriving"] - geometry.num_prefix_tokens
            matrix = torch.rand(max(1, round(row["pooled"] * patches)), patches)
            return _Aggregation(matrix, geometry.num_prefix_tokens), (row["arriving"], geometry.dim)

        def point_key(kind: str, row: dict) -> tuple:
            return (kind, *(value for name, value in row.items() if name != "ms"))

        gate = quiet_gate(timer, parts, geometry, stack)

        readings: dict[Hashable, list[float]] = {}  # per timed key: the sentinel's reading before each timing

        def step(what: str, module: nn.Module, shape: tuple[int, ...], key: Hashable) -> float:
            nonlocal done
            done += 1
            waited = gate.wait()
            ms = timer.ms(module, shape, key)
            if gate.reading is not None:
                readings.setdefault(key, []).append(gate.reading)
            suffix = f" (after {waited:.0f} s waiting for a quiet spell)" if waited else ""
            progress(f"latency-table: {done}/{total} {what}: {ms:.4g} ms{suffix}")
            return ms

        fixed = copy.deepcopy(model)
        replace_blocks(fixed, [])
        dense = compact_from_plan(model, dense_plan(spec.model, geometry.depth), pad_value_heads=timer.pads_value_heads)
        few_tokens = compact_from_plan(
            model, few_tokens_plan(spec.model, geometry), pad_value_heads=timer.pads_value_heads
        )
        whole = {
            "fixed parts (patch embedding, head)": fixed,
            "the dense model as vitslim builds it (the calibration)": dense,
            "the few-tokens model (the calibration)": few_tokens,
        }

        def whole_ms(what: str, again: str = "") -> float:
            """A whole model timed WHOLE_MODEL_ROUNDS times: the median."""
            rounds = [
                step(again + what, whole[what], (in_chans, *image_shape), what) for _ in range(WHOLE_MODEL_ROUNDS)
            ]
            return float(np.median(rounds))

        def check_order() -> None:
            fixed_ms, dense_ms, few_tokens_ms = whole_times.values()
            if not dense_ms > few_tokens_ms > fixed_ms:
                raise VitslimError(
                    f"the dense model ({dense_ms:.4g} ms), the few-tokens model ({few_tokens_ms:.4g} ms) and the model "
                    f"without its blocks ({fixed_ms:.4g} ms) did not time in that order: measure on a quiet machine"
                )

        # each whole model timed, and their order checked, before the grid: a table the reader would
        # refuse is refused in seconds, not minutes
        whole_times = {what: whole_ms(what) for what in whole}
        check_order()
        # timm's own model, run as the table's runtime runs it (on onnxruntime: exported by the exporter)
        timm_ms = step("timm's model", model, (in_chans, *image_shape), "timm")
        blocks = [{**point, "ms": math.inf} for point in points]
        pooled_rows = [{**point, "ms": math.inf} for point in aggregations]
        grid = [("block", row) for row in blocks] + [("aggregation", row) for row in pooled_rows]
        if spec.exports:  # every point exported once, before the first is timed
            progress(f"latency-table: exporting {len(grid)} points in {spec.export_workers} process(es)")
            timer.export_all((point_key(kind, row), *point_module(kind, row)) for kind, row in grid)

        def time_row(row: dict, kind: str, what: str) -> None:
            row["ms"] = min(row["ms"], step(what, *point_module(kind, row), point_key(kind, row)))

        def block_label(row: dict) -> str:
            kind = "static" if row["static"] else "block"
            return (
                f"{kind} read {row['read']} kept {row['kept']:.3g} attention width {row['attention_width']:.3g} "
                f"mlp width {row['mlp_width']:.3g}"
            )

        def label(kind: str, row: dict) -> str:
            return block_label(row) if kind == "block" else f"aggregation of {row['arriving']} pooled {row['pooled']:g}"

        for grid_pass in range(1, GRID_PASSES + 1):
            for kind, row in grid:
                time_row(row, kind, f"pass {grid_pass}: {label(kind, row)}")
        # A run that starts in a slow spell takes it for the machine's quiet level until quieter
        # checks come: what ran on a reading slow by the level known now is timed again, held to it.
        # A grid point (and timm's model) keeps its quicker timing, so it is timed again when every
        # timing of it was slow; a whole model's median moves with any slow round, and all its
        # rounds are timed again.
        again_label = "again, run in a slow spell by the quiet level known now: "

        def ran_slow(key: Hashable, every: bool) -> bool:
            slow = [gate.slow(reading) for reading in readings.get(key, [])]
            return bool(slow) and (all if every else any)(slow)

        slow_rows = [(kind, row) for kind, row in grid if ran_slow(point_key(kind, row), every=True)]
        slow_whole = [what for what in whole if ran_slow(what, every=False)]
        slow_timm = ran_slow("timm", every=True)
        timed_again = len(slow_rows) + WHOLE_MODEL_ROUNDS * len(slow_whole) + slow_timm
        total += timed_again
        for what in slow_whole:
            whole_times[what] = whole_ms(what, again_label)
        if slow_whole:
            check_order()
        if slow_timm:
            timm_ms = min(timm_ms, step(again_label + "timm's model", model, (in_chans, *image_shape), "timm"))
        for kind, row in slow_rows:
            time_row(row, kind, again_label + label(kind, row))
        for extra_pass in range(1, EXTRA_PASSES + 1):
            suspects = out_of_order(blocks, OUT_OF_ORDER_SLACK)
            if not suspects:
                break
            total += len(suspects)
            for row in suspects:
                time_row(row, "block", f"again ({extra_pass}), slower than reading more tokens: {block_label(row)}")
    host = host_description()
    where = {
        "runtime": spec.runtime,
        "backend": spec.backend,
        "device": spec.device,
        "device_name": device_name(host, spec.device),
        "precision": spec.precision,
        "torch_mode": spec.torch_mode if spec.backend == "torch" else None,
        "attention_form": spec.attention if spec.exports else None,
        "threads": spec.threads,
        "cuda_graph": spec.cuda_graph if spec.exports and spec.device == "cuda" else None,
        "baseline": "timm's model" + (" exported by vitslim's exporter" if spec.exports else ""),
        "runner": timer.description,
        "host": host,
        "timing": settings.__dict__,
        # a busy machine makes a table that predicts nothing: every point is one median
        "noisy_points": len(timer.noisy),
        "quiet_gate": {**gate.to_dict(), "timed_again": timed_again},
        "timings": total,
        "measured_in_seconds": round(time.perf_counter() - started, 1),
        "measured_on": time.strftime("%Y-%m-%d"),
    }
    fixed_ms, dense_ms, few_tokens_ms = whole_times.values()
    return LatencyTable(
        model=spec.model.to_dict(),
        geometry=table_geometry(geometry),
        where=where,
        batch=spec.batch,
        fixed_ms=fixed_ms,
        timm_ms=timm_ms,
        dense_ms=dense_ms,
        few_tokens_ms=few_tokens_ms,
        blocks=tuple(blocks),
        aggregations=tuple(pooled_rows),
    )


# ------------------------------------------------------------------------------- for people


def table_markdown(table: LatencyTable) -> str:
    where = table.where
    full = FULL_BLOCK
    lines = [
        f"# Latency table: {table.model['name']} on {table.label}",
        "",
        f"- Runtime: {where.get('runtime')} ({where.get('device')}: {where.get('device_name')}), {where.get('precision')}, batch {table.batch}",
        f"- timm's model: {table.timm_ms:.4g} ms; the dense model as vitslim builds it: {table.dense_ms:.4g} ms; "
        f"the few-tokens model (its first block keeps {CALIBRATION_KEPT:.1%} of the patches): {table.few_tokens_ms:.4g} ms; "
        f"fixed parts (patch embedding, head): {table.fixed_ms:.4g} ms",
        _calibration_line(table),
        f"- Measured in {where.get('measured_in_seconds')} s on {where.get('measured_on')}; "
        f"{where.get('noisy_points', 0)} of {where.get('timings', '?')} timings stayed noisy "
        f"(coefficient of variation above {where.get('timing', {}).get('max_cov')}"
        "; more than a few: measure again on a quiet machine)",
        *_quiet_gate_lines(where.get("quiet_gate")),
        "",
        "## One block, every channel kept (ms)",
        "",
        "| tokens read | dynamic, all written | dynamic, prefix only written | static attention |",
        "|---|---|---|---|",
    ]

    def ms(read: int, **match) -> str:
        row = next((r for r in table.blocks if r["read"] == read and all(r[k] == v for k, v in match.items())), None)
        return "–" if row is None else f"{row['ms']:.4g}"

    reads = sorted({row["read"] for row in table.blocks})
    for read in reads:
        lines.append(
            f"| {read} | {ms(read, static=False, **full)} | {ms(read, static=False, **{**full, 'kept': 0.0})} | "
            f"{ms(read, static=True, **full)} |"
        )
    widths = sorted({row["attention_width"] for row in table.blocks})
    lines += [
        "",
        "## One dynamic block reading every token, one side narrower (ms)",
        "",
        "| channels kept | " + " | ".join(side.replace("_", " ") for side in WIDTH_SIDES) + " |",
        "|---|" + "---|" * len(WIDTH_SIDES),
    ]
    for width in widths:
        cells = " | ".join(ms(reads[-1], static=False, **{**full, side: width}) for side in WIDTH_SIDES)
        lines.append(f"| {width:.3g} | {cells} |")
    return "\n".join(lines) + "\n"


def _quiet_gate_lines(gate: Optional[dict]) -> list[str]:
    """What the quiet gate did (tables measured before it had one have none)."""
    if not gate:
        return []
    if not gate["max_wait_seconds"]:
        return ["- Timed without waiting for quiet spells (--quiet-wait-seconds 0)"]
    return [
        f"- Timings that waited for a quiet spell: {gate['waits']} ({gate['waited_seconds']} s in all); that ran "
        f"in a slow spell after waiting {gate['max_wait_seconds']:g} s: {gate['timed_slow']} "
        "(more than a few: measure again on a quieter machine); timed again, having run in a slow spell by the quiet "
        f"level known at the end: {gate.get('timed_again', 0)}"
    ]


def _calibration_line(table: LatencyTable) -> str:
    geometry = table.sizes
    scale, offset = table.calibration(geometry)
    smallest = table.few_tokens_block_ms(geometry)
    line = f"- Calibration: inside the model a block takes {scale:.3f} × its time alone − {offset:.4g} ms"
    if scale == 1.0:
        line += " (the two whole models did not pin a scale between 0.5 and 2: the dense model's offset alone)"
    held = table.inside_model_ms(smallest, geometry) / smallest
    return (
        line + f"; a block faster alone than {smallest:.4g} ms (a few-tokens block) takes {held:.3f} × its time alone"
    )


def write_table(table: LatencyTable, path: Path) -> list[Path]:
    """TABLE.json, with TABLE.md and TABLE.png beside it; the JSON (what methods read) last,
    and nothing written for a table the reader would refuse."""
    path = Path(path)
    table_from_dict(table.to_dict(), source=str(path))
    markdown, png = path.with_suffix(".md"), path.with_suffix(".png")
    write_text_atomic(markdown, table_markdown(table))
    latency_table_png(table, png)
    write_latency_table(table, path)
    return [path, markdown, png]

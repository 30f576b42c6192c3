"""`vitslim latency-table` (vitslim/latency_table.py): a table measured on the tiny model, written
whole and read back; onnxruntime's points go through the exporter; bench puts the prediction
beside the measurement and refuses a table of another runtime. Timings are never asserted."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import run_cli
from tiny import TINY_KWARGS, TINY_MODEL
from torch.utils.flop_counter import FlopCounterMode
from vitslim.deploy.bench import BenchSettings
from vitslim.deploy.errors import DeployError
from vitslim.pruning.latency import read_latency_table, value_step, width_step
from vitslim.pruning.models import create_model, parse_model_kwargs
from vitslim.pruning.plan import ModelSpec, dense_plan
from vitslim.pruning.timm_adapter import block_parts, blocks_of, supported_geometry

from vitslim.core.errors import VitslimError
from vitslim.latency_table import (
    GRID_PASSES,
    KNOWN_LEVEL_TIMEOUTS,
    WHOLE_MODEL_ROUNDS,
    ModuleTimer,
    QuietGate,
    TableSpec,
    block_point,
    few_tokens_plan,
    grid_points,
    measure_table,
    out_of_order,
    write_table,
)
from vitslim.measure import BenchSpec, run_bench

QUICK = BenchSettings(warmup_seconds=0.0, min_seconds=0.0, min_iterations=2, max_rounds=1)
SPEC = ModelSpec("deit_tiny_patch16_224", parse_model_kwargs(TINY_KWARGS))


@pytest.fixture(autouse=True)
def quiet_machine(monkeypatch):
    """The quiet gate's sentinel reads a quiet machine (its real timings of a tiny block would
    make tests wait on a busy one); the tests of the gate script it themselves."""
    monkeypatch.setattr(QuietGate, "sentinel_ms", lambda self: 1.0)


def scripted_sentinel(slow_checks: set[int]):
    """A sentinel reading 1 ms, or 2 ms (a slow spell) at the checks numbered in `slow_checks`."""
    checks = iter(range(1_000_000))
    return lambda self: 2.0 if next(checks) in slow_checks else 1.0


@pytest.fixture(scope="module")
def torch_table(tmp_path_factory):
    """A table measured on the tiny model: every point runs for real, but the time it records is
    its FLOPs' (a tiny model's blocks take microseconds, and a busy machine's timings of them could
    break the reader's checks of a table; nothing here may depend on one machine's timings)."""
    path = tmp_path_factory.mktemp("table") / "tiny.json"
    messages = []
    timed = ModuleTimer.ms

    def flop_ms(self, module, shape, key=None):
        timed(self, module, shape, key)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(torch.randn(1, *shape))
        return 0.01 + 1e-7 * counter.get_total_flops()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ModuleTimer, "ms", flop_ms)
        # one slow spell of two checks, before the 10th timing: it waits for the third
        patch.setattr(QuietGate, "sentinel_ms", scripted_sentinel({9, 10}))
        patch.setattr("vitslim.latency_table.QUIET_POLL_SECONDS", 0.0)
        table = measure_table(TableSpec(SPEC, backend="torch", batch=2), settings=QUICK, progress=messages.append)
    write_table(table, path)
    return path, messages


def test_a_table_is_measured_written_whole_and_read_back(torch_table):
    path, messages = torch_table
    assert path.with_suffix(".md").is_file() and path.with_suffix(".png").is_file()
    table = read_latency_table(path)  # every check of the reader passes on what the measurer writes
    geometry = supported_geometry(create_model(SPEC))
    assert len(table.blocks) == len(grid_points(geometry)) and table.aggregations
    assert table.where["backend"] == "torch" and table.where["runner"]["mode"] == "eager" and table.batch == 2
    # the three whole models WHOLE_MODEL_ROUNDS times each (their medians), then timm's model, then every point
    rounds = WHOLE_MODEL_ROUNDS
    assert messages[0].startswith("latency-table: 1/") and "fixed parts" in messages[rounds - 1]
    assert "dense model" in messages[rounds] and "few-tokens" in messages[3 * rounds - 1]
    assert "timm's model" in messages[3 * rounds]
    assert len(messages) == GRID_PASSES * (len(table.blocks) + len(table.aggregations)) + 3 * rounds + 1
    assert table.where["timings"] == len(messages)
    assert table.where["baseline"] == "timm's model" and table.sha256 is not None
    assert isinstance(table.where["noisy_points"], int) and "stayed noisy" in path.with_suffix(".md").read_text()
    # the quiet gate held the 10th timing through the sentinel's slow spell
    assert table.where["quiet_gate"]["waits"] == 1 and table.where["quiet_gate"]["timed_slow"] == 0
    assert [i for i, message in enumerate(messages) if "waiting for a quiet spell" in message] == [9]
    assert "Timings that waited for a quiet spell: 1 (" in path.with_suffix(".md").read_text()
    # the two calibration models are predicted as they were timed whole
    predicted = table.predict(dense_plan(SPEC, geometry.depth), geometry)
    assert predicted.total_ms == pytest.approx(table.dense_ms) and predicted.fixed_ms == table.fixed_ms
    assert table.predict(few_tokens_plan(SPEC, geometry), geometry).total_ms == pytest.approx(table.few_tokens_ms)


def test_a_block_slower_than_reading_more_tokens_is_out_of_order():
    def row(read, ms, kept=1.0):
        return {"static": False, "read": read, "kept": kept, "attention_width": 1.0, "mlp_width": 1.0, "ms": ms}

    rows = [row(33, 0.28), row(17, 0.30), row(65, 0.54), row(9, 0.10), row(17, 0.05, kept=0.5), row(33, 0.2, kept=0.5)]
    assert out_of_order(rows, 0.05) == [rows[1]]  # 17 tokens slower than 33: the kept-0.5 series is in order
    assert out_of_order([row(17, 0.29), row(33, 0.28)], 0.05) == []  # within the slack


def test_a_point_timed_slow_in_every_pass_is_timed_again(monkeypatch):
    """Both passes time every block reading the second-fewest tokens 3x slow (as a one-core
    onnxruntime session would); they then read slower than the same blocks reading more, and are
    timed again."""
    from vitslim.export.compact import CompactBlock

    geometry = supported_geometry(create_model(SPEC))
    reads = sorted({point["read"] for point in grid_points(geometry)})
    slow_read = reads[1]
    slow_calls = GRID_PASSES * sum(point["read"] == slow_read for point in grid_points(geometry))
    calls, messages = {"slow": 0}, []

    def flop_ms(self, module, shape, key=None):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(torch.randn(1, *shape))
        ms = 0.01 + 1e-7 * counter.get_total_flops()
        if isinstance(module, CompactBlock) and shape[0] == slow_read and calls["slow"] < slow_calls:
            calls["slow"] += 1
            return 3 * ms
        return ms

    monkeypatch.setattr(ModuleTimer, "ms", flop_ms)
    table = measure_table(TableSpec(SPEC, backend="torch", batch=2), settings=QUICK, progress=messages.append)
    assert calls["slow"] == slow_calls and any("again (1)" in message for message in messages)
    assert not out_of_order(table.blocks, 0.05) and table.where["timings"] == len(messages)


@pytest.mark.parametrize(("slow_checks", "timed_again"), [(20, 20), (3, WHOLE_MODEL_ROUNDS)])
def test_what_ran_before_the_quiet_level_was_known_is_timed_again(monkeypatch, slow_checks, timed_again):
    """A run that starts in a slow spell (the sentinel and every timing twice as slow for its first
    20 timings: the whole models, timm's model and the first grid points; or for 3, the first
    rounds of the fixed parts) takes the spell for the machine's quiet level and holds nothing. At
    the end what ran on a slow reading is timed again, held to the level known then (every round of
    a whole model whose median a slow round moved), and the table keeps the quiet times."""
    checks, slow_values, last = [0], set(), {}

    def sentinel_ms(self):
        checks[0] += 1
        return 2.0 if checks[0] <= slow_checks else 1.0

    def flop_ms(self, module, shape, key=None):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(torch.randn(1, *shape))
        ms = 0.01 + 1e-7 * counter.get_total_flops()
        if checks[0] <= slow_checks:
            slow_values.add(2 * ms)
            return 2 * ms
        last[key] = ms
        return ms

    monkeypatch.setattr(QuietGate, "sentinel_ms", sentinel_ms)
    monkeypatch.setattr(ModuleTimer, "ms", flop_ms)
    monkeypatch.setattr("vitslim.latency_table.GRID_PASSES", 1)  # a point's one timing, slow or not
    messages = []
    table = measure_table(TableSpec(SPEC, backend="torch", batch=2), settings=QUICK, progress=messages.append)
    again = [message for message in messages if "a slow spell by the quiet level known now" in message]
    # the timings that ran on a slow reading; those after it read quiet, though the quiet level
    # (the 10th percentile of the checks) took a few more checks to come down
    assert len(again) == table.where["quiet_gate"]["timed_again"] == timed_again
    assert table.where["quiet_gate"]["waits"] == 0 and table.where["timings"] == len(messages)
    assert not {table.fixed_ms, table.dense_ms, table.few_tokens_ms, table.timm_ms} & slow_values
    assert table.dense_ms == last["the dense model as vitslim builds it (the calibration)"]
    assert not {row["ms"] for row in (*table.blocks, *table.aggregations)} & slow_values


def test_the_quiet_gate_waits_out_a_slow_spell_up_to_its_limit():
    """A check more than QUIET_SLACK over the quiet level (a low percentile of the checks so far)
    waits and checks again, at most max_wait_seconds, then lets the timing run, counted."""
    now = [0.0]
    readings = iter([1.0, 1.05, 2.0, 1.9, 1.02, 3.0, 3.0, 3.0, 3.0, 0.9])

    def sleep(seconds):
        now[0] += seconds

    gate = QuietGate(None, None, max_wait_seconds=2.5, sleep=sleep, clock=lambda: now[0])
    gate.sentinel_ms = lambda: next(readings)
    assert gate.wait() == 0.0 and gate.wait() == 0.0  # the first reading, and one within the slack
    assert gate.wait() == 2.0 and (gate.waits, gate.timed_slow) == (1, 0)  # 2.0, 1.9, then 1.02
    assert gate.wait() == 3.0 and (gate.waits, gate.timed_slow) == (2, 1)  # slow past the limit: timed anyway
    assert gate.wait() == 0.0 and gate.quiet_ms < 1.0  # a quieter reading lowers the quiet level
    assert gate.to_dict() == {
        "max_wait_seconds": 2.5,
        "waits": 2,
        "waited_seconds": 5.0,
        "timed_slow": 1,
        "checks": 10,
        "sentinel_quiet_ms": pytest.approx(0.99),
        "known_quiet_ms": None,
    }


def test_one_lucky_reading_does_not_hold_every_later_timing():
    """The quiet level is a low percentile, not the quietest check: one reading far below the
    others (a tiny model's sentinel runs in microseconds) leaves the machine's usual speed quiet."""
    gate = QuietGate(None, None, max_wait_seconds=60.0, sleep=lambda seconds: pytest.fail("waited"))
    readings = iter([1.0] * 20 + [0.5] + [1.0] * 20)
    gate.sentinel_ms = lambda: next(readings)
    assert all(gate.wait() == 0.0 for _ in range(41)) and gate.waits == gate.timed_slow == 0


def test_a_known_quiet_level_holds_timings_that_start_in_a_slow_spell():
    """A gate given the quiet level an earlier gate of its sentinel learned (benchmarks time whole
    models against a table's) waits from its first check, where one of its own would take a slow
    start for quiet."""
    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    readings = iter([2.0, 2.0, 1.05, 2.0])
    gate = QuietGate(None, None, 60.0, sleep=sleep, clock=lambda: now[0], known_quiet_ms=1.0)
    gate.sentinel_ms = lambda: next(readings)
    assert gate.wait() == 2.0 and gate.quiet_ms == 1.0 and gate.waits == 1
    # a machine slower than the known level since: after KNOWN_LEVEL_TIMEOUTS timings waited out in
    # a row, the gate learns its own level
    slower = QuietGate(None, None, 2.0, sleep=sleep, clock=lambda: now[0], known_quiet_ms=1.0)
    slower.sentinel_ms = lambda: 2.0
    for _ in range(KNOWN_LEVEL_TIMEOUTS):
        assert slower.known_quiet_ms == 1.0 and slower.wait() >= 2.0
    assert slower.known_quiet_ms is None and slower.wait() == 0.0 and slower.timed_slow == KNOWN_LEVEL_TIMEOUTS
    unknown = QuietGate(None, None, 60.0, sleep=lambda seconds: pytest.fail("waited"))
    unknown.sentinel_ms = lambda: 2.0
    assert unknown.wait() == 0.0 and unknown.quiet_ms == 2.0


def test_a_quiet_gate_of_zero_seconds_never_runs_the_sentinel():
    gate = QuietGate(None, None, max_wait_seconds=0.0)
    gate.sentinel_ms = lambda: pytest.fail("the sentinel ran")
    assert gate.wait() == 0.0 and gate.to_dict()["sentinel_quiet_ms"] is None


def test_the_sentinel_times_a_real_block(tmp_path, monkeypatch):
    monkeypatch.undo()  # the real sentinel, not quiet_machine's stand-in
    model = create_model(SPEC)
    geometry = supported_geometry(model)
    timer = ModuleTimer(TableSpec(SPEC, backend="onnxruntime", batch=2), QUICK, tmp_path)
    block = timer.block(
        block_parts(blocks_of(model)[0]), geometry, static=False, read=9, kept=1.0, attention_width=1.0, mlp_width=1.0
    )
    with timer.runner(block, (9, geometry.dim)) as runner:
        gate = QuietGate(runner, timer.inputs((9, geometry.dim)), max_wait_seconds=1.0)
        assert 0 < gate.sentinel_ms() < 1e4


def test_grid_points_build_the_blocks_they_name():
    model = create_model(SPEC)
    geometry = supported_geometry(model)
    plan = block_point(geometry, static=True, read=9, kept=0.5, attention_width=0.5, mlp_width=1.0)
    assert len(plan.kept_tokens) == 1 + 4 and plan.kept_tokens[0] == 0  # the class token and 4 of 8 patches
    assert plan.static_attention.shape == (geometry.num_heads, 5, 9)
    assert len(plan.qkv_in) == geometry.dim // 2 and len(plan.proj_in) == geometry.attn_dim // 2
    assert plan.fc1_in is None and plan.hidden is None
    # just below 1 on a side: one input channel fewer (the Gather's step); any kept < 1 drops a patch
    step = block_point(geometry, static=False, read=9, kept=0.99, attention_width=1.0, mlp_width=width_step(geometry))
    assert len(step.fc1_in) == geometry.dim - 1 and len(step.kept_tokens) == 8 and step.qkv_in is None
    widths = {p["mlp_width"] for p in grid_points(geometry)}
    assert width_step(geometry) in widths
    # the attention side also at its value step: one channel fewer per value head (this model's step)
    attention = {p["attention_width"] for p in grid_points(geometry)}
    assert attention == widths | {value_step(geometry)} and value_step(geometry) == 1 - 1 / geometry.head_dim
    value = block_point(geometry, static=False, read=9, kept=1.0, attention_width=value_step(geometry), mlp_width=1.0)
    assert len(value.proj_in) == geometry.attn_dim - geometry.num_heads


def test_onnxruntime_points_are_exported_and_timed(tmp_path):
    """An onnxruntime point goes through the exporter's graph passes before it is timed."""
    model = create_model(SPEC)
    geometry = supported_geometry(model)
    timer = ModuleTimer(TableSpec(SPEC, backend="onnxruntime", batch=2), QUICK, tmp_path)
    block = timer.block(
        block_parts(blocks_of(model)[0]), geometry, static=False, read=9, kept=0.5, attention_width=0.75, mlp_width=0.5
    )
    assert timer.ms(block, (9, geometry.dim)) > 0
    assert (tmp_path / "point1.onnx").is_file() and timer.description["backend"] == "onnxruntime"
    # timm's own model (the baseline of --target-speedup) goes through the same exporter
    assert timer.ms(model, (3, 16, 16)) > 0 and (tmp_path / "point2.onnx").is_file()


def test_a_point_timed_again_is_exported_once(tmp_path):
    """Under a key, a module is exported the first time it is timed; export_all exports many at
    once in worker processes (the grid's points before the first pass), and timing reads those."""
    model = create_model(SPEC)
    geometry = supported_geometry(model)
    timer = ModuleTimer(TableSpec(SPEC, backend="onnxruntime", batch=2, export_workers=2), QUICK, tmp_path)
    parts = block_parts(blocks_of(model)[0])
    points = {
        read: (
            timer.block(parts, geometry, static=False, read=read, kept=1.0, attention_width=1.0, mlp_width=0.5),
            (read, geometry.dim),
        )
        for read in (5, 9, 17)
    }
    timer.export_all((read, *point) for read, point in points.items())
    assert sorted(path.name for path in tmp_path.glob("*.onnx")) == ["point1.onnx", "point2.onnx", "point3.onnx"]
    first = timer.exported[17].stat().st_mtime_ns
    assert all(timer.ms(*points[17], key=17) > 0 for _ in range(2))
    assert timer.exported[17].stat().st_mtime_ns == first and timer.count == 3
    assert timer.ms(*points[5]) > 0 and timer.count == 4  # no key: exported anew


def test_an_exported_grid_is_exported_once_for_both_passes(tmp_path, monkeypatch):
    """measure_table on an exporting runtime exports each grid point and each whole model once,
    before it is timed, however often it is timed (a stand-in exporter and clock here)."""
    exported, timed = [], []

    def export_stand_in(module, shape, path, attention, precision):
        exported.append(path)
        path.write_bytes(b"")

    def flop_ms(self, module, shape, key=None):
        timed.append(self.onnx_path(module, shape, key))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(torch.randn(1, *shape))
        return 0.01 + 1e-7 * counter.get_total_flops()

    monkeypatch.setattr("vitslim.latency_table.export_point", export_stand_in)
    monkeypatch.setattr(ModuleTimer, "ms", flop_ms)
    messages = []
    # no sentinel: it would run the stand-in's empty ONNX
    spec = TableSpec(SPEC, backend="onnxruntime", batch=2, quiet_wait_seconds=0)
    table = measure_table(spec, settings=QUICK, progress=messages.append)
    grid = len(table.blocks) + len(table.aggregations)
    assert any(f"exporting {grid} points in 1 process(es)" in message for message in messages)
    assert len(exported) == len(set(exported)) == grid + 4  # the grid, three whole models, timm's model
    assert set(timed) == set(exported) and len(timed) == GRID_PASSES * grid + 3 * WHOLE_MODEL_ROUNDS + 1


def test_tensorrt_points_are_built_into_engines_for_the_tables_batch(tmp_path, monkeypatch):
    """A TensorRT point is exported, then built (with the TensorRT installed here: TensorRT-RTX
    builds on the CPU) into an engine whose one profile is the table's batch; running it needs a
    GPU, so a stand-in runner takes the engine here (`vitslim selftest` runs real engines)."""
    from vitslim.deploy.manifest import read_manifest
    from vitslim.deploy.runners import Runner
    from vitslim.deploy.tensorrt_lib import find_tensorrt

    if find_tensorrt() is None:
        pytest.skip("no TensorRT or TensorRT-RTX installed here to build engines with")
    engines = []

    class EngineStandIn(Runner):
        backend = "tensorrt"

        def __init__(self, engine_path, cuda_graph=True):
            engines.append((engine_path, cuda_graph))

        def infer_impl(self, images):
            return images

    monkeypatch.setattr("vitslim.latency_table.TensorRTRunner", EngineStandIn)
    model = create_model(SPEC)
    geometry = supported_geometry(model)
    timer = ModuleTimer(TableSpec(SPEC, backend="tensorrt", device="cuda", batch=2), QUICK, tmp_path)
    block = timer.block(
        block_parts(blocks_of(model)[0]), geometry, static=False, read=9, kept=0.5, attention_width=0.75, mlp_width=0.5
    )
    assert timer.ms(block, (9, geometry.dim)) > 0
    ((engine, cuda_graph),) = engines
    manifest = read_manifest(engine)
    assert engine == tmp_path / "point1.engine" and cuda_graph
    assert manifest["profiles"] == [{"min": 2, "opt": 2, "max": 2}] and manifest["precision"] == "fp32"


def test_bench_puts_the_prediction_beside_the_measurement(torch_table, tiny_run):
    path, _ = torch_table
    spec = BenchSpec(artifact=str(tiny_run), backend="torch", batches=(2,), latency_table=str(path))
    report = run_bench(spec, QUICK)
    prediction = report["prediction"]
    assert prediction["batch"] == 2 and prediction["predicted_ms"] > 0 and prediction["measured_ms"] > 0
    assert prediction["error"] == pytest.approx(prediction["measured_ms"] / prediction["predicted_ms"] - 1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"backend": "onnxruntime"}, "measured with backend 'torch' but this bench runs 'onnxruntime'"),
        ({"batches": (4,)}, "is for batch 2: add --batch 2"),
    ],
)
def test_bench_refuses_a_table_of_another_runtime(torch_table, tiny_run, tmp_path, change, message):
    path, _ = torch_table
    artifact = str(tiny_run)
    if change.get("backend") == "onnxruntime":
        completed = run_cli("export", str(tiny_run), "--out", str(tmp_path / "m.onnx"))
        assert completed.returncode == 0, completed.stderr
        artifact = str(tmp_path / "m.onnx")
    spec = BenchSpec(
        **{"artifact": artifact, "backend": "torch", "batches": (2,), "run_dir": str(tiny_run), **change},
        latency_table=str(path),
    )
    with pytest.raises(DeployError, match=message):
        run_bench(spec, QUICK)


def test_bench_needs_the_run_for_a_prediction(torch_table, tmp_path, tiny_run):
    completed = run_cli("export", str(tiny_run), "--out", str(tmp_path / "m.onnx"))
    assert completed.returncode == 0, completed.stderr
    spec = BenchSpec(
        artifact=str(tmp_path / "m.onnx"), backend="onnxruntime", batches=(2,), latency_table=str(torch_table[0])
    )
    with pytest.raises(DeployError, match="add --run RUN_DIR"):
        run_bench(spec, QUICK)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "openvino"], "latency tables are measured with"),
        (["--backend", "tensorrt"], "runs engines on a GPU: add --device cuda"),
        (["--run", "somewhere"], "give --model NAME"),
        (["--precision", "int8"], "is not one of"),
        (["--batch", "0"], "must be >= 1"),
        (["--export-workers", "0"], "--export-workers 0 must be >= 1"),
        (["--quiet-wait-seconds", "-1"], "--quiet-wait-seconds -1.0 must be >= 0"),
        (["--quiet-wait-seconds", "nan"], "--quiet-wait-seconds nan must be >= 0"),
    ],
)
def test_latency_table_refuses_bad_settings_in_one_line(args, message, tmp_path):
    out = tmp_path / "t.json"
    completed = run_cli("latency-table", *TINY_MODEL, "--out", str(out), *args)
    assert completed.returncode == 3, completed.stderr
    assert message in completed.stderr and len(completed.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_latency_table_warns_when_timings_ran_in_a_slow_spell(torch_table, tmp_path, monkeypatch, capsys):
    """Timings the quiet gate let run slow after its limit are named on stderr with the fix."""
    import dataclasses

    from vitslim.cli import main

    table = read_latency_table(torch_table[0])
    slow = dataclasses.replace(
        table, where={**table.where, "quiet_gate": {**table.where["quiet_gate"], "timed_slow": 2}}
    )
    monkeypatch.setattr("vitslim.latency_table.measure_table", lambda spec, progress: slow)
    assert main(["latency-table", *TINY_MODEL, "--out", str(tmp_path / "t.json")]) == 0
    assert "warning: 2 timings ran in a slow spell" in capsys.readouterr().err
    assert "that ran in a slow spell after waiting 60 s: 2" in (tmp_path / "t.md").read_text()


def test_prune_reports_predicted_latency(torch_table, tiny_run, tmp_path):
    """The CLI prune line and prune_report.md show the table's prediction beside MACs."""
    path, _ = torch_table
    table = json.loads(path.read_text())
    out = tmp_path / "glad"
    completed = run_cli(
        "prune", str(tiny_run), "--method", "dgssa-glad", "--static-blocks", "1", "--finetune-epochs", "0",
        "--calibration-images", "16", "--data", "digits", "--latency-table", str(path), "--out", str(out),
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert "predicted" in completed.stdout and "x timm" in completed.stdout
    report = (out / "prune_report.md").read_text()
    assert "Latency predicted on torch eager" in report and f"batch {table['batch']}" in report


def test_a_recipe_names_its_latency_table_relative_to_itself(tmp_path):
    from vitslim.recipe import recipe_from_dict

    data = {
        "model": {"name": "deit_tiny_patch16_224", "kwargs": {}},
        "methods": {"vtp": {"latency_table": "tables/cpu.json", "target_speedup": 1.5}},
    }
    recipe = recipe_from_dict(data, base=tmp_path)
    assert dict(recipe.methods)["vtp"].latency_table == str(tmp_path / "tables/cpu.json")


def test_whole_models_out_of_order_are_refused_before_the_grid(monkeypatch):
    """A busy machine that times the dense model faster than the few-tokens model is told so after
    the whole models, not after minutes of grid points."""
    timed = []

    def out_of_order(self, module, shape, key=None):
        timed.append(module)
        return 1.0  # every whole model as fast as the next

    monkeypatch.setattr(ModuleTimer, "ms", out_of_order)
    with pytest.raises(VitslimError, match="did not time in that order: measure on a quiet machine"):
        measure_table(TableSpec(SPEC, backend="torch", batch=2), settings=QUICK)
    assert len(timed) == 3 * WHOLE_MODEL_ROUNDS  # three whole models, each that many times; no grid point

"""The benchmark harness on a tiny model on the CPU: its structures, its ToMe, its report (not speed)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_vit
from vitslim.deploy.bench import BenchSettings
from vitslim.pruning.macs import kept_channels, plan_macs
from vitslim.pruning.models import create_model
from vitslim.pruning.plan import ModelSpec, dense_plan, validate
from vitslim.pruning.timm_adapter import geometry_of

from benchmarks import timing
from benchmarks.operating_points import DGSSA_LADDER, PATCH_SLIMMING_GMACS, operating_points
from benchmarks.report import write_report
from benchmarks.tome import ToMe, merge_tokens, schedule_for_macs, tome_macs

# deit_small by name, so that the layout variants and the DGSSA target rows exist; tiny by kwargs
TINY = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 6, "num_heads": 2, "num_classes": 10}
QUICK = BenchSettings(warmup_seconds=0, min_seconds=0, min_iterations=2, max_rounds=1)


def test_tome_without_merging_is_timm_and_its_merge_keeps_mass():
    model = tiny_vit(depth=4, embed_dim=64).eval()
    images = torch.randn(3, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        assert torch.allclose(ToMe(model, [0] * 4)(images), model(images), atol=1e-5)
        x, size, keys = torch.randn(2, 17, 8), torch.rand(2, 17, 1) + 0.5, torch.randn(2, 17, 4)
        merged, new_size = merge_tokens(x, size, keys, 5, num_prefix=1)
        assert merged.shape == (2, 12, 8) and new_size.shape == (2, 12, 1)
        torch.testing.assert_close(new_size.sum(1), size.sum(1))  # sizes add
        torch.testing.assert_close((merged * new_size).sum(1), (x * size).sum(1))  # size-weighted averages
        torch.testing.assert_close(merged[:, 0], x[:, 0])  # the class token never merges
        one_hot, _ = merge_tokens(x, size, keys, 5, num_prefix=1, scatter=False)
        torch.testing.assert_close(one_hot, merged)


def test_tome_macs_count_like_vitslim_and_the_schedule_matches_a_target():
    geometry = geometry_of(tiny_vit(depth=6, embed_dim=64))
    dense = plan_macs(dense_plan(ModelSpec("tiny"), 6), geometry)["total"]
    assert tome_macs([0] * 6, geometry) == dense
    assert tome_macs([2] * 6, geometry) < tome_macs([1] * 6, geometry) < dense
    schedule = schedule_for_macs(int(0.6 * dense), geometry)
    assert abs(tome_macs(schedule, geometry) / dense - 0.6) < 0.03
    with pytest.raises(ValueError, match="set A"):
        tome_macs([40] * 6, geometry)


def test_operating_points_land_on_the_papers_and_are_valid():
    spec = ModelSpec("deit_small_patch16_224")
    model = create_model(spec)
    geometry = geometry_of(model)
    points = {p.variant: p for p in operating_points(model, dense_plan(spec, geometry.depth), layouts=True)}
    slim = points["patch-slim"]
    assert (
        PATCH_SLIMMING_GMACS["deit_small_patch16_224"] * 0.99
        < slim.macs / 1e9
        <= PATCH_SLIMMING_GMACS["deit_small_patch16_224"]
    )
    counts = slim.notes["patches_per_block"]
    assert counts[0] == geometry.num_patches and counts[-1] == 0 and counts == sorted(counts, reverse=True)
    assert abs(points["tome"].macs / slim.macs - 1) < 0.01 and points["tome r=13"].tome_schedule == (13,) * 12
    for point in points.values():
        if point.plan is not None:
            validate(point.plan, geometry)
    ladder = [points[s.name()].macs for s in DGSSA_LADDER]
    assert ladder == sorted(ladder, reverse=True)  # ever stronger
    vtp = points["vtp 40%"].plan
    kept = [kept_channels(block, geometry) for block in vtp.blocks]
    hidden_cut = sum(geometry.mlp_hidden - k["hidden"] for k in kept)
    other_cut = sum(geometry.channel_sizes[s] - k[s] for k in kept for s in ("qkv_in", "proj_in", "fc1_in"))
    assert hidden_cut > 3 * other_cut  # a trained VTP run prunes mostly MLP hidden units


@pytest.mark.slow
def test_harness_and_report_end_to_end_on_a_tiny_model(tmp_path):
    variants = ["patch-slim", "vtp 40%", DGSSA_LADDER[-1].name(), "tome", "tome one-hot"]
    gpu_rows = timing.time_gpu(
        ["deit_small_patch16_224"],
        ["eager"],
        [2],
        [],
        dtype="fp32",
        device="cpu",
        settings=QUICK,
        progress=lambda _: None,
        model_kwargs=TINY,
        variants=variants,
    )
    assert [r["variant"] for r in gpu_rows] == ["dense", *variants]
    assert gpu_rows[0]["speedup"] == 1.0 and all(r["median_ms"] > 0 and 0 < r["macs_fraction"] <= 1 for r in gpu_rows)
    cpu_rows, sizes = timing.time_cpu(
        ["deit_small_patch16_224"],
        [2],
        tmp_path / "onnx",
        settings=QUICK,
        progress=lambda _: None,
        model_kwargs=TINY,
        variants=["patch-slim", "tome", "tome one-hot"],
    )
    by_variant = {s["variant"]: s for s in sizes}
    assert by_variant["patch-slim"]["data_dependent_ops"] == {} and "engine_bytes" in by_variant["patch-slim"]
    assert (
        by_variant["tome"]["data_dependent_ops"]["ScatterElements"] > 0 and "engine_error" in by_variant["tome"]
    )  # RTX refuses reduction add
    assert (
        "ScatterElements" not in by_variant["tome one-hot"]["data_dependent_ops"]
        and "engine_bytes" in by_variant["tome one-hot"]
    )
    assert (
        by_variant["tome"]["parity"]["max_abs_diff"] < 1e-4
        and by_variant["tome"]["tensors_with_dynamic_dims_besides_batch"] == 0
    )
    results = tmp_path / "results"
    results.mkdir()
    # the GPU rows stand in for a CUDA run: the report must not care where they were measured
    for row in gpu_rows:
        row.update(mode="cuda_graph", batch=256)
    environment = timing.environment("cpu")
    (results / "gpu.json").write_text(json.dumps({"environment": environment, "settings": {}, "rows": gpu_rows}))
    (results / "cpu.json").write_text(
        json.dumps({"environment": environment, "settings": {}, "rows": cpu_rows, "sizes": sizes})
    )
    out = write_report(results, tmp_path / "BENCHMARKS.md")
    text = out.read_text()
    assert "## Targets" in text and "DGSSA + GLAD ≥ 2.2× on DeiT-S" in text and "| tome |" in text
    assert (
        "(theirs, not measured here)" in text
        and (results / "gpu_speedup.png").stat().st_size > 0
        and (results / "cpu_speedup.png").exists()
    )


def test_onnx_gpu_targets_are_judged_from_the_rows(tmp_path):
    """The section reads every verdict off the measured rows: the stored H200 results, then the
    same rows with the Patch Slimming ONNX made slower than timm, which must fail its targets."""
    import copy
    from pathlib import Path

    from benchmarks.onnx_gpu_report import section, targets

    stored = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "onnx_gpu.json").read_text())
    lines = targets(stored)
    ps = next(line for line in lines if line.startswith("| Patch Slimming DeiT-S 2.6 G ONNX ≥ 1.2× timm in PyTorch"))
    slowed = copy.deepcopy(stored)
    for row in slowed["rows"]:
        if row["variant"] == "patch-slim" and row["graph"].startswith("ONNX"):
            row["speedup"], row["speedup_over_timm_onnx"] = 0.9, 1.1
    slowed_ps = next(
        line for line in targets(slowed) if line.startswith("| Patch Slimming DeiT-S 2.6 G ONNX ≥ 1.2× timm in PyTorch")
    )
    assert slowed_ps.endswith("**not met** |") and "0.90×" in slowed_ps
    assert ps != slowed_ps
    text = "\n".join(section(stored, tmp_path, Path("results")))
    assert (tmp_path / "onnx_gpu_speedup.png").stat().st_size > 0 and "### Batch 256" in text


def _accuracy_rows(latency_speedup: float, latency_top1: float) -> dict:
    row = {"seed": 0, "static_blocks": 0, "pyramid": [[0, 32]], "macs_fraction": 0.48, "predicted_speedup": 2.1}
    return {
        "environment": {
            "host": {"cpu": "a CPU", "cores": 2},
            "onnxruntime": "1.0",
            "batch": 8,
            "date": "2026-01-01",
            "method_settings": {"max_static_blocks": 3, "pyramid": "auto"},
            "target_speedup": 2.0,
            "tolerance": 0.05,
            "mac_grid": [0.7, 0.68, 0.3],
            "timing_rounds": 5,
        },
        "rows": [
            {
                **row,
                "kind": "MAC target",
                "target_macs": 0.56,
                "measured_speedup": 2.02,
                "measured_ms": 1.5,
                "top1_onnx": 97.0,
            },
            {
                **row,
                "kind": "latency target",
                "target_macs": None,
                "measured_speedup": latency_speedup,
                "measured_ms": 1.5,
                "top1_onnx": latency_top1,
            },
        ],
    }


@pytest.mark.parametrize(
    "latency_speedup, latency_top1, verdict",
    # 1.80x and 2.40x: not at the MAC arm's 2.02x (within 5 %), whatever the top-1
    [(1.97, 97.0, "**met**"), (1.97, 96.9, "**not met**"), (1.80, 97.5, "**not met**"), (2.40, 97.5, "**not met**")],
)
def test_the_digits_accuracy_target_needs_the_latency_arm_on_time_and_as_accurate(
    latency_speedup, latency_top1, verdict
):
    from benchmarks.latency_model_report import _accuracy_target, accuracy_table

    accuracy = _accuracy_rows(latency_speedup, latency_top1)
    row = _accuracy_target(accuracy)
    assert row.endswith(f"| {verdict} |") and "{" not in row
    assert f"top-1 {latency_top1:.2f} % at {latency_speedup:.2f}x vs 97.00 % at 2.02x" in row
    table = "\n".join(accuracy_table(accuracy))
    assert (
        "{" not in table
        and "| 0 | MAC target (0.56) | 0 | [[0, 32]] | 48.0% | 2.08x | 2.10x | 2.02x (1.500) | 0.97 | 97.00 |" in table
    )
    assert "(--max-static-blocks 3 --pyramid auto)" in table


def test_latency_results_of_one_batch_replace_that_batch(tmp_path):
    """A later run of one batch (latency_model_gpu_64.json, one device call) replaces batch 64 of
    the run of every batch (latency_model_gpu.json) and keeps its batch 256; a file of one batch
    older than the run of every batch replaces nothing."""
    from benchmarks.latency_model_report import _load

    def result(tag: str, date: str, batches: tuple[int, ...]) -> dict:
        return {
            "environment": {"where": "gpu", "date": date, "run": tag},
            "tables": [{"batch": batch, "run": tag} for batch in batches],
            "rows": [{"batch": batch, "run": tag} for batch in batches],
        }

    def runs(merged: dict) -> list:
        tables = sorted((t["batch"], t["run"]) for t in merged["tables"])
        assert sorted((row["batch"], row["run"]) for row in merged["rows"]) == tables
        return tables

    (tmp_path / "latency_model_gpu.json").write_text(json.dumps(result("both", "2026-12-04", (64, 256))))
    (tmp_path / "latency_model_gpu_64.json").write_text(json.dumps(result("later", "2026-12-04", (64,))))
    merged = _load(tmp_path, "gpu")
    assert runs(merged) == [(64, "later"), (256, "both")] and merged["environment"]["run"] == "later"
    (tmp_path / "latency_model_gpu_64.json").write_text(json.dumps(result("older", "2026-12-01", (64,))))
    merged = _load(tmp_path, "gpu")
    assert runs(merged) == [(64, "both"), (256, "both")] and merged["environment"]["run"] == "both"
    assert _load(tmp_path, "cpu") is None


def test_the_latency_report_names_each_batchs_gpu_and_how_it_was_predicted():
    """Results of one runtime may come from GPUs of two kinds (one device call per batch) and from
    tables measured before the attention side's value step: the report names both per batch."""
    from tables import mac_table

    from benchmarks.latency_model_report import _card, _table_model, _table_model_key

    geometry = geometry_of(create_model(ModelSpec("deit_small_patch16_224", {**TINY, "embed_dim": 128})))
    with_step = mac_table(geometry)
    before = {**with_step, "blocks": [r for r in with_step["blocks"] if r["attention_width"] != 0.875]}
    assert _table_model_key(with_step) == "3 + value step" and _table_model_key(before) == "3"
    # a width of the attention side's own that is not the value step does not make it one
    other = [{**r, "attention_width": 0.625} for r in before["blocks"] if r["attention_width"] == 0.75]
    assert _table_model_key({**before, "blocks": before["blocks"] + other}) == "3"
    # table_version 1 had one width axis (no attention side): named by its version
    one_axis = [
        {"static": r["static"], "read": r["read"], "kept": r["kept"], "width": 1.0, "ms": r["ms"]}
        for r in before["blocks"]
    ]
    assert _table_model_key({**before, "table_version": 1, "blocks": one_axis}) == "1"
    gpu = {"device": "cuda"}
    data = {
        "environment": {"host": {"cores": 2}},
        "tables": [
            {**before, "batch": 64, "where": {**gpu, "device_name": "NVIDIA H200"}},
            {**with_step, "batch": 256, "where": {**gpu, "device_name": "NVIDIA H100 80GB HBM3"}},
        ],
    }
    assert (_card(data, 64), _card(data, 256)) == ("H200", "H100")
    assert "table_version 3:" in _table_model(data) and "value step:" in _table_model(data)
    cpu = {"environment": {"host": {"cores": 2}}, "tables": [{"batch": 8, "where": {"device": "cpu"}}]}
    assert _card(cpu, 8) == "this 2-core CPU"


def test_the_latency_benchmarks_searches_meet_their_targets_on_a_table_built_here():
    """Each search of benchmarks/latency_model.py, the token search from a VTP start (methods
    compose) among them, finds a valid plan predicted within its target on a table of MAC costs."""
    from tables import mac_table
    from vitslim.pruning.latency import table_from_dict

    from benchmarks.latency_model import TARGET_SPEEDUPS, targeted_plans

    model = create_model(ModelSpec("deit_small_patch16_224", TINY)).eval()
    geometry, base = geometry_of(model), dense_plan(ModelSpec("deit_small_patch16_224", TINY), 6)
    dense_ms = table_from_dict(mac_table(geometry)).predict(base, geometry).total_ms
    table = table_from_dict({**mac_table(geometry), "timm_ms": dense_ms})  # timm's model as fast as the dense plan
    plans = targeted_plans(model, base, table, geometry)
    assert set(plans) == set(TARGET_SPEEDUPS)
    for method, (plan, target, round_to) in plans.items():
        assert (round_to is not None) == (method == "vtp")  # VTP's search chose a rounding
        validate(plan, geometry)
        assert target == pytest.approx(dense_ms / TARGET_SPEEDUPS[method])
        assert table.predict(plan, geometry).total_ms <= target, method
    composed = plans["vtp+patch-slim"][0]
    assert composed.method == "vtp+patch-slim"
    assert any(block.hidden is not None for block in composed.blocks)
    assert any(block.kept_tokens is not None for block in composed.blocks)


def test_the_latency_report_names_vtps_rounding_where_its_search_chose_one():
    from benchmarks.latency_model_report import _rounding

    searched = {"kind": "latency target", "variant": "vtp for 1.25x", "round_to": 32}
    assert _rounding(searched) == " (rounding 32)"
    before = {key: value for key, value in searched.items() if key != "round_to"}
    assert "rounding 8; searched before" in _rounding(before)  # results from before VTP searched its rounding
    assert _rounding({"kind": "operating point", "variant": "vtp 40%"}) == ""
    assert _rounding({"kind": "latency target", "variant": "vtp+patch-slim for 1.6x"}) == ""


def test_the_latency_report_names_the_composed_search_only_where_results_hold_it():
    from benchmarks.latency_model_report import _composed_text

    row = {"variant": "patch-slim for 1.4x"}
    assert _composed_text({"cpu": {"rows": [row]}}) == ""  # results from before methods composed
    composed = {"rows": [row, {"variant": "vtp+patch-slim for 1.6x"}], "composed_vtp_ratio": 0.2}
    assert "from a VTP start that removed 20% of the gated dims" in _composed_text({"cpu": composed})
    unrecorded = {"rows": composed["rows"]}
    assert _composed_text({"cpu": unrecorded}).startswith(", and Patch Slimming's token search from a VTP start (")


def test_the_calibration_profile_gives_kernel_time_to_the_token_count_it_reads(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from benchmarks.calibration_profile import kernel_ms_by_tokens

    weight = numpy_helper.from_array(np.ones((16, 16), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 13, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 13, 16])],
        [weight],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    by_tokens, wall_ms = kernel_ms_by_tokens(path, np.zeros((4, 13, 16), np.float32), batch=4)
    assert list(by_tokens) == [13] and by_tokens[13] > 0 and wall_ms > 0


def test_the_drift_summary_splits_rounds_by_what_the_sentinel_read():
    from benchmarks.machine_drift import READS, summary

    def round_(sentinel_ms, extra_ms):
        return {"seconds": 0.0, "sentinel_ms": sentinel_ms, **{str(read): read / 10 + extra_ms for read in READS}}

    rounds = [round_(1.0, 0.0), round_(1.02, 0.0), round_(1.5, 1.5), round_(1.0, 0.0)]
    result = summary(rounds)
    assert result["rounds"] == 4 and result["sentinel_slow_rounds"] == 1
    block = result[str(READS[0])]
    assert block["rounds_agreeing_with_sentinel"] == (4 if READS[0] / 10 + 1.5 > 1.15 * READS[0] / 10 else 3)
    assert block["median_when_sentinel_quiet_ms"] == pytest.approx(READS[0] / 10)
    assert block["median_when_sentinel_slow_ms"] == pytest.approx(READS[0] / 10 + 1.5)
    assert block["quietest_ms"] == pytest.approx(READS[0] / 10) and block["slowest_ms"] == pytest.approx(
        READS[0] / 10 + 1.5
    )

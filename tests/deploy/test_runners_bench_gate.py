"""Runners against the masked reference, the benchmark statistics, and the regression gate."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from conftest import tiny_vit
from vitslim.deploy.bench import BenchSettings, benchmark, fingerprint_id, summarize
from vitslim.deploy.gate import NOT_COMPARABLE, PASS, REGRESSION, compare_results
from vitslim.deploy.runners import OnnxRuntimeRunner, Runner, TensorRTRunner, TorchRunner
from vitslim.deploy.tensorrt_lib import find_tensorrt
from vitslim.export.compact import compact_from_plan
from vitslim.export.onnx_export import export_plan
from vitslim.pruning.plan import BlockPlan, ModelSpec, dense_plan
from vitslim.pruning.reference import MaskedReference

from benchmarks.gate_ab import SlowedRunner
from vitslim.core.precision import TOLERANCES, compare_outputs

MODEL = tiny_vit()
PLAN = (
    dense_plan(ModelSpec("tiny"), 3)
    .with_block(0, BlockPlan(kept_tokens=(0, 1, 4, 9, 12), hidden=tuple(range(64))))
    .with_block(2, BlockPlan(kept_tokens=(0,)))
)
IMAGES = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)
QUICK = BenchSettings(warmup_seconds=0.2, min_seconds=0.5, min_iterations=12, max_cov=10.0, max_rounds=1)


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    return export_plan(MODEL, PLAN, tmp_path_factory.mktemp("r") / "m.onnx", images=torch.from_numpy(IMAGES)).onnx_path


def reference(images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return MaskedReference(MODEL, PLAN)(torch.from_numpy(images)).numpy()


def test_torch_and_onnxruntime_runners_match_the_reference(onnx_path):
    for runner in (TorchRunner(compact_from_plan(MODEL, PLAN)), OnnxRuntimeRunner(onnx_path)):
        with runner:
            for batch in (1, 5, 8):
                assert compare_outputs(reference(IMAGES[:batch]), runner.infer(IMAGES[:batch])).max_abs_diff <= 1e-4, (
                    runner.backend
                )


def test_summarize_statistics():
    stats = summarize([1.0] * 98 + [10.0, 20.0], batch=4)
    assert stats["median_ms"] == 1.0 and stats["min_ms"] == 1.0 and stats["max_ms"] == 20.0
    assert stats["p99_ms"] > stats["p95_ms"] >= stats["p90_ms"] == 1.0
    assert stats["throughput_per_s"] == pytest.approx(4000.0) and stats["cov"] > 1.0


class SteadyRunner(Runner):
    """A stand-in backend whose inference takes a fixed 40 ms of wall time, so that a 15 % change
    stands far above the load swings of a shared CI machine (a real model's CPU time does not)."""

    backend = "steady"

    def infer_impl(self, images):
        time.sleep(0.04)
        return np.zeros((len(images), 5), dtype=np.float32)


def bench(runner: Runner, label: str) -> dict:
    with runner:
        return benchmark(runner, np.resize(IMAGES, (32, 3, 16, 16)), "fp32", "sha", QUICK, label=label)


def test_gate_passes_itself_fails_a_15_percent_slowdown_and_refuses_other_fingerprints():
    baseline = bench(SteadyRunner(), "steady")
    assert compare_results([baseline], [baseline], max_cov=10.0).exit_code == PASS
    slowed = bench(SlowedRunner(SteadyRunner(), 0.15), "steady")
    assert slowed["fingerprint_id"] == baseline["fingerprint_id"]
    verdict = compare_results([slowed], [baseline], warn=0.05, fail=0.10, max_cov=10.0)
    assert verdict.exit_code == REGRESSION, verdict.table()
    other = {**baseline, "fingerprint": {**baseline["fingerprint"], "precision": "fp16"}}
    other["fingerprint_id"] = fingerprint_id(other["fingerprint"])
    refused = compare_results([other], [baseline], max_cov=10.0)
    assert (
        refused.exit_code == NOT_COMPARABLE and "precision is 'fp16' here but 'fp32' in the baseline" in refused.message
    )
    missing = compare_results([{**baseline, "batch": 64}], [baseline], max_cov=10.0)
    assert (
        missing.exit_code == NOT_COMPARABLE
        and "no baseline for steady at batch 64 (the baseline has steady at batch 32)" in missing.message
    )


def test_gate_refuses_noisy_results():
    result = {
        "fingerprint_id": "x",
        "fingerprint": {"batch": 1},
        "batch": 1,
        "median_ms": 1.0,
        "cov": 0.5,
        "label": "a",
    }
    verdict = compare_results([result], [result], max_cov=0.1)
    assert (
        verdict.exit_code == NOT_COMPARABLE
        and verdict.noisy == "baseline"
        and "the baseline of a at batch 1" in verdict.message
    )
    quiet = {**result, "cov": 0.01}
    verdict = compare_results([result], [quiet], max_cov=0.1)  # only measuring CURRENT again can help here
    assert (
        verdict.noisy == "current"
        and "the current a at batch 1 is too noisy" in verdict.message
        and "re-measure" in verdict.message
    )


def test_benchmark_records_a_fingerprint(onnx_path):
    result = bench(OnnxRuntimeRunner(onnx_path), "ort")
    print_ = result["fingerprint"]
    assert print_["batch"] == 32 and print_["precision"] == "fp32" and print_["runner"]["backend"] == "onnxruntime"
    assert print_["host"]["cpu"] and print_["runner"]["onnx_sha256"]
    assert result["iterations"] >= 20 and result["median_ms"] > 0 and result["end_to_end_median_ms"] > 0


@pytest.mark.gpu
def test_torch_cuda_graph_runner_matches_eager():
    compact = compact_from_plan(MODEL, PLAN)
    with TorchRunner(compact, device="cuda", mode="cuda_graph") as graphed:
        np.testing.assert_allclose(graphed.infer(IMAGES), reference(IMAGES), atol=TOLERANCES["fp32"].max_abs_diff)


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(find_tensorrt() is None, reason="neither tensorrt nor tensorrt_rtx is installed")
def test_tensorrt_runner_matches_the_reference(tmp_path, onnx_path):
    trt = find_tensorrt()
    from vitslim.deploy.build import engine_from_onnx

    engine = engine_from_onnx(onnx_path, tmp_path / "m.engine").engine_path
    try:
        runner = TensorRTRunner(engine)
        runner.activate()
    except Exception as error:  # e.g. TensorRT-RTX engines on a Hopper GPU
        pytest.skip(f"this GPU cannot run {trt.name} engines: {error}")
    try:
        for batch in (1, 8):
            assert compare_outputs(reference(IMAGES[:batch]), runner.infer(IMAGES[:batch])).passes(TOLERANCES["fp32"])
        # the enqueue replayed from a CUDA graph (RTX: its own) computes the same, and is timed
        prepared = runner.prepare(IMAGES[:8])
        for _ in range(3):
            runner.run_prepared(prepared)
        assert compare_outputs(reference(IMAGES[:8]), runner.bound_output()).passes(TOLERANCES["fp32"])
        assert 0 < runner.time_ms(prepared) < 1000
    finally:
        runner.deactivate()


def test_speed_ups_are_taken_against_the_baseline_beside_the_mac_ideal():
    from vitslim.deploy.bench import speedup_columns

    from vitslim.measure import latency_ratios

    assert speedup_columns(10.0, 5.0, 0.4) == {"speedup": 2.0, "mac_ideal": 2.5, "realised_over_ideal": 0.8}
    results = [
        {"label": "torch:timm", "batch": 8, "median_ms": 10.0},
        {"label": "torch:compact", "batch": 8, "median_ms": 5.0},
        {"label": "onnxruntime:m.onnx", "batch": 8, "median_ms": 4.0},
        {"label": "torch:compact", "batch": 1, "median_ms": 1.0},
    ]
    rows = latency_ratios(results, {"torch:compact": 0.5, "onnxruntime:m.onnx": None})
    # batch 1 has no baseline in the same run: no ratio; unknown MACs: no ideal
    assert rows == [
        {
            "label": "torch:compact",
            "batch": 8,
            "baseline": "torch:timm",
            "speedup": 2.0,
            "mac_ideal": 2.0,
            "realised_over_ideal": 1.0,
        },
        {
            "label": "onnxruntime:m.onnx",
            "batch": 8,
            "baseline": "torch:timm",
            "speedup": 2.5,
            "mac_ideal": None,
            "realised_over_ideal": None,
        },
    ]


def test_bad_timing_settings_are_refused():
    from vitslim.deploy.bench import BenchSettings
    from vitslim.deploy.errors import DeployError

    with pytest.raises(DeployError, match="max-rounds"):
        BenchSettings(max_rounds=0)
    with pytest.raises(DeployError, match="min-iterations"):
        BenchSettings(min_iterations=0)


def test_reference_rows_the_baseline_lacks_are_not_judged_and_junit_shows_every_case():
    """A baseline stored from `bench ARTIFACT` gates a later `bench ARTIFACT --run RUN` (which adds
    torch:timm, torch:compact, torch:dense); the artifact's own rows must still have a twin."""
    from xml.etree import ElementTree

    from vitslim.deploy.gate import junit_xml, verdict_cases

    artifact, timm = bench(SteadyRunner(), "onnxruntime:m.onnx"), bench(SteadyRunner(), "torch:timm")
    timm["reference_row"] = True  # as bench --run marks it
    verdict = compare_results([artifact, timm], [artifact], max_cov=10.0)
    assert verdict.exit_code == PASS and verdict.skipped == ("torch:timm at batch 32",), verdict.message
    assert verdict.message == "pass; not judged (no baseline): torch:timm at batch 32"
    suite = ElementTree.fromstring(junit_xml("vitslim gate", verdict_cases(verdict))).find("testsuite")
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert suite.get("tests") == "2" and suite.get("failures") == "0" and suite.get("skipped") == "1"
    assert cases["torch:timm at batch 32"].find("skipped") is not None
    assert cases["onnxruntime:m.onnx at batch 32"].find("failure") is None
    assert compare_results([timm], [artifact], max_cov=10.0).exit_code == NOT_COMPARABLE
    assert (
        compare_results([artifact], [timm], max_cov=10.0).exit_code == NOT_COMPARABLE
    )  # the artifact's row must have a twin
    slowed = bench(SlowedRunner(SteadyRunner(), 0.3), "onnxruntime:m.onnx")
    regression = compare_results([slowed], [artifact], warn=0.05, fail=0.10, max_cov=10.0)
    suite = ElementTree.fromstring(junit_xml("vitslim gate", verdict_cases(regression))).find("testsuite")
    assert regression.exit_code == REGRESSION and suite.get("failures") == "1"
    assert "ms against" in suite.find("testcase/failure").get("message")

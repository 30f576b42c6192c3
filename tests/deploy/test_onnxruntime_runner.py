"""The onnxruntime runner: CPU here; on a CUDA machine with onnxruntime-gpu, device-bound IO, the
graph's own dtype, CUDA-graph replays per batch shape and CUDA-event timing (gpu marker)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_vit
from vitslim.deploy.bench import BenchSettings, benchmark
from vitslim.deploy.errors import DeployError
from vitslim.deploy.runners import OnnxRuntimeRunner
from vitslim.export.onnx_export import export_plan
from vitslim.pruning.plan import BlockPlan, ModelSpec, dense_plan

from vitslim.core.precision import compare_outputs

IMAGES = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(5))
QUICK = BenchSettings(warmup_seconds=0.0, min_seconds=0.0, min_iterations=5, max_rounds=1)


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """fp32 and fp16 exports of a token- and value-pruned plan, in the default form and in ort-mha."""
    root, model = tmp_path_factory.mktemp("ort"), tiny_vit()
    plan = dense_plan(ModelSpec("deit_tiny_patch16_224"), 3).with_block(
        0, BlockPlan(kept_tokens=(0, 1, 2, 5, 6, 9), proj_in=(0, 1, 2, 3, 16, 17, 18, 19))
    )
    return {
        (precision, form): export_plan(
            model, plan, root / f"{precision}-{form}.onnx", images=IMAGES, precision=precision, attention=form
        ).onnx_path
        for precision in ("fp32", "fp16")
        for form in ("attention-op", "ort-mha")
    }


def test_cpu_runner_runs_fp16_graphs_in_their_own_input_dtype(onnx_files):
    with (
        OnnxRuntimeRunner(onnx_files[("fp32", "attention-op")]) as fp32,
        OnnxRuntimeRunner(onnx_files[("fp16", "attention-op")]) as fp16,
    ):
        assert (
            fp32.input_dtype == np.float32 and fp16.input_dtype == np.float32
        )  # fp16 exports keep fp32 inputs and outputs
        parity = compare_outputs(fp32.infer(IMAGES.numpy()), fp16.infer(IMAGES.numpy()))
        assert parity.top1_agreement == 1.0 and parity.max_abs_diff < 1e-2
        fp32.run_prepared(fp32.prepare(IMAGES.numpy()))
        with pytest.raises(DeployError, match="times GPU work with CUDA events"):
            fp32.time_ms(fp32.prepare(IMAGES.numpy()))
    with pytest.raises(DeployError, match="CUDA graphs need --device cuda"):
        OnnxRuntimeRunner(onnx_files[("fp32", "attention-op")], cuda_graph=True)


def test_cuda_is_refused_in_one_line_where_onnxruntime_has_no_cuda_provider(onnx_files):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(DeployError, match="no CUDAExecutionProvider"):
        with OnnxRuntimeRunner(onnx_files[("fp32", "attention-op")], device="cuda"):
            pass


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["attention-op", "ort-mha"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_runner_matches_the_cpu_and_replays_graphs_per_batch(onnx_files, precision, form):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime here has no CUDA provider (install onnxruntime-gpu)")
    path = onnx_files[(precision, form)]
    with OnnxRuntimeRunner(path) as cpu:
        expected = {batch: cpu.infer(IMAGES[:batch].numpy()) for batch in (3, 8)}
    tolerance = 1e-4 if precision == "fp32" else 2e-2
    for cuda_graph in (False, True):
        with OnnxRuntimeRunner(path, device="cuda", cuda_graph=cuda_graph) as gpu:
            for batch in (3, 8, 3):  # two shapes, two captured graphs, the first replayed again with new data
                images = IMAGES[:batch].numpy()
                np.testing.assert_allclose(gpu.infer(images), expected[batch], atol=tolerance, rtol=0)
            prepared = gpu.prepare(IMAGES.numpy())
            assert gpu.time_ms(prepared) > 0
            result = benchmark(gpu, IMAGES.numpy(), precision, None, QUICK, label="ort-gpu")
            assert result["median_ms"] > 0 and gpu.description["cuda_graph"] is cuda_graph


def test_results_stored_before_the_rename_are_measured_again(onnx_files):
    """A result written when the CUDA-graph switch was TensorRT's alone ('tensorrt_cuda_graph')
    still re-measures (the gate does so for noisy results)."""
    from vitslim.measure import BenchSpec, remeasure, run_bench

    report = run_bench(
        BenchSpec(artifact=str(onnx_files[("fp32", "attention-op")]), backend="onnxruntime", batches=(2,)), QUICK
    )
    stored = {
        **report,
        "spec": {**{k: v for k, v in report["spec"].items() if k != "cuda_graph"}, "tensorrt_cuda_graph": True},
    }
    again = remeasure(stored, QUICK)
    # the old switch was TensorRT's alone: an onnxruntime result was measured without graphs, and is again
    assert (
        again["spec"]["cuda_graph"] is False
        and "tensorrt_cuda_graph" not in again["spec"]
        and again["results"][0]["median_ms"] > 0
    )

"""Orchestration of compare / bench / gate for the CLI: builds the runners (from pruning/export
artifacts) that deploy/ then compares and times."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from deploy.bench import RESULT_VERSION, BenchSettings, benchmark
from deploy.errors import DeployError
from deploy.files import sha256_of, write_bytes_atomic, write_json_atomic
from deploy.runners import OnnxRuntimeRunner, Runner, TensorRTRunner, TorchRunner, check_engine
from export.compact import compact_from_plan
from export.parity import compare_outputs
from pruning.plan import dense_plan
from pruning.reference import MaskedReference
from pruning.run_dir import load_run
from pruning.timm_adapter import input_shape_of

TOLERANCES = {"fp32": {"max_abs_diff": 1e-3}, "fp16": {"top1_agreement": 0.99}}


@dataclass(frozen=True)
class BenchSpec:
    """Everything needed to measure again (the gate re-measures noisy results from it)."""

    artifact: str
    backend: str
    device: str = "cpu"
    batches: tuple[int, ...] = (1, 8)
    run_dir: Optional[str] = None  # also measure the PyTorch dense model and compact module of this run
    torch_mode: str = "eager"
    torch_dtype: str = "fp32"
    threads: Optional[int] = None


def _precision_of(artifact: Path, backend: str) -> str:
    if backend == "tensorrt":
        return check_engine(artifact)["precision"]
    if backend == "onnxruntime":
        from deploy.build import onnx_precision

        return onnx_precision(artifact)
    return "fp32"


def _input_shape(spec: BenchSpec) -> tuple[int, ...]:
    artifact = Path(spec.artifact)
    if spec.backend == "tensorrt":
        return tuple(check_engine(artifact)["input"]["shape"][1:])
    if spec.backend == "onnxruntime":
        import onnx

        graph = onnx.load(str(artifact), load_external_data=False).graph
        return tuple(d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:])
    return input_shape_of(load_run(artifact)[1])


def artifact_runner(spec: BenchSpec) -> Runner:
    artifact = Path(spec.artifact)
    if spec.backend == "onnxruntime":
        return OnnxRuntimeRunner(artifact, device=spec.device, threads=spec.threads)
    if spec.backend == "tensorrt":
        return TensorRTRunner(artifact)
    if spec.backend == "torch":
        plan, model = load_run(artifact)
        return TorchRunner(compact_from_plan(model, plan), device=spec.device, mode=spec.torch_mode, dtype=spec.torch_dtype)
    raise DeployError(f"unknown backend {spec.backend!r}: torch, onnxruntime or tensorrt")


def _measure(runner: Runner, label: str, batches, shape, precision, sha, settings) -> list[dict]:
    generator = np.random.default_rng(0)
    results = []
    with runner:
        for batch in batches:
            images = generator.standard_normal((batch, *shape)).astype(np.float32)
            results.append(benchmark(runner, images, precision, sha, settings, label=label))
    return results


def run_bench(spec: BenchSpec, settings: BenchSettings = BenchSettings()) -> dict:
    """Bench the artifact (and, with run_dir, the PyTorch dense and compact models in the same run)."""
    artifact = Path(spec.artifact)
    if not artifact.exists():
        raise DeployError(f"artifact {artifact} does not exist")
    if spec.threads:
        torch.set_num_threads(spec.threads)
    shape = _input_shape(spec)
    sha = sha256_of(artifact) if artifact.is_file() else None
    precision = spec.torch_dtype if spec.backend == "torch" else _precision_of(artifact, spec.backend)
    results = _measure(artifact_runner(spec), f"{spec.backend}:{artifact.name}", spec.batches, shape, precision, sha, settings)
    if spec.run_dir:
        plan, model = load_run(spec.run_dir)
        torch_device = spec.device if spec.device.startswith("cuda") else "cpu"
        for label, torch_plan in (("torch:compact", plan), ("torch:dense", dense_plan(plan.model, len(plan.blocks)))):
            runner = TorchRunner(compact_from_plan(model, torch_plan), torch_device, spec.torch_mode, spec.torch_dtype)
            results += _measure(runner, label, spec.batches, shape, spec.torch_dtype, None, settings)
    return {"version": RESULT_VERSION, "spec": asdict(spec), "results": results, "ratios": latency_ratios(results)}


def latency_ratios(results: list[dict]) -> list[dict]:
    """Speed-up of every result over the PyTorch dense model at the same batch (same run)."""
    dense = {r["batch"]: r["median_ms"] for r in results if r["label"] == "torch:dense"}
    return [
        {"label": r["label"], "batch": r["batch"], "speedup_vs_torch_dense": dense[r["batch"]] / r["median_ms"]}
        for r in results if r["batch"] in dense and r["label"] != "torch:dense"
    ]


def bench_markdown(report: dict) -> str:
    results = report["results"]
    host = results[0]["fingerprint"]["host"] if results else {}
    lines = [
        f"# Latency: {report['spec']['artifact']} ({report['spec']['backend']}, {report['spec']['device']})", "",
        f"Host: {host.get('cpu')} ({host.get('cores')} cores), GPU driver {host.get('gpu_driver')}", "",
        "| label | batch | median ms | p90 | p95 | p99 | CoV | img/s | end-to-end ms |", "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['label']} | {r['batch']} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | {r['p95_ms']:.3f} | {r['p99_ms']:.3f} | {r['cov']:.1%} | "
        f"{r['throughput_per_s']:.0f} | {r['end_to_end_median_ms']:.3f} |"
        for r in results
    ]
    if report["ratios"]:
        lines += ["", "| vs PyTorch dense | batch | speed-up |", "|---|---|---|"]
        lines += [f"| {r['label']} | {r['batch']} | {r['speedup_vs_torch_dense']:.2f}x |" for r in report["ratios"]]
    return "\n".join(lines) + "\n"


def write_bench(report: dict, json_path: Path) -> None:
    """OUT.json for machines and OUT.md for people, each written atomically."""
    write_json_atomic(json_path, report)
    write_bytes_atomic(json_path.with_suffix(".md"), bench_markdown(report).encode())


def compare_run(run_dir: str, candidates: dict[str, Runner], images: np.ndarray, batches: list[int], precision: str) -> list[dict]:
    """Every candidate vs the masked PyTorch reference of the run, at each batch size."""
    plan, model = load_run(run_dir)
    reference_model = MaskedReference(model, plan).eval()
    rows = []
    for name, runner in candidates.items():
        with runner:
            for batch in batches:
                batch_images = np.resize(images, (batch, *images.shape[1:])).astype(np.float32)
                with torch.no_grad():
                    expected = reference_model(torch.from_numpy(batch_images)).numpy()
                parity = compare_outputs(expected, runner.infer(batch_images))
                passed = all(getattr(parity, key) <= value if key == "max_abs_diff" else getattr(parity, key) >= value for key, value in TOLERANCES[precision].items())
                rows.append({"candidate": name, **parity.to_dict(), "precision": precision, "tolerance": TOLERANCES[precision], "passed": passed})
    return rows


def remeasure(report: dict, settings: BenchSettings) -> dict:
    """The same bench again, from the spec stored in the report."""
    spec = BenchSpec(**{**report["spec"], "batches": tuple(report["spec"]["batches"])})
    return run_bench(spec, settings)


def load_results(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DeployError(f"cannot read benchmark results {path} ({error}): write them with 'vitslim bench --json'") from None
    if data.get("version") != RESULT_VERSION or "results" not in data:
        raise DeployError(f"{path} is not a vitslim benchmark result (version {RESULT_VERSION})")
    return data




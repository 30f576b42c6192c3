"""Orchestration of compare / bench / gate for the CLI: builds the runners (from pruning/export
artifacts) that deploy/ then compares and times."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from vitslim.deploy.bench import RESULT_VERSION, BenchSettings, benchmark, speedup_columns
from vitslim.deploy.errors import DeployError
from vitslim.files import sha256_of, write_bytes_atomic, write_json_atomic
from vitslim.precision import compare_outputs, tolerance_for
from vitslim.deploy.runners import OnnxRuntimeRunner, Runner, TensorRTRunner, TorchRunner, check_engine
from vitslim.export.compact import compact_from_plan
from vitslim.export.report import report_paths
from vitslim.pruning.plan import dense_plan
from vitslim.pruning.reference import MaskedReference
from vitslim.pruning.run_dir import load_run
from vitslim.pruning.macs import macs_fraction
from vitslim.pruning.timm_adapter import geometry_of, input_shape_of


@dataclass(frozen=True)
class BenchSpec:
    """Everything needed to measure again (the gate re-measures noisy results from it)."""

    artifact: str
    backend: str
    device: str = "cpu"
    batches: tuple[int, ...] = (1, 8)
    run_dir: Optional[str] = None  # also measure timm's own model and the compact modules of this run
    torch_mode: str = "eager"
    torch_dtype: str = "fp32"
    threads: Optional[int] = None


def _precision_of(artifact: Path, backend: str) -> str:
    if backend == "tensorrt":
        return check_engine(artifact)["precision"]
    if backend == "onnxruntime":
        from vitslim.deploy.build import onnx_precision

        return onnx_precision(artifact)
    return "fp32"


def _input_shape(spec: BenchSpec, run: Optional[tuple]) -> tuple[int, ...]:
    artifact = Path(spec.artifact)
    if spec.backend == "tensorrt":
        return tuple(check_engine(artifact)["input"]["shape"][1:])
    if spec.backend == "onnxruntime":
        import onnx

        graph = onnx.load(str(artifact), load_external_data=False).graph
        return tuple(d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:])
    return input_shape_of(run[1])


def artifact_runner(spec: BenchSpec, run: Optional[tuple]) -> Runner:
    """The runner of the artifact; `run` is its (plan, model) for the torch backend."""
    artifact = Path(spec.artifact)
    if spec.backend == "onnxruntime":
        return OnnxRuntimeRunner(artifact, device=spec.device, threads=spec.threads)
    if spec.backend == "tensorrt":
        return TensorRTRunner(artifact)
    if spec.backend == "torch":
        plan, model = run
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
    """Bench the artifact and, with run_dir, timm's own model (the baseline of every speed-up) and
    the run's compact modules, in the same process, device and dtype."""
    artifact = Path(spec.artifact)
    if not artifact.exists():
        raise DeployError(f"artifact {artifact} does not exist")
    if spec.threads:
        torch.set_num_threads(spec.threads)
    run = load_run(artifact) if spec.backend == "torch" else None
    shape = _input_shape(spec, run)
    sha = sha256_of(artifact) if artifact.is_file() else None
    precision = spec.torch_dtype if spec.backend == "torch" else _precision_of(artifact, spec.backend)
    if spec.run_dir and precision != spec.torch_dtype:
        raise DeployError(f"{artifact.name} is {precision} but the PyTorch baselines would run {spec.torch_dtype}: pass --torch-dtype {precision}")
    label = f"{spec.backend}:{artifact.name}"
    results = _measure(artifact_runner(spec, run), label, spec.batches, shape, precision, sha, settings)
    fractions = {label: macs_fraction(run[0], geometry_of(run[1])) if run else _export_report_macs_fraction(spec)}
    if spec.run_dir:
        plan, model = load_run(spec.run_dir)
        # like with like: an engine runs on the GPU, so do its PyTorch baselines
        torch_device = "cuda" if spec.backend == "tensorrt" else spec.device
        dense = dense_plan(plan.model, len(plan.blocks))
        fractions.update({"torch:timm": 1.0, "torch:compact": macs_fraction(plan, geometry_of(model)), "torch:dense": 1.0})
        # timm's own model is the baseline users already run; the compact module of the dense plan
        # is a second row that shows the compact module's own overhead.
        for torch_label, module in (("torch:timm", model), ("torch:compact", compact_from_plan(model, plan)), ("torch:dense", compact_from_plan(model, dense))):
            runner = TorchRunner(module, torch_device, spec.torch_mode, spec.torch_dtype)
            results += _measure(runner, torch_label, spec.batches, shape, spec.torch_dtype, None, settings)
    return {"version": RESULT_VERSION, "spec": asdict(spec), "results": results, "ratios": latency_ratios(results, fractions)}


def _export_report_macs_fraction(spec: BenchSpec) -> Optional[float]:
    """From the export report beside the ONNX (FILE.report.json; for an engine, beside the ONNX its
    manifest names); None if there is none or it describes another export."""
    artifact = Path(spec.artifact)
    onnx_path = artifact if spec.backend == "onnxruntime" else artifact.with_name(check_engine(artifact)["onnx"]["file"])
    report = report_paths(onnx_path)[0]
    if not report.is_file() or not onnx_path.is_file():
        return None
    data = json.loads(report.read_text())
    if data.get("onnx", {}).get("sha256") != sha256_of(onnx_path):
        return None  # the report describes another export
    return data["macs"] / data["macs_dense"]


def latency_ratios(results: list[dict], fractions: dict[str, Optional[float]], baseline: str = "torch:timm") -> list[dict]:
    """Speed-up of every result over `baseline` (timm's own model, same device, dtype, mode and
    batch, same run), beside the MAC-ideal speed-up (dense MACs / its MACs) and realised / ideal."""
    base = {r["batch"]: r["median_ms"] for r in results if r["label"] == baseline}
    rows = []
    for r in results:
        if r["batch"] not in base or r["label"] == baseline:
            continue
        rows.append({"label": r["label"], "batch": r["batch"], "baseline": baseline,
                     **speedup_columns(base[r["batch"]], r["median_ms"], fractions.get(r["label"]))})
    return rows


def bench_markdown(report: dict) -> str:
    results = report["results"]
    host = results[0]["fingerprint"]["host"] if results else {}
    lines = [
        f"# Latency: {report['spec']['artifact']} ({report['spec']['backend']}, {report['spec']['device']})", "",
        f"Host: {host.get('cpu')} ({host.get('cores')} cores), GPU driver {host.get('gpu_driver')}. Setup = compilation or graph "
        "capture of the PyTorch runners, not part of the latency.", "",
        "| label | batch | median ms | p90 | p95 | p99 | CoV | img/s | end-to-end ms | setup s |", "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['label']} | {r['batch']} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | {r['p95_ms']:.3f} | {r['p99_ms']:.3f} | {r['cov']:.1%} | "
        f"{r['throughput_per_s']:.0f} | {r['end_to_end_median_ms']:.3f} | {'' if r.get('setup_seconds') is None else format(r['setup_seconds'], '.1f')} |"
        for r in results
    ]
    if report["ratios"]:
        def ratio(value) -> str:
            return "n/a" if value is None else f"{value:.2f}"

        lines += ["", f"Speed-up over {report['ratios'][0]['baseline']} (timm's own model, run the same way in the same process):", "",
                  "| label | batch | speed-up | MAC-ideal | realised / ideal |", "|---|---|---|---|---|"]
        lines += [f"| {r['label']} | {r['batch']} | {r['speedup']:.2f}x | {ratio(r['mac_ideal'])}x | {ratio(r['realised_over_ideal'])} |" for r in report["ratios"]]
    return "\n".join(lines) + "\n"


def write_bench(report: dict, json_path: Path) -> None:
    """OUT.json for machines and OUT.md for people, each written atomically."""
    write_json_atomic(json_path, report)
    write_bytes_atomic(json_path.with_suffix(".md"), bench_markdown(report).encode())


def compare_with_reference(model, plan, candidates: dict[str, Runner], images: np.ndarray, batches: Optional[list[int]] = None, precision: str = "fp32") -> list[dict]:
    """Every candidate runner vs the masked PyTorch reference of (`model`, `plan`), at each batch
    size (default: len(images)); one row per candidate and batch, with `passed` by the precision's
    tolerance (vitslim.precision.TOLERANCES)."""
    batches = batches or [len(images)]
    reference_model = MaskedReference(model, plan).eval()
    rows, tolerance = [], tolerance_for(precision)
    for name, runner in candidates.items():
        with runner:
            for batch in batches:
                batch_images = np.resize(images, (batch, *images.shape[1:])).astype(np.float32)
                with torch.no_grad():
                    expected = reference_model(torch.from_numpy(batch_images)).numpy()
                parity = compare_outputs(expected, runner.infer(batch_images))
                rows.append({"candidate": name, **parity.to_dict(), "precision": precision, "tolerance": tolerance.to_dict(), "passed": parity.passes(tolerance)})
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




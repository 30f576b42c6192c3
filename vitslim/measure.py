"""Orchestration of compare / bench / gate for the CLI: builds the runners (from pruning/export
artifacts) that deploy/ then compares and times. torch, timm and pruning/export are imported only
where a PyTorch model is involved, so that benchmarking and gating engines or ONNX files works
where only numpy, onnx and TensorRT are installed (the Docker runtime image, Jetson)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from vitslim.core.files import sha256_of, write_bytes_atomic, write_json_atomic
from vitslim.core.precision import compare_outputs, tolerance_for
from vitslim.deploy.bench import BenchSettings, benchmark, host_description, speedup_columns
from vitslim.deploy.build import ENGINE_SUFFIXES
from vitslim.deploy.errors import DeployError
from vitslim.deploy.gate import ABSettings, paired_ab
from vitslim.deploy.gpu import describe as describe_gpu
from vitslim.deploy.manifest import check_engine
from vitslim.deploy.results import RESULT_VERSION
from vitslim.deploy.runners import OnnxRuntimeRunner, Runner, TensorRTRunner, TorchRunner, check_batches

DEFAULT_BATCHES = (1, 8)  # bench and compare without an engine: the latency floor and a small batch


@dataclass(frozen=True)
class BenchSpec:
    """Everything needed to measure again (the gate re-measures noisy results from it)."""

    artifact: str
    backend: str
    device: str = "cpu"
    batches: tuple[int, ...] = DEFAULT_BATCHES
    run_dir: Optional[str] = None  # also measure timm's own model and the compact modules of this run
    torch_mode: str = "eager"
    torch_dtype: str = "fp32"
    threads: Optional[int] = None
    # GPU runners (TensorRT, onnxruntime on CUDA) replay a captured CUDA graph (trtexec --useCudaGraph)
    cuda_graph: bool = True
    runtime_cache: Optional[str] = None  # TensorRT-RTX: directory of its runtime caches (kernels compiled on this GPU)


ARTIFACT_KINDS = {
    "onnxruntime": "an ONNX file (.onnx)",
    "tensorrt": "a TensorRT engine (.engine)",
    "torch": "a run directory",
}


def check_batch_sizes(batches) -> None:
    for batch in batches:
        if batch < 1:
            raise DeployError(f"--batch {batch} must be >= 1")


def artifact_backend(artifact: Path) -> str:
    """The backend that runs `artifact`, from what it is: a directory -> torch, .engine ->
    tensorrt, anything else -> onnxruntime (its bytes are checked when it is read)."""
    if artifact.is_dir():
        return "torch"
    return "tensorrt" if artifact.suffix in ENGINE_SUFFIXES else "onnxruntime"


def check_artifact(artifact: Path, backend: str) -> None:
    """A one-line error for a missing artifact or one given to the wrong backend."""
    if backend not in ARTIFACT_KINDS:
        raise DeployError(f"unknown backend {backend!r}: torch, onnxruntime or tensorrt")
    if not artifact.exists():
        raise DeployError(
            f"artifact {artifact} does not exist: give an exported .onnx, a built .engine or a run directory"
        )
    kind = artifact_backend(artifact)
    if kind != backend:
        raise DeployError(f"{artifact} is {ARTIFACT_KINDS[kind]}, not {ARTIFACT_KINDS[backend]}: use --backend {kind}")


def onnx_input_shape(onnx_path: Path) -> tuple[int, ...]:
    """The per-image input shape (C, H, W) of an ONNX file."""
    from vitslim.deploy.build import read_onnx

    graph = read_onnx(onnx_path).graph
    return tuple(d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:])


def check_onnx_inputs(onnx_path: Path, shape: tuple[int, ...]) -> None:
    """Refuse an ONNX file that takes other images than the run's model."""
    found = onnx_input_shape(onnx_path)
    if found != tuple(shape):
        raise DeployError(
            f"{onnx_path} takes inputs of shape {found} but the run's model takes {tuple(shape)}: export this run with 'vitslim export RUN_DIR'"
        )


def check_preprocessing(artifact, recorded: Optional[dict], expected: Optional[dict]) -> None:
    """Refuse to compare an artifact on data prepared otherwise than the data it was made for
    (the preprocessing its ONNX metadata / engine manifest records); None on either side: nothing
    to check (an ONNX exported without knowing its data)."""
    if recorded is None or expected is None or recorded == expected:
        return
    field = next(key for key in sorted(set(recorded) | set(expected)) if recorded.get(key) != expected.get(key))
    raise DeployError(
        f"{artifact} was made for {field} = {recorded.get(field)!r} but this data is prepared with {expected.get(field)!r}: "
        f"compare on the data it was exported for (its preprocessing: 'vitslim inspect {artifact}')"
    )


def _precision_of(artifact: Path, backend: str, manifest: Optional[dict]) -> str:
    if backend == "tensorrt":
        return manifest["precision"]
    if backend == "onnxruntime":
        from vitslim.deploy.build import onnx_precision

        return onnx_precision(artifact)
    return "fp32"


def _input_shape(spec: BenchSpec, run: Optional[tuple], manifest: Optional[dict]) -> tuple[int, ...]:
    artifact = Path(spec.artifact)
    if spec.backend == "tensorrt":
        return tuple(manifest["input"]["shape"][1:])
    if spec.backend == "onnxruntime":
        return onnx_input_shape(artifact)
    from vitslim.pruning.timm_adapter import input_shape_of

    return input_shape_of(run[1])


def _engine_manifest(spec: BenchSpec) -> Optional[dict]:
    """The checked manifest of a TensorRT artifact (None for the other backends): checked once per
    bench or gate side, since checking hashes the whole engine."""
    return check_engine(Path(spec.artifact)) if spec.backend == "tensorrt" else None


def artifact_runner(spec: BenchSpec, run: Optional[tuple], manifest: Optional[dict]) -> Runner:
    """The runner of the artifact; `run` is its (plan, model) for the torch backend, `manifest`
    the engine's checked manifest for the tensorrt backend."""
    artifact = Path(spec.artifact)
    check_artifact(artifact, spec.backend)
    if spec.backend == "onnxruntime":
        return OnnxRuntimeRunner(
            artifact,
            device=spec.device,
            threads=spec.threads,
            cuda_graph=spec.cuda_graph and spec.device.startswith("cuda"),
        )
    if spec.backend == "tensorrt":
        return TensorRTRunner(artifact, cuda_graph=spec.cuda_graph, runtime_cache=spec.runtime_cache, manifest=manifest)
    from vitslim.export.compact import compact_from_plan

    plan, model = run
    return TorchRunner(compact_from_plan(model, plan), device=spec.device, mode=spec.torch_mode, dtype=spec.torch_dtype)


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
    check_artifact(artifact, spec.backend)
    check_batch_sizes(spec.batches)
    manifest = _engine_manifest(spec)
    if manifest is not None:
        check_batches(manifest, spec.batches, artifact.name)
    if spec.threads and (spec.backend == "torch" or spec.run_dir):
        import torch

        torch.set_num_threads(spec.threads)
    run = _load_run(artifact) if spec.backend == "torch" else None
    shape = _input_shape(spec, run, manifest)
    sha = manifest["engine"]["sha256"] if manifest else sha256_of(artifact) if artifact.is_file() else None
    precision = spec.torch_dtype if spec.backend == "torch" else _precision_of(artifact, spec.backend, manifest)
    if (
        spec.run_dir and precision != spec.torch_dtype and not (precision == "int8" and spec.torch_dtype == "fp32")
    ):  # int8 against fp32 baselines
        raise DeployError(
            f"{artifact.name} is {precision} but the PyTorch baselines would run {spec.torch_dtype}: pass --torch-dtype {precision}"
        )
    label = f"{spec.backend}:{artifact.name}"
    results = _measure(artifact_runner(spec, run, manifest), label, spec.batches, shape, precision, sha, settings)
    fractions = {label: _macs_fraction(*run) if run else _export_report_macs_fraction(spec, manifest)}
    if spec.run_dir:
        more_results, more_fractions = _torch_baselines(spec, shape, settings)
        results, fractions = results + more_results, {**fractions, **more_fractions}
    return {
        "version": RESULT_VERSION,
        "spec": asdict(spec),
        "results": results,
        "ratios": latency_ratios(results, fractions),
    }


def _load_run(directory):
    from vitslim.pruning.run_dir import load_run

    return load_run(directory)


def _macs_fraction(plan, model) -> float:
    from vitslim.pruning.macs import macs_fraction
    from vitslim.pruning.timm_adapter import geometry_of

    return macs_fraction(plan, geometry_of(model))


def _torch_baselines(spec: BenchSpec, shape: tuple[int, ...], settings: BenchSettings) -> tuple[list[dict], dict]:
    """timm's own model (the baseline users already run), the run's compact module, and the compact
    module of the dense plan (the compact module's own overhead), each timed like the artifact."""
    from vitslim.export.compact import compact_from_plan
    from vitslim.pruning.plan import dense_plan

    plan, model = _load_run(spec.run_dir)
    torch_device = (
        "cuda" if spec.backend == "tensorrt" else spec.device
    )  # like with like: an engine runs on the GPU, so do its baselines
    dense = dense_plan(plan.model, len(plan.blocks))
    fractions = {"torch:timm": 1.0, "torch:compact": _macs_fraction(plan, model), "torch:dense": 1.0}
    results = []
    for torch_label, module in (
        ("torch:timm", model),
        ("torch:compact", compact_from_plan(model, plan)),
        ("torch:dense", compact_from_plan(model, dense)),
    ):
        runner = TorchRunner(module, torch_device, spec.torch_mode, spec.torch_dtype)
        results += _measure(runner, torch_label, spec.batches, shape, spec.torch_dtype, None, settings)
    return results, fractions


def _export_report_macs_fraction(spec: BenchSpec, manifest: Optional[dict]) -> Optional[float]:
    """From the export report beside the ONNX (FILE.report.json; for an engine, beside the ONNX its
    manifest names); None if there is none or it describes another export."""
    artifact = Path(spec.artifact)
    onnx_path = artifact if spec.backend == "onnxruntime" else artifact.with_name(manifest["onnx"]["file"])
    from vitslim.export.report import report_paths

    report = report_paths(onnx_path)[0]
    if not report.is_file() or not onnx_path.is_file():
        return None
    data = json.loads(report.read_text())
    if data.get("onnx", {}).get("sha256") != sha256_of(onnx_path):
        return None  # the report describes another export
    return data["macs"] / data["macs_dense"]


def latency_ratios(
    results: list[dict], fractions: dict[str, Optional[float]], baseline: str = "torch:timm"
) -> list[dict]:
    """Speed-up of every result over `baseline` (timm's own model, same device, dtype, mode and
    batch, same run), beside the MAC-ideal speed-up (dense MACs / its MACs) and realised / ideal."""
    base = {r["batch"]: r["median_ms"] for r in results if r["label"] == baseline}
    rows = []
    for r in results:
        if r["batch"] not in base or r["label"] == baseline:
            continue
        rows.append(
            {
                "label": r["label"],
                "batch": r["batch"],
                "baseline": baseline,
                **speedup_columns(base[r["batch"]], r["median_ms"], fractions.get(r["label"])),
            }
        )
    return rows


def bench_markdown(report: dict) -> str:
    results = report["results"]
    host = results[0]["fingerprint"]["host"] if results else {}
    lines = [
        f"# Latency: {report['spec']['artifact']} ({report['spec']['backend']}, {report['spec']['device']})",
        "",
        f"Host: {host.get('cpu')} ({host.get('cores')} cores), GPU {describe_gpu(host.get('gpu'))}. Setup = compilation or graph "
        "capture of the PyTorch runners, not part of the latency.",
        "",
        "| label | batch | median ms | p90 | p95 | p99 | CoV | img/s | end-to-end ms | setup s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['label']} | {r['batch']} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | {r['p95_ms']:.3f} | {r['p99_ms']:.3f} | {r['cov']:.1%} | "
        f"{r['throughput_per_s']:.0f} | {r['end_to_end_median_ms']:.3f} | {'' if r.get('setup_seconds') is None else format(r['setup_seconds'], '.1f')} |"
        for r in results
    ]
    if report["ratios"]:

        def ratio(value) -> str:
            return "n/a" if value is None else f"{value:.2f}"

        lines += [
            "",
            f"Speed-up over {report['ratios'][0]['baseline']} (timm's own model, run the same way in the same process):",
            "",
            "| label | batch | speed-up | MAC-ideal | realised / ideal |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['label']} | {r['batch']} | {r['speedup']:.2f}x | {ratio(r['mac_ideal'])}x | {ratio(r['realised_over_ideal'])} |"
            for r in report["ratios"]
        ]
    return "\n".join(lines) + "\n"


def write_bench(report: dict, json_path: Path) -> None:
    """OUT.json for machines and OUT.md for people, each written atomically."""
    write_json_atomic(json_path, report)
    write_bytes_atomic(json_path.with_suffix(".md"), bench_markdown(report).encode())


def compare_with_reference(
    model,
    plan,
    candidates: dict[str, Runner],
    images: np.ndarray,
    batches: Optional[list[int]] = None,
    precision: str | dict[str, str] = "fp32",
) -> list[dict]:
    """Every candidate runner vs the masked PyTorch reference of (`model`, `plan`), at each batch
    size (default: len(images)); one row per candidate and batch, with `passed` by the precision's
    tolerance (vitslim.core.precision.TOLERANCES); `precision` is one for all or one per candidate."""
    import torch

    from vitslim.pruning.reference import MaskedReference

    batches = batches or [len(images)]
    reference_model = MaskedReference(model, plan).eval()
    rows = []
    for name, runner in candidates.items():
        candidate_precision = precision if isinstance(precision, str) else precision.get(name, "fp32")
        tolerance = tolerance_for(candidate_precision)
        with runner:
            for batch in batches:
                batch_images = np.resize(images, (batch, *images.shape[1:])).astype(np.float32)
                with torch.no_grad():
                    expected = reference_model(torch.from_numpy(batch_images)).numpy()
                parity = compare_outputs(expected, runner.infer(batch_images))
                rows.append(
                    {
                        "candidate": name,
                        **parity.to_dict(),
                        "precision": candidate_precision,
                        "tolerance": tolerance.to_dict(),
                        "passed": parity.passes(tolerance),
                    }
                )
    return rows


def remeasure(report: dict, settings: BenchSettings) -> dict:
    """The same bench again, from the spec stored in the report."""
    stored = dict(report["spec"])
    if (
        "tensorrt_cuda_graph" in stored
    ):  # written before the onnxruntime runner had CUDA graphs: the switch was TensorRT's alone
        legacy = stored.pop("tensorrt_cuda_graph")
        stored["cuda_graph"] = legacy if stored.get("backend") == "tensorrt" else False
    spec = BenchSpec(**{**stored, "batches": tuple(stored["batches"])})
    return run_bench(spec, settings)


def _ab_side(
    artifact: Path, batch: int, device: str, threads: Optional[int], cuda_graph: bool, runtime_cache: Optional[str]
) -> tuple[Runner, tuple[int, ...]]:
    """The runner and input shape of one side of a paired A/B gate (backend from what it is)."""
    backend = artifact_backend(artifact)
    check_artifact(artifact, backend)
    spec = BenchSpec(
        artifact=str(artifact),
        backend=backend,
        device=device,
        threads=threads,
        cuda_graph=cuda_graph,
        runtime_cache=runtime_cache,
    )  # only the TensorRT runner reads it
    run = _load_run(artifact) if backend == "torch" else None
    manifest = _engine_manifest(spec)
    if manifest is not None:
        check_batches(manifest, [batch], artifact.name)
    return artifact_runner(spec, run, manifest), _input_shape(spec, run, manifest)


def run_ab(
    baseline: Path,
    candidate: Path,
    batch: int = 1,
    device: str = "cpu",
    threads: Optional[int] = None,
    settings: ABSettings = ABSettings(),
    runners: Optional[tuple[Runner, Runner]] = None,
    cuda_graph: bool = True,
    runtime_cache: Optional[str] = None,
) -> dict:
    """The paired A/B gate of two artifacts on the same seeded random images; `runners` replaces
    the artifacts' own runners (the gate benchmark injects a slowed candidate that way)."""
    baseline, candidate = Path(baseline), Path(candidate)
    check_batch_sizes([batch])
    if threads and (baseline.is_dir() or candidate.is_dir()):  # PyTorch sides; onnxruntime takes `threads` itself
        import torch

        torch.set_num_threads(threads)
    (base_runner, base_shape), (cand_runner, cand_shape) = (
        _ab_side(side, batch, device, threads, cuda_graph, runtime_cache) for side in (baseline, candidate)
    )
    if base_shape != cand_shape:
        raise DeployError(
            f"the artifacts take different inputs ({base_shape} vs {cand_shape}): compare two versions of one model"
        )
    if runners is not None:
        base_runner, cand_runner = runners
    images = np.random.default_rng(0).standard_normal((batch, *base_shape)).astype(np.float32)

    def progress(rounds: int, ratio: float, low: float, high: float) -> None:
        print(f"gate --ab: round {rounds}: ratio {ratio:.3f} [{low:.3f}, {high:.3f}]", flush=True)

    with base_runner, cand_runner:
        result = paired_ab(base_runner, cand_runner, images, settings, progress)
    return {
        "version": RESULT_VERSION,
        "kind": "ab",
        "baseline": str(baseline),
        "candidate": str(candidate),
        "batch": batch,
        "device": device,
        "threads": threads,
        "host": host_description(),
        "baseline_runner": base_runner.description,
        "candidate_runner": cand_runner.description,
        "method": "paired, interleaved inference by inference; per round the median of the pair "
        "ratios; the median over rounds with its distribution-free (binomial order-statistic) interval",
        **result.to_dict(),
    }


def ab_markdown(report: dict) -> str:
    low, high = report["interval"]
    host = report["host"]
    return "\n".join(
        [
            f"# Paired A/B latency gate: {Path(report['candidate']).name} vs {Path(report['baseline']).name}",
            "",
            f"Verdict: **{report['message']}** (exit {report['exit_code']}).",
            "",
            f"Host: {host.get('cpu')} ({host.get('cores')} cores), device {report['device']},"
            f" batch {report['batch']}, threads {report['threads'] or 'default'}.",
            "",
            "| baseline median ms | candidate median ms | ratio (candidate / baseline) | interval | rounds | seconds |",
            "|---|---|---|---|---|---|",
            f"| {report['baseline_median_ms']:.3f} | {report['candidate_median_ms']:.3f} | "
            f"{report['ratio']:.3f} | [{low:.3f}, {high:.3f}] | {report['rounds']} | {report['seconds']:.1f} |",
            "",
            f"Method: {report['method']}; {report['settings']['confidence']:.0%} interval; "
            f"pass when it lies below {1 + report['settings']['fail']:.2f}, regression when above.",
            "",
        ]
    )

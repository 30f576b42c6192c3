"""Orchestration of compare / bench / gate for the CLI: the artifacts' runners (vitslim.artifacts)
compared with the masked reference and timed by deploy/. torch, timm and pruning/export are
imported only where a PyTorch model is involved, so that benchmarking and gating engines or ONNX
files works where only numpy, onnx and TensorRT are installed (the Docker runtime image, Jetson)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import numpy as np

from vitslim.core.files import write_bytes_atomic, write_json_atomic
from vitslim.core.limits import MAX_BATCH
from vitslim.core.precision import compare_outputs, tolerance_for
from vitslim.deploy.bench import BenchSettings, benchmark, device_name, host_description, speedup_columns
from vitslim.deploy.errors import DeployError
from vitslim.deploy.gate import ABSettings, paired_ab
from vitslim.deploy.gpu import describe as describe_gpu
from vitslim.deploy.results import COMPACT_LABEL, DENSE_LABEL, RESULT_VERSION, TIMM_LABEL
from vitslim.deploy.runners import Runner, TorchRunner

from .artifacts import OnnxArtifact, RunArtifact, RunnerOptions, open_artifact

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
    latency_table: Optional[str] = None  # put the latency it predicts for the run's plan beside the measured one

    def runner_options(self) -> RunnerOptions:
        # every RunnerOptions field is a BenchSpec field of the same name and meaning
        return RunnerOptions(**{field.name: getattr(self, field.name) for field in fields(RunnerOptions)})


def check_batch_sizes(batches) -> None:
    for batch in batches:
        if not 1 <= batch <= MAX_BATCH:
            raise DeployError(f"--batch {batch} must be >= 1 and at most {MAX_BATCH}")


def check_onnx_inputs(onnx: OnnxArtifact, shape: tuple[int, ...]) -> None:
    """Refuse an ONNX file that takes other images than the run's model."""
    if onnx.input_shape != tuple(shape):
        raise DeployError(
            f"{onnx.path} takes inputs of shape {onnx.input_shape} but the run's model takes {tuple(shape)}: "
            "export this run with 'vitslim export RUN_DIR'"
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


def _measure(runner: Runner, label: str, batches, shape, precision, sha, settings) -> list[dict]:
    generator = np.random.default_rng(0)
    results = []
    with runner:
        for batch in batches:
            images = generator.standard_normal((batch, *shape)).astype(np.float32)
            results.append(benchmark(runner, images, precision, sha, settings, label=label))
    return results


def _set_torch_threads(threads: Optional[int]) -> None:
    """PyTorch's thread count is process-wide (onnxruntime takes `threads` per session)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def run_bench(spec: BenchSpec, settings: BenchSettings = BenchSettings()) -> dict:
    """Bench the artifact and, with run_dir, timm's own model (the baseline of every speed-up) and
    the run's compact modules, in the same process, device and dtype."""
    artifact = open_artifact(spec.artifact, spec.backend)
    check_batch_sizes(spec.batches)
    artifact.check_batches(spec.batches)
    if spec.backend == "torch" or spec.run_dir:
        _set_torch_threads(spec.threads)
    options = spec.runner_options()
    precision = artifact.precision(options)
    # int8 is measured against fp32 baselines
    if spec.run_dir and precision != spec.torch_dtype and not (precision == "int8" and spec.torch_dtype == "fp32"):
        raise DeployError(
            f"{artifact.path.name} is {precision} but the PyTorch baselines would run {spec.torch_dtype}: pass --torch-dtype {precision}"
        )
    shape = artifact.input_shape
    table = _latency_table_for(spec, artifact, precision)
    results = _measure(
        artifact.runner(options), artifact.label, spec.batches, shape, precision, artifact.digest, settings
    )
    fractions = {artifact.label: artifact.macs_fraction()}
    if spec.run_dir:
        # like with like: an engine runs on the GPU, so do its baselines
        torch_device = "cuda" if spec.backend == "tensorrt" else spec.device
        more_results, more_fractions = _torch_baselines(
            RunArtifact(Path(spec.run_dir)), spec, torch_device, shape, settings
        )
        results, fractions = results + more_results, {**fractions, **more_fractions}
    report = {
        "version": RESULT_VERSION,
        "spec": asdict(spec),
        "results": results,
        "ratios": latency_ratios(results, fractions),
    }
    if table is not None:
        report["prediction"] = predicted_beside_measured(table, _run_of(spec, artifact), artifact.label, results)
    return report


def _run_of(spec: BenchSpec, artifact) -> Optional[RunArtifact]:
    if isinstance(artifact, RunArtifact):
        return artifact
    return RunArtifact(Path(spec.run_dir)) if spec.run_dir else None


def _latency_table_for(spec: BenchSpec, artifact, precision: str):
    """The spec's latency table, refused before anything is timed unless it was measured on this
    runtime, device and precision at one of the batches timed, and a run gives the plan."""
    if spec.latency_table is None:
        return None
    from vitslim.pruning.latency import read_latency_table

    table = read_latency_table(spec.latency_table)
    if _run_of(spec, artifact) is None:
        raise DeployError(
            "--latency-table predicts from the run's plan: add --run RUN_DIR (the run the artifact was exported from)"
        )
    if precision == "int8":
        raise DeployError(
            "latency tables are measured in fp32, fp16 or bf16, not int8: bench this artifact without --latency-table"
        )
    device = "cuda" if spec.device.startswith("cuda") else "cpu"
    here = {
        "backend": spec.backend,
        "device": device,
        "precision": precision,
        # another GPU or CPU model is another table
        "device_name": device_name(host_description(), device),
    }
    if spec.backend == "torch":
        here["torch_mode"] = spec.torch_mode
    if isinstance(artifact, OnnxArtifact):
        from vitslim.core.metadata import attention_form_of

        here["attention_form"] = attention_form_of(artifact.model)
    if spec.backend != "torch" and device == "cuda":
        here["cuda_graph"] = spec.cuda_graph
    for key, value in here.items():
        if table.where.get(key) != value:
            raise DeployError(
                f"latency table {table.source} was measured with {key} {table.where.get(key)!r} but this bench runs "
                f"{value!r}: measure a table here, on this runtime ('vitslim latency-table --backend {spec.backend} "
                f"--device {device} --precision {precision} ...')"
            )
    if table.batch not in spec.batches:
        raise DeployError(f"latency table {table.source} is for batch {table.batch}: add --batch {table.batch}")
    return table


def predicted_beside_measured(table, run: RunArtifact, label: str, results: list[dict]) -> dict:
    """The table's prediction for the run's plan beside the artifact's measured median."""
    from vitslim.pruning.timm_adapter import supported_geometry

    plan, model = run.run
    predicted = table.predict(plan, supported_geometry(model)).total_ms
    measured = next(r["median_ms"] for r in results if r["label"] == label and r["batch"] == table.batch)
    return {
        "table": table.source,
        "where": table.label,
        "batch": table.batch,
        "predicted_ms": predicted,
        "measured_ms": measured,
        "error": measured / predicted - 1.0,
    }


def _torch_baselines(
    run: RunArtifact, spec: BenchSpec, device: str, shape: tuple[int, ...], settings: BenchSettings
) -> tuple[list[dict], dict]:
    """timm's own model (the baseline users already run), the run's compact module, and the compact
    module of the dense plan (the compact module's own overhead), each timed like the artifact."""
    from vitslim.export.compact import compact_from_plan
    from vitslim.pruning.plan import dense_plan

    plan, model = run.run
    dense = dense_plan(plan.model, len(plan.blocks))
    fractions = {TIMM_LABEL: 1.0, COMPACT_LABEL: run.macs_fraction(), DENSE_LABEL: 1.0}
    results = []
    for torch_label, module in (
        (TIMM_LABEL, model),
        (COMPACT_LABEL, compact_from_plan(model, plan)),
        (DENSE_LABEL, compact_from_plan(model, dense)),
    ):
        runner = TorchRunner(module, device, spec.torch_mode, spec.torch_dtype)
        measured = _measure(runner, torch_label, spec.batches, shape, spec.torch_dtype, None, settings)
        results += [{**result, "reference_row": True} for result in measured]  # the gate may skip these
    return results, fractions


def latency_ratios(
    results: list[dict], fractions: dict[str, Optional[float]], baseline: str = TIMM_LABEL
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
    prediction = report.get("prediction")
    if prediction:
        lines += [
            "",
            f"Latency table ({prediction['where']}): predicted {prediction['predicted_ms']:.3f} ms, measured "
            f"{prediction['measured_ms']:.3f} ms at batch {prediction['batch']} ({prediction['error']:+.1%}).",
        ]
    return "\n".join(lines) + "\n"


def write_bench(report: dict, json_path: Path) -> None:
    """OUT.json for machines and OUT.md for people, each written atomically."""
    write_json_atomic(json_path, report)
    write_bytes_atomic(json_path.with_suffix(".md"), bench_markdown(report).encode())


def compare_runners(
    reference,
    candidates: dict[str, Runner],
    images: np.ndarray,
    batches: Optional[list[int]] = None,
    precision: str | dict[str, str] = "fp32",
) -> list[dict]:
    """Every candidate runner vs `reference` (a function images -> logits), at each batch size
    (default: len(images)); one row per candidate and batch, with `passed` by the precision's
    tolerance (vitslim.core.precision.TOLERANCES); `precision` is one for all or one per candidate."""
    batches = batches or [len(images)]
    rows = []
    for name, runner in candidates.items():
        candidate_precision = precision if isinstance(precision, str) else precision.get(name, "fp32")
        tolerance = tolerance_for(candidate_precision)
        with runner:
            for batch in batches:
                batch_images = np.resize(images, (batch, *images.shape[1:])).astype(np.float32)
                parity = compare_outputs(reference(batch_images), runner.infer(batch_images))
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


def compare_with_reference(
    model,
    plan,
    candidates: dict[str, Runner],
    images: np.ndarray,
    batches: Optional[list[int]] = None,
    precision: str | dict[str, str] = "fp32",
) -> list[dict]:
    """Every candidate runner vs the masked PyTorch reference of (`model`, `plan`) (compare_runners)."""
    import torch

    from vitslim.pruning.reference import MaskedReference

    reference_model = MaskedReference(model, plan).eval()

    def reference(batch_images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return reference_model(torch.from_numpy(batch_images)).numpy()

    return compare_runners(reference, candidates, images, batches, precision)


def remeasure(report: dict, settings: BenchSettings) -> dict:
    """The same bench again, from the spec stored in the report."""
    stored = dict(report["spec"])
    if (
        "tensorrt_cuda_graph" in stored
    ):  # written before the onnxruntime runner had CUDA graphs: the switch was TensorRT's alone
        legacy = stored.pop("tensorrt_cuda_graph")
        stored["cuda_graph"] = legacy if stored.get("backend") == "tensorrt" else False
    # the gate needs the timings only: a latency table's prediction is not measured again
    spec = BenchSpec(**{**stored, "batches": tuple(stored["batches"]), "latency_table": None})
    return run_bench(spec, settings)


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
    sides = [open_artifact(path) for path in (baseline, candidate)]  # each side's kind from what it is
    for side in sides:
        side.check_batches([batch])
    if any(isinstance(side, RunArtifact) for side in sides):  # PyTorch sides
        _set_torch_threads(threads)
    options = RunnerOptions(device=device, threads=threads, cuda_graph=cuda_graph, runtime_cache=runtime_cache)
    (base_runner, base_shape), (cand_runner, cand_shape) = ((side.runner(options), side.input_shape) for side in sides)
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
            # the CLI's order: gate --ab BASELINE CANDIDATE
            f"# Paired A/B latency gate: {Path(report['baseline']).name} (baseline) vs "
            f"{Path(report['candidate']).name} (candidate)",
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

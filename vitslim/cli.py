"""`python -m vitslim COMMAND ...`: train, prune, export, quantize, build, bench, compare, gate,
selftest, kit, inspect, run. Each command is a few lines over pipeline.py, measure.py and the
packages; errors are one line and an exit code (vitslim.core.errors)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path
from typing import Optional

from vitslim.core.errors import (
    EXIT_BAD_INPUT,
    EXIT_CHECK_FAILED,
    EXIT_INTERNAL_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_UNDECIDED,
    VitslimError,
)
from vitslim.core.limits import MAX_MESSAGE_CHARS
from vitslim.core.precision import PRECISIONS, TOLERANCES
from vitslim.core.settings import help_of, value_type
from vitslim.deploy.errors import DeployError
from vitslim.pruning.errors import PruningError

NO_CUDA_GRAPH_HELP = (
    "TensorRT engines and ONNX on onnxruntime's CUDA provider: time each inference as a plain launch instead of a "
    "replayed CUDA graph (as trtexec without --useCudaGraph; host launch work is then in the latency, and the result "
    "is compared only with others timed so)"
)
RUNTIME_CACHE_HELP = (
    "TensorRT-RTX engines: keep the kernels it compiles on this GPU in DIR (one file per engine, checked by "
    "TensorRT-RTX against the GPU, driver and version) so that later runs start without compiling them"
)
TOLERANCES_TEXT = "; ".join(
    f"{precision} {tolerance.to_dict()}" for precision, tolerance in TOLERANCES.items()
).replace("%", "%%")


def _add_model_args(parser: argparse.ArgumentParser, required: bool, weights: bool = True) -> None:
    """--model and --model-kwargs; with `weights`, --checkpoint and --pretrained too."""
    parser.add_argument("--model", required=required, help="timm model name, e.g. deit_small_patch16_224")
    parser.add_argument(
        "--model-kwargs",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="timm kwargs, e.g. img_size=32 num_classes=10",
    )
    if not weights:
        return
    parser.add_argument("--checkpoint", help=".safetensors or .pth weights (loaded with weights_only=True)")
    parser.add_argument(
        "--pretrained", action="store_true", help="timm pretrained weights (needs network access to the hub)"
    )


def _spec(args):
    from vitslim.pruning.models import parse_model_kwargs
    from vitslim.pruning.plan import ModelSpec

    return ModelSpec(name=args.model, kwargs=parse_model_kwargs(args.model_kwargs))


def cmd_train(args) -> int:
    from vitslim.pruning.train import TrainConfig

    from .pipeline import train_run

    config = settings_from_args(TrainConfig, args)
    info = train_run(
        _spec(args), args.data, config, Path(args.out), args.checkpoint, args.pretrained, restart=args.restart
    )
    print(f"trained {args.model}: val top-1 {info['val_top1']:.2f} %; run directory {args.out}")
    return EXIT_OK


def _plan_and_model(args):
    """(plan, model) from a run directory, or (dense plan, model) from --model [--checkpoint]."""
    from vitslim.pruning.models import model_from_checkpoint
    from vitslim.pruning.plan import dense_plan
    from vitslim.pruning.run_dir import load_run

    if (args.run_dir is None) == (args.model is None):
        raise PruningError("give either a RUN_DIR or --model NAME (not both)")
    if args.run_dir is not None:
        return load_run(args.run_dir)
    spec = _spec(args)
    model = model_from_checkpoint(spec, args.checkpoint, args.pretrained)
    return dense_plan(spec, len(model.blocks)), model


def cmd_export(args) -> int:
    from vitslim.export.onnx_export import export_plan
    from vitslim.pruning.data import calibration_set

    plan, model = _plan_and_model(args)
    from .pipeline import check_run_data, data_for, preprocessing_for, run_data_source

    images, source = None, None
    if args.data:
        data = data_for(model, args.data)
        check_run_data(args.run_dir, data, "export")
        images, source = calibration_set(data.val, 8).images, f"validation images of {data.source}"
    result = export_plan(
        model,
        plan,
        args.out,
        images=images,
        tolerance=args.tolerance,
        token_layout=args.token_layout,
        precision=args.precision,
        channel_layout=args.channel_layout,
        images_source=source,
        attention=args.attention,
        extra_passes=tuple(args.graph_pass),
        preprocessing=preprocessing_for(model, args.data or run_data_source(args.run_dir)),
    )
    report = result.report
    print(
        f"wrote {result.onnx_path} ({report['macs'] / 1e9:.3f} GMACs, {report['macs'] / report['macs_dense']:.1%} of dense; "
        f"max abs diff {report['parity']['max_abs_diff']:.1e} on {report['parity']['images']}); report {result.report_path}"
    )
    return EXIT_OK


def add_settings_flags(
    parser: argparse.ArgumentParser, title: str, config_types: dict[str, type], skip: tuple[str, ...] = ()
) -> None:
    """One --flag per settings field of `config_types` (owner -> frozen dataclass) but those in
    `skip`, with the field's help text and default(s); a flag not given stays None, so the
    dataclass default holds."""
    owners: dict[str, list] = {}
    for owner, config_type in config_types.items():
        for field in dataclasses.fields(config_type):
            if field.name not in skip:
                owners.setdefault(field.name, []).append((owner, field))
    group = parser.add_argument_group(title)
    for name, owned in owners.items():
        field = owned[0][1]
        if len(config_types) == 1:
            defaults = repr(field.default)
        else:
            defaults = "; ".join(f"{owner} {f.default!r}" for owner, f in owned)
        text = f"{help_of(field)} (default: {defaults})".replace("%", "%%")
        flag, kind = "--" + name.replace("_", "-"), value_type(field)[0]
        if kind is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            group.add_argument(flag, dest=name, type=kind, default=None, metavar=kind.__name__.upper(), help=text)


def settings_from_args(config_type: type, args, others: tuple[type, ...] = (), owner: str = "") -> object:
    """`config_type` built from the flags that were given; a given flag that belongs only to
    `others` (another method's settings) is refused by name."""
    own = {field.name for field in dataclasses.fields(config_type)}
    foreign = {field.name for other in others for field in dataclasses.fields(other)} - own
    stray = sorted(name for name in foreign if getattr(args, name, None) is not None)
    if stray:
        flags = ", ".join("--" + name.replace("_", "-") for name in stray)
        raise PruningError(f"{flags} does not apply to method {owner!r}")
    return config_type(**{name: getattr(args, name) for name in own if getattr(args, name, None) is not None})


def cmd_prune(args) -> int:
    from vitslim.pruning.methods import METHODS, get_method

    from .pipeline import check_run_data, data_for, prune_run

    method = get_method(args.method)
    others = tuple(m.config_type for m in METHODS.values() if m.name != method.name)
    config = settings_from_args(method.config_type, args, others, owner=method.name)
    plan, model = _plan_and_model(args)
    data = data_for(model, args.data)
    check_run_data(args.run_dir, data, "prune")
    report = prune_run(method.name, config, plan, model, data, Path(args.out), restart=args.restart)
    stages = ", ".join(f"{k[5:]} {v:.2f} %" for k, v in report.items() if k.startswith("top1_"))
    latency = report.get("latency")
    predicted = (
        ""
        if latency is None
        else f"predicted {latency['predicted_ms']:.4g} ms ({latency['predicted_speedup']:.2f}x timm"
        + ("" if latency["target_ms"] is None else f", target {latency['target_ms']:.4g} ms")
        + f", {latency['where']}); "
    )
    print(
        f"{report['plan_method']}: {report['macs'] / report['macs_dense']:.1%} of dense MACs, "
        f"{report['params'] / report['params_dense']:.1%} of params; {predicted}top-1 {stages}; run directory {args.out}"
    )
    return EXIT_OK


def build_flag_names(command: str) -> tuple[str, ...]:
    """The BuildSettings fields a command offers as flags: `build` all of them; `kit` the profiles
    and the build options a device builds with (never a file or a library of this machine)."""
    from vitslim.deploy.build import BUILD_OPTIONS, BuildSettings

    if command == "build":
        return tuple(field.name for field in dataclasses.fields(BuildSettings))
    return ("profiles", *BUILD_OPTIONS)


def add_build_flags(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """One flag per BuildSettings field in `names`, spelled, typed and explained by the field.
    Values stay text here; build_settings_from_args parses them (one-line errors, not argparse's)."""
    from vitslim.deploy.build import BuildSettings

    group = parser.add_argument_group("engine build settings")
    for field in dataclasses.fields(BuildSettings):
        if field.name not in names:
            continue
        meta, kind = field.metadata, str(field.type)
        flag = meta.get("flag") or "--" + field.name.replace("_", "-")
        default = ", ".join(map(str, field.default)) if isinstance(field.default, tuple) else field.default
        shown = "" if "default" in help_of(field) else f" (default: {default if default not in (None, '') else 'none'})"
        text = f"{help_of(field)}{shown}".replace("%", "%%")
        common = dict(dest=field.name, default=None, help=text)
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif kind.startswith("tuple["):
            group.add_argument(flag, action="append", metavar=meta.get("metavar"), **common)
        elif "item" in meta:
            group.add_argument(flag, metavar=meta.get("metavar"), **common)
        else:
            value_kind = value_type(field)[0]
            group.add_argument(
                flag, type=value_kind, choices=meta.get("choices"), metavar=meta.get("metavar"), **common
            )


def build_settings_from_args(args, names: tuple[str, ...]) -> dict:
    """The build settings given on the command line (those not given keep BuildSettings' defaults)."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def cmd_build(args) -> int:
    from vitslim.deploy.build import build_settings_from_text, cached_engine, engine_from_onnx

    settings = build_settings_from_text(build_settings_from_args(args, build_flag_names("build")), "vitslim build")
    if args.cache:
        result, reused = cached_engine(args.onnx, args.out, settings, args.cache)
    else:
        result, reused = engine_from_onnx(args.onnx, args.out, settings), False
    manifest = result.manifest
    print(
        f"{'copied from the engine cache' if reused else 'built'} {result.engine_path} with {manifest['library']} "
        f"{manifest['version']} ({manifest['precision']}{', TF32' if settings.tf32 else ''}, "
        f"profiles {', '.join(str(p) for p in settings.profiles)}, target {manifest['target']['kind']}): {manifest['engine']['bytes'] / 1e6:.1f} MB in "
        f"{manifest['build_seconds']:.1f} s; manifest {result.manifest_path}"
    )
    return EXIT_OK


def default_torch_mode(backend: str, device: str, no_cuda_graph: bool) -> str:
    """PyTorch baselines beside an artifact replayed from a CUDA graph (an engine, an ONNX on
    onnxruntime's CUDA provider) are replayed from one too."""
    on_gpu = backend == "tensorrt" or (backend == "onnxruntime" and device.startswith("cuda"))
    return "cuda_graph" if on_gpu and not no_cuda_graph else "eager"


def cmd_bench(args) -> int:
    from vitslim.deploy.bench import BenchSettings

    from .measure import DEFAULT_BATCHES, BenchSpec, bench_markdown, run_bench, write_bench

    # absolute paths: the gate measures again from the stored spec, maybe from another directory
    spec = BenchSpec(
        artifact=str(Path(args.artifact).resolve()),
        backend=args.backend,
        device=args.device,
        batches=tuple(args.batch or DEFAULT_BATCHES),
        run_dir=str(Path(args.run).resolve()) if args.run else None,
        torch_mode=args.torch_mode or default_torch_mode(args.backend, args.device, args.no_cuda_graph),
        torch_dtype=args.torch_dtype,
        threads=args.threads,
        cuda_graph=not args.no_cuda_graph,
        runtime_cache=str(Path(args.runtime_cache).resolve()) if args.runtime_cache else None,
        latency_table=str(Path(args.latency_table).resolve()) if args.latency_table else None,
    )
    report = run_bench(spec, settings_from_args(BenchSettings, args))
    print(bench_markdown(report))
    if args.json:
        write_bench(report, Path(args.json))
        print(f"results: {args.json} (+ {Path(args.json).with_suffix('.md').name})")
    return EXIT_OK


COMPARE_FLAGS = {"onnxruntime": "--onnx", "tensorrt": "--engine", "torch": "the RUN_DIR argument"}


def cmd_compare(args) -> int:
    from .artifacts import EngineArtifact, OnnxArtifact, RunArtifact, RunnerOptions, open_artifact
    from .measure import DEFAULT_BATCHES, check_batch_sizes

    if (args.run_dir is None) == (args.reference is None):
        raise DeployError(
            "give a RUN_DIR (its masked PyTorch reference) or --reference FILE.onnx (that ONNX in onnxruntime on the CPU), "
            "not both"
        )
    batches = list(args.batch or DEFAULT_BATCHES)
    check_batch_sizes(batches)
    options = RunnerOptions(device=args.device, runtime_cache=args.runtime_cache)
    candidates, precisions, artifacts = {}, {}, []
    if args.onnx:
        onnx = open_artifact(args.onnx, OnnxArtifact.backend, COMPARE_FLAGS)
        artifacts.append(onnx)
        # numbers, not timing: onnxruntime runs uncaptured (capturing is for timing)
        candidates["onnxruntime"] = onnx.runner(dataclasses.replace(options, cuda_graph=False))
        precisions["onnxruntime"] = args.precision or onnx.precision()
    if args.engine:
        engine = open_artifact(args.engine, EngineArtifact.backend, COMPARE_FLAGS)
        artifacts.append(engine)
        candidates["tensorrt"] = engine.runner(options)
        precisions["tensorrt"] = args.precision or engine.tolerance  # the engine's own (tf32 if built so)
        batches = sorted({b for p in engine.manifest["profiles"] for b in (p["min"], p["opt"], p["max"])})
    if args.run_dir is not None:
        rows = _compare_with_run(
            args, RunArtifact(Path(args.run_dir)), options, candidates, precisions, artifacts, batches
        )
    else:
        rows = _compare_with_onnx(args, artifacts, candidates, precisions, batches)
    print(
        "| candidate | precision | batch | max abs diff | cosine | top-1 agreement | passed |\n|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['candidate']} | {r['precision']} | {r['batch']} | {r['max_abs_diff']:.2e} | {r['cosine']:.6f} | {r['top1_agreement']:.1%} | {r['passed']} |"
        )
    if args.json:
        from vitslim.core.files import write_json_atomic

        write_json_atomic(args.json, {"run": args.run_dir, "reference": args.reference, "rows": rows})
    return EXIT_OK if all(r["passed"] for r in rows) else EXIT_CHECK_FAILED


def _compare_with_run(args, run, options, candidates, precisions, artifacts, batches) -> list[dict]:
    """The run's compact module and the artifacts against the run's masked reference, on --data."""
    from vitslim.deploy.results import COMPACT_LABEL
    from vitslim.pruning.data import calibration_set
    from vitslim.pruning.timm_adapter import input_shape_of

    from .artifacts import OnnxArtifact
    from .measure import check_onnx_inputs, check_preprocessing, compare_with_reference
    from .pipeline import check_run_data, data_for, preprocessing_for

    if args.data is None:
        raise DeployError("compare RUN_DIR needs --data: the data the run was trained on ('digits' or a directory)")
    plan, model = run.run
    candidates = {COMPACT_LABEL: run.runner(options), **candidates}
    precisions = {COMPACT_LABEL: "fp32", **precisions}
    for artifact in artifacts:
        if isinstance(artifact, OnnxArtifact):
            check_onnx_inputs(artifact, input_shape_of(model))
        print(artifact.made_from(plan, model))
    data = data_for(model, args.data)
    for artifact in artifacts:
        check_preprocessing(artifact.path, artifact.preprocessing, preprocessing_for(model, data.source))
    check_run_data(args.run_dir, data, "compare")
    images = calibration_set(data.val, max(batches)).images.numpy()
    return compare_with_reference(model, plan, candidates, images, batches, precisions)


def _compare_with_onnx(args, artifacts, candidates, precisions, batches) -> list[dict]:
    """The artifacts against --reference (an ONNX in onnxruntime on the CPU), on --data's
    validation images, or on seeded random images without --data."""
    import numpy as np

    from vitslim.pruning.data import DIGITS, calibration_set, load_data, preprocessing

    from .artifacts import OnnxArtifact, RunnerOptions, open_artifact
    from .measure import check_preprocessing, compare_runners

    if not candidates:
        raise DeployError(
            "compare --reference FILE.onnx needs a candidate: --onnx OTHER.onnx and/or --engine FILE.engine"
        )
    reference = open_artifact(args.reference, OnnxArtifact.backend, COMPARE_FLAGS)
    shape = reference.input_shape
    for artifact in artifacts:
        if artifact.input_shape != shape:
            raise DeployError(
                f"{artifact.path.name} takes inputs of shape {artifact.input_shape} but {reference.path.name} takes {shape}: "
                "compare two versions of one model"
            )
        built_from = getattr(artifact, "manifest", {}).get("onnx", {}).get("sha256")
        if built_from is not None:
            same = "this" if built_from == reference.digest else "another"
            print(f"{artifact.path.name}: built from {same} ONNX than the reference (its manifest's ONNX digest)")
    if args.data is not None:
        data = load_data(args.data, shape[0], tuple(shape[1:]))
        expected = preprocessing(DIGITS if data.source == DIGITS else "image files", shape[0], tuple(shape[1:]))
        for artifact in (reference, *artifacts):
            check_preprocessing(artifact.path, artifact.preprocessing, expected)
        images = calibration_set(data.val, max(batches)).images.numpy()
    else:
        print(f"no --data: comparing on {max(batches)} seeded standard-normal images")
        images = np.random.default_rng(0).standard_normal((max(batches), *shape)).astype(np.float32)
    with reference.runner(RunnerOptions(cuda_graph=False)) as runner:
        return compare_runners(runner.infer, candidates, images, batches, precisions)


def _stored_baseline(args) -> tuple[Optional[Path], Optional[list[dict]]]:
    """(where the baseline is stored, its results); results None when nothing is stored there yet."""
    from vitslim.deploy.errors import DeployError
    from vitslim.deploy.results import load_results, stored_baselines

    if args.baseline:
        path = Path(args.baseline)
        if path.is_dir():
            raise DeployError(f"--baseline {path} is a directory: use --baseline-dir {path}")
        return path, load_results(path)["results"] if path.exists() else None
    directory = Path(args.baseline_dir)
    if directory.exists() and not directory.is_dir():
        raise DeployError(f"--baseline-dir {directory} is a file: use --baseline {directory}")
    return directory, stored_baselines(directory)


def _accept(args, current: dict, stored: Optional[list[dict]]) -> None:
    """Store `current` as the baseline (atomically) and say what it replaced."""
    from vitslim.core.files import write_json_atomic
    from vitslim.deploy.gate import baseline_twin
    from vitslim.deploy.results import store_baselines

    for result in current["results"]:
        twin = baseline_twin(result, stored or [])[0] if stored else None
        old = f"replaces {twin['median_ms']:.3f} ms" if twin else "new"
        print(
            f"baseline: {result.get('label') or 'result'} at batch {result['batch']}: {result['median_ms']:.3f} ms ({old})"
        )
    if args.baseline:
        write_json_atomic(args.baseline, current)
    else:
        from vitslim.core.files import output_lock

        with output_lock(args.baseline_dir, "--baseline-dir", swapped=True):
            store_baselines(Path(args.baseline_dir), current["results"])
    print(f"baseline updated: {args.baseline or args.baseline_dir}")


def _gate_ab(args) -> int:
    from vitslim.deploy.gate import ABSettings

    from .measure import ab_markdown, run_ab

    settings = dataclasses.replace(settings_from_args(ABSettings, args), fail=args.fail)
    report = run_ab(
        Path(args.ab[0]),
        Path(args.ab[1]),
        batch=args.batch,
        device=args.device,
        threads=args.threads,
        settings=settings,
        cuda_graph=not args.no_cuda_graph,
        runtime_cache=args.runtime_cache,
    )
    print(ab_markdown(report))
    if args.json:
        from vitslim.core.files import write_bytes_atomic, write_json_atomic

        write_json_atomic(args.json, report)
        write_bytes_atomic(Path(args.json).with_suffix(".md"), ab_markdown(report).encode())
    print(f"gate: {report['message']}")
    if args.junit:
        from vitslim.deploy.gate import PASS, REGRESSION, GateCase

        code = report["exit_code"]
        outcome = "passed" if code == PASS else "failed" if code == REGRESSION else "skipped"
        name = f"{Path(args.ab[0]).name} (baseline) vs {Path(args.ab[1]).name} (candidate) at batch {args.batch}"
        _write_junit(args.junit, "vitslim gate --ab", [GateCase(name, outcome, report["message"], report["seconds"])])
    return report["exit_code"]


def _write_junit(path: str, suite: str, cases) -> None:
    from vitslim.core.files import write_text_atomic
    from vitslim.deploy.gate import junit_xml

    write_text_atomic(path, junit_xml(suite, cases))
    print(f"JUnit report: {path}")


def cmd_gate(args) -> int:
    from vitslim.deploy.bench import BenchSettings
    from vitslim.deploy.errors import DeployError
    from vitslim.deploy.gate import PASS, GateVerdict, compare_results, noisy_results
    from vitslim.deploy.results import load_results

    from .measure import remeasure

    if args.ab:
        if args.current or args.baseline or args.baseline_dir or args.accept:
            raise DeployError(
                "--ab BASELINE CANDIDATE measures both artifacts itself: give no CURRENT.json, --baseline, --baseline-dir or --accept"
            )
        return _gate_ab(args)
    if args.current is None or (args.baseline is None) == (args.baseline_dir is None):
        raise DeployError(
            "give CURRENT.json and one of --baseline FILE or --baseline-dir DIR (or --ab BASELINE CANDIDATE)"
        )
    current = load_results(Path(args.current))
    where, stored = _stored_baseline(args)
    if not stored and not args.accept:  # no file, or an empty directory: nothing to gate against yet
        raise DeployError(f"no baseline at {where}: check the path, or store CURRENT there with --accept")
    if not stored:
        verdict = GateVerdict(PASS, "no baseline yet")
    else:
        verdict = compare_results(current["results"], stored, args.warn, args.fail, args.max_cov)
    for attempt in range(args.remeasure):
        noisy = verdict.noisy == "current" or (args.accept and noisy_results(current["results"], args.max_cov))
        if not noisy:
            break
        print(f"too noisy; measuring again ({attempt + 1}/{args.remeasure})")
        measured_with = {
            **current["results"][0]["settings"],
            "max_cov": args.max_cov,
        }  # the bench's own timing settings
        current = remeasure(current, BenchSettings(**measured_with))
        if stored:
            verdict = compare_results(current["results"], stored, args.warn, args.fail, args.max_cov)
    if verdict.rows:
        print(verdict.table())
    if stored:
        print(f"gate: {verdict.message}")
        if args.junit:
            from vitslim.deploy.gate import verdict_cases

            _write_junit(args.junit, "vitslim gate", verdict_cases(verdict))
    if not args.accept:
        return verdict.exit_code
    if verdict.exit_code != PASS and not args.force:
        print("gate: --accept refused: this result does not pass the gate; pass --force to store it anyway")
        return verdict.exit_code
    noisy = noisy_results(current["results"], args.max_cov)
    if noisy and not args.force:  # every later gate against it would be 'not comparable'
        first = noisy[0]
        print(
            f"gate: --accept refused: {first.get('label') or 'result'} at batch {first['batch']} has a coefficient of "
            f"variation of {first['cov']:.1%} > --max-cov {args.max_cov:.0%}; measure on a quieter machine, raise "
            "--max-cov, or pass --force"
        )
        return EXIT_UNDECIDED
    _accept(args, current, stored)
    return EXIT_OK


def cmd_run(args) -> int:
    from .pipeline import run_recipe
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, overrides=args.set or [])
    if args.out_dir:
        recipe = dataclasses.replace(recipe, out_dir=Path(args.out_dir))
    if args.data:
        recipe = dataclasses.replace(recipe, data=args.data)
    if args.seed is not None:
        recipe = recipe.with_seed(args.seed)
    summary = run_recipe(recipe, restart=args.restart, progress=lambda line: print(line, flush=True))
    if not summary:  # a torchrun process other than rank 0: rank 0 reports
        return EXIT_OK
    root = recipe.run_root
    print((root / "summary.md").read_text())
    print(f"done in {summary['seconds']:.0f} s; reports under {root}")
    if summary["failed_checks"] and not args.allow_failed_checks:
        print(f"vitslim run: {len(summary['failed_checks'])} check(s) failed (summary.md lists them)", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return EXIT_OK


def cmd_quantize(args) -> int:
    from vitslim.core.metadata import class_count_of
    from vitslim.export.errors import ExportError
    from vitslim.export.quantize import check_quantizable
    from vitslim.pruning.data import load_data

    from .artifacts import OnnxArtifact
    from .measure import check_onnx_inputs
    from .quantization import quantize_and_measure, quantize_markdown, reference_logits, report_path

    if args.calibration_images < 1:
        raise ExportError(f"--calibration-images {args.calibration_images}: INT8 needs at least one calibration image")
    onnx_path = Path(args.onnx)
    onnx = OnnxArtifact(onnx_path)
    check_quantizable(onnx.model, onnx_path)  # already quantized, fp16, not a vitslim ViT: refused before any work
    shape = onnx.input_shape
    classes = class_count_of(onnx.model)
    data = load_data(args.data, shape[0], tuple(shape[1:]))
    if classes != data.num_classes:
        raise ExportError(
            f"{onnx_path} has {classes} classes but data {data.source!r} has {data.num_classes}: calibrate on the data it was trained on"
        )
    reference = None
    if args.run:
        from vitslim.pruning.run_dir import load_run
        from vitslim.pruning.timm_adapter import input_shape_of

        from .pipeline import check_run_data

        plan, model = load_run(args.run)
        check_onnx_inputs(onnx, input_shape_of(model))
        print(onnx.made_from(plan, model))
        check_run_data(args.run, data, "quantize")
        reference = reference_logits(model, plan, data.val)
    report = quantize_and_measure(
        onnx_path, data, Path(args.out), reference, calibration_images=args.calibration_images, seed=args.seed
    )
    print(quantize_markdown(report))
    print(f"wrote {args.out} and {report_path(Path(args.out)).name} (+ .md)")
    return EXIT_OK if all(r["passed"] for r in report["rows"]) else EXIT_CHECK_FAILED


def cmd_selftest(args) -> int:
    from . import selftest

    if args.prepare:
        selftest.prepare(Path(args.prepare))
        print(
            f"selftest: tiny model and reference logits in {args.prepare}; run 'vitslim selftest --prepared {args.prepare}' on the GPU machine"
        )
        return EXIT_OK
    code, checks = selftest.run(
        Path(args.work) if args.work else None, args.library, Path(args.prepared) if args.prepared else None
    )
    print(selftest.table(checks))
    if args.json:
        from vitslim.core.files import write_json_atomic

        write_json_atomic(args.json, {"exit_code": code, "checks": selftest.to_dict(checks)})
    print(
        {
            selftest.PASS: "selftest: every check passed",
            selftest.FAIL: "selftest: a check FAILED (see the table)",
            selftest.NO_GPU: "selftest: no NVIDIA GPU here: builds checked, nothing run (exit 2); run it on the GPU machine",
        }[code]
    )
    return code


def cmd_kit(args) -> int:
    import subprocess

    from vitslim.deploy.build import build_settings_from_text

    from .selftest import make_kit

    given = build_settings_from_args(args, build_flag_names("kit"))
    settings = build_settings_from_text(given, "vitslim kit")  # checked here, built on the device
    # kit.json records what was asked (JSON lists for tuples); the device's vitslim builds with it
    asked = {name: getattr(settings, name) for name in given if name != "profiles"}
    build = {name: list(value) if isinstance(value, tuple) else value for name, value in asked.items()}
    out = make_kit(Path(args.onnx), Path(args.out), settings.profiles, build)
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file():  # a source checkout: put vitslim's wheel in the kit
        built = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "-w",
                str(out),
                str(root),
            ],
            capture_output=True,
            text=True,
        )
        if built.returncode != 0:
            print(
                f"kit: could not build vitslim's wheel ({built.stderr.strip().splitlines()[-1:]}); add one with 'pip wheel --no-deps -w {out} .'"
            )
    print(
        f"kit in {out}: {', '.join(sorted(p.name for p in out.iterdir()))}; on the device run {out / 'run_on_device.sh'}"
    )
    return EXIT_OK


def cmd_eval(args) -> int:
    from .artifacts import RunnerOptions
    from .evaluation import evaluate_artifact, evaluation_text

    result = evaluate_artifact(
        args.artifact,
        args.data,
        run_dir=args.run,
        batch=args.batch,
        options=RunnerOptions(device=args.device, cuda_graph=False, runtime_cache=args.runtime_cache),
    )
    if result.get("made_from"):
        print(result["made_from"])
    print(evaluation_text(result))
    if args.json:
        from vitslim.core.files import write_json_atomic

        write_json_atomic(args.json, result)
    return EXIT_OK


def cmd_latency_table(args) -> int:
    from .latency_table import TableSpec, measure_table, write_table

    if bool(args.model) == bool(args.run):
        raise VitslimError("latency-table measures one model: give --model NAME [--model-kwargs ...] or --run RUN_DIR")
    if args.run:
        from vitslim.pruning.run_dir import load_run

        model = load_run(args.run)[0].model
    else:
        model = _spec(args)
    if not args.out.endswith(".json"):
        raise VitslimError(f"--out {args.out}: a table is a .json file (its .md and .png are written beside it)")
    given = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(TableSpec)
        if field.name != "model" and getattr(args, field.name, None) is not None
    }
    spec = TableSpec(model=model, **given)
    table = measure_table(spec, progress=lambda message: print(message, file=sys.stderr, flush=True))
    paths = write_table(table, Path(args.out))
    if table.where["noisy_points"]:
        print(
            f"warning: {table.where['noisy_points']} of {table.where['timings']} timings stayed "
            "noisy: if other work ran meanwhile, measure again on a quiet machine",
            file=sys.stderr,
        )
    if table.where["quiet_gate"]["timed_slow"]:
        print(
            f"warning: {table.where['quiet_gate']['timed_slow']} timings ran in a slow spell of the machine after "
            f"waiting {spec.quiet_wait_seconds:g} s for a quiet one: measure again on a quieter machine, or wait longer "
            "(--quiet-wait-seconds)",
            file=sys.stderr,
        )
    print(
        f"latency table: {paths[0]} (+ {paths[1].name}, {paths[2].name}); timm's model {table.timm_ms:.4g} ms on {table.label}"
    )
    return EXIT_OK


def cmd_inspect(args) -> int:
    from .inspection import describe, to_text

    description = describe(args.artifact, layers=not args.no_layers)
    print(json.dumps(description, indent=1, default=str) if args.json else to_text(description))
    return EXIT_OK


# Commands whose flags come from torch-side settings (methods, training, layouts): only they import
# torch and timm while the parser is built, so build/bench/compare/gate start fast and work where
# only numpy and TensorRT are installed.
TORCH_COMMANDS = ("train", "prune", "export", "latency-table")


def _layouts() -> dict[str, tuple[str, ...]]:
    from vitslim.export.compact import CHANNEL_LAYOUTS
    from vitslim.export.passes import DEFAULT_PASSES, GRAPH_PASSES
    from vitslim.export.token_layout import TOKEN_LAYOUTS

    optional = tuple(name for name in GRAPH_PASSES if name not in DEFAULT_PASSES)
    return {"tokens": TOKEN_LAYOUTS, "channels": CHANNEL_LAYOUTS, "passes": optional}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; the flags of `command` (one of TORCH_COMMANDS) are generated from its
    settings dataclasses, the other commands' flags need no torch."""
    from vitslim.core.precision import CALIBRATION_IMAGES
    from vitslim.deploy.bench import BenchSettings
    from vitslim.deploy.gate import FAIL_ABOVE, WARN_ABOVE, ABSettings
    from vitslim.deploy.runners import TORCH_DTYPES, TORCH_MODES
    from vitslim.deploy.tensorrt_lib import LIBRARIES

    from .evaluation import DEFAULT_EVAL_BATCH
    from .measure import DEFAULT_BATCHES

    parser = _Parser(prog="vitslim", description="Compress timm ViTs and export them as slim ONNX graphs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error instead of its one-line message"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune a dense model and write a run directory")
    _add_model_args(train, required=True)
    train.add_argument("--data", required=True, help="'digits' (built in) or an ImageFolder directory")
    if command == "train":
        from vitslim.pruning.train import TrainConfig

        # `train` has no teacher, so the distillation settings do not apply to it
        add_settings_flags(
            train, "training settings", {"train": TrainConfig}, skip=("distill_weight", "distill_temperature")
        )
    train.add_argument("--out", required=True, help="run directory to write")
    train.add_argument(
        "--restart",
        action="store_true",
        help="start over instead of resuming from the checkpoints of an interrupted run",
    )
    train.set_defaults(func=cmd_train)

    export = commands.add_parser("export", help="export a run directory (or a dense model) to a slim ONNX + report")
    export.add_argument("run_dir", nargs="?", help="run directory with plan.json and weights.safetensors")
    _add_model_args(export, required=False)
    export.add_argument(
        "--data", help="use validation images of this data set for the parity check (default: random images)"
    )
    layouts = _layouts() if command == "export" else {"tokens": None, "channels": None, "passes": None}
    export.add_argument(
        "--token-layout",
        choices=layouts["tokens"],
        default="gather",
        help="token selection as a constant Gather per block, or one permutation then Slices (nested plans)",
    )
    export.add_argument(
        "--channel-layout",
        choices=layouts["channels"],
        default="gather",
        help="pruned LayerNorm-output channels (VTP's qkv_in, fc1_in) as a Gather before narrower Linears (smallest graph), "
        "or as zero columns of full-width Linears (no Gather: faster on GPUs at batch >= 64, see docs/plan-and-export.md)",
    )
    export.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp16: every op in fp16 (LayerNorm, softmax and fused attention accumulate in fp32 inside TensorRT and onnxruntime); "
        "inputs and outputs stay fp32",
    )
    from vitslim.export.attention_form import ATTENTION_FORMS, DEFAULT_ATTENTION_FORM  # no torch

    export.add_argument(
        "--attention",
        choices=tuple(ATTENTION_FORMS),
        default=DEFAULT_ATTENTION_FORM,
        help="how attention is written: "
        + "; ".join(f"{f.name}: {f.summary} [{f.runtimes}]" for f in ATTENTION_FORMS.values())
        + f" (default {DEFAULT_ATTENTION_FORM})",
    )
    export.add_argument(
        "--graph-pass",
        action="append",
        choices=layouts["passes"],
        default=[],
        help="an optional graph pass after the default ones and the attention form's (repeat): ort_fusions applies onnxruntime's transformer "
        "fusions (com.microsoft ops: onnxruntime only; BENCHMARKS.md says what they gain)",
    )
    export.add_argument(
        "--tolerance",
        type=float,
        help=f"max abs diff on logits allowed vs the masked reference (default: {TOLERANCES_TEXT})",
    )
    export.add_argument("--out", required=True, help="FILE.onnx; the report goes to FILE.report.json/.md")
    export.set_defaults(func=cmd_export)

    prune = commands.add_parser(
        "prune", help="compress a model (dense, or another method's run) with a method and write a run directory"
    )
    prune.add_argument(
        "run_dir",
        nargs="?",
        help="run directory to start from (or use --model): a dense one, or a run of a method on the other axis "
        "(VTP's for patch-slim and dgssa-glad; patch-slim's or dgssa-glad's for vtp)",
    )
    _add_model_args(prune, required=False)
    prune.add_argument("--data", required=True, help="'digits' (built in) or an ImageFolder directory")
    if command == "prune":
        from vitslim.pruning.methods import METHODS, list_methods

        prune.add_argument("--method", required=True, help=" | ".join(list_methods()))
        add_settings_flags(
            prune,
            "method settings (each applies to the methods whose defaults it lists)",
            {name: METHODS[name].config_type for name in list_methods()},
        )
    prune.add_argument("--out", required=True, help="run directory to write")
    prune.add_argument(
        "--restart",
        action="store_true",
        help="start over instead of resuming from the checkpoints of an interrupted run",
    )
    prune.set_defaults(func=cmd_prune)

    build = commands.add_parser("build", help="build a TensorRT engine (+ manifest) from an exported ONNX")
    build.add_argument("onnx", help="MODEL.onnx from 'vitslim export'")
    add_build_flags(build, build_flag_names("build"))
    build.add_argument(
        "--cache",
        metavar="DIR",
        help="engine cache: reuse an engine built before for the same ONNX bytes, TensorRT version, GPU, "
        "precision, profiles and options (the Docker runtime image keeps it in a volume)",
    )
    build.add_argument("--out", required=True, help="MODEL.engine; the manifest goes to MODEL.engine.json")
    build.set_defaults(func=cmd_build)

    bench = commands.add_parser(
        "bench", help="latency of an artifact (ONNX, engine or run directory), optionally with the PyTorch reference"
    )
    bench.add_argument(
        "artifact", help="MODEL.onnx (onnxruntime), MODEL.engine (tensorrt) or RUN_DIR (torch compact module)"
    )
    bench.add_argument("--backend", required=True, choices=("torch", "onnxruntime", "tensorrt"))
    bench.add_argument("--device", default="cpu", help="cpu or cuda")
    bench.add_argument("--batch", type=int, action="append", help=f"batch size (repeat); default {DEFAULT_BATCHES}")
    bench.add_argument(
        "--run",
        help="also time timm's own model (torch:timm, the baseline of every speed-up), the compact module "
        "(torch:compact) and the compact module of the dense plan (torch:dense) of this run directory",
    )
    bench.add_argument(
        "--torch-mode",
        choices=TORCH_MODES,
        help="PyTorch runners: eager, cuda_graph (CUDA), or compile (torch.compile; its compile time is reported apart); "
        "default cuda_graph beside a TensorRT engine or an ONNX on onnxruntime's CUDA provider (like with like: those are replayed "
        "from a CUDA graph too), else eager",
    )
    bench.add_argument(
        "--torch-dtype",
        choices=tuple(TORCH_DTYPES),
        default="fp32",
        help="dtype of the PyTorch runners (must match the artifact's precision with --run)",
    )
    bench.add_argument("--threads", type=int, help="CPU threads for torch and onnxruntime")
    bench.add_argument("--no-cuda-graph", action="store_true", help=NO_CUDA_GRAPH_HELP)
    bench.add_argument("--runtime-cache", metavar="DIR", help=RUNTIME_CACHE_HELP)
    bench.add_argument(
        "--latency-table",
        metavar="TABLE.json",
        help="with --run (or a run directory): put the latency this table predicts for the run's plan beside the measured one "
        "(the table must be for this runtime, device, precision and one of the batches)",
    )
    bench.add_argument("--json", help="write results here (and a .md beside it)")
    add_settings_flags(bench, "timing settings", {"bench": BenchSettings})
    bench.set_defaults(func=cmd_bench)

    compare = commands.add_parser(
        "compare",
        help="outputs of each backend vs the masked PyTorch reference of a run, or vs a reference ONNX (--reference)",
    )
    compare.add_argument("run_dir", nargs="?", help="the run whose masked PyTorch reference the others are held to")
    compare.add_argument(
        "--reference",
        metavar="FILE.onnx",
        help="instead of a run: hold --onnx/--engine to this ONNX, run in onnxruntime on the CPU",
    )
    compare.add_argument("--onnx", help="exported ONNX of the run")
    compare.add_argument(
        "--engine", help="TensorRT engine of the run (needs a GPU); compares at every profile's min/opt/max batch"
    )
    compare.add_argument(
        "--data",
        help="'digits' or an ImageFolder directory: the comparison's images come from its validation split "
        "(needed with a RUN_DIR; with --reference, seeded random images without it)",
    )
    compare.add_argument(
        "--batch", type=int, action="append", help=f"batch sizes without an engine; default {DEFAULT_BATCHES}"
    )
    compare.add_argument(
        "--precision",
        choices=tuple(TOLERANCES),
        help=f"tolerance by precision (default: each artifact's own: the ONNX's, "
        f"the engine manifest's; fp32 for PyTorch): {TOLERANCES_TEXT}",
    )
    compare.add_argument("--device", default="cpu")
    compare.add_argument("--runtime-cache", metavar="DIR", help=RUNTIME_CACHE_HELP)
    compare.add_argument("--json", help="write the comparison here")
    compare.set_defaults(func=cmd_compare)

    evaluate = commands.add_parser(
        "eval", help="top-1 of a run directory, an ONNX file or an engine on a data set's validation split"
    )
    evaluate.add_argument("artifact", help="a run directory, an exported .onnx or a built .engine")
    evaluate.add_argument(
        "--data", required=True, help="'digits' or an ImageFolder directory: its validation split is evaluated"
    )
    evaluate.add_argument(
        "--run",
        metavar="RUN_DIR",
        help="also the top-1 of this run's masked PyTorch reference and the artifact's agreement with it "
        "(an artifact whose export report names another run is refused)",
    )
    evaluate.add_argument(
        "--batch", type=int, help=f"batch size (default: an engine's first profile's opt, else {DEFAULT_EVAL_BATCH})"
    )
    evaluate.add_argument("--device", default="cpu", help="cpu, or cuda for onnxruntime-gpu and PyTorch")
    evaluate.add_argument("--runtime-cache", metavar="DIR", help=RUNTIME_CACHE_HELP)
    evaluate.add_argument("--json", help="write the result here")
    evaluate.set_defaults(func=cmd_eval)

    gate = commands.add_parser(
        "gate",
        help="latency-regression gate, paired A/B or against a stored baseline: exit 0 pass, 1 regression, 2 undecided",
    )
    gate.add_argument(
        "current", nargs="?", help="CURRENT.json from 'vitslim bench --json' (with --baseline or --baseline-dir)"
    )
    gate.add_argument(
        "--ab",
        nargs=2,
        metavar=("BASELINE", "CANDIDATE"),
        help="paired A/B: time two artifacts (.onnx, .engine or run directories) interleaved in this process and decide on their "
        "latency ratio's confidence interval; for shared, noisy machines",
    )
    gate.add_argument("--baseline", help="BASELINE.json (a bench result)")
    gate.add_argument("--baseline-dir", help="directory of baselines, one result per file")
    gate.add_argument(
        "--warn",
        type=float,
        default=WARN_ABOVE,
        help=f"stored baseline: warn when a median is slower by more than this fraction (default {WARN_ABOVE})",
    )
    gate.add_argument(
        "--fail",
        type=float,
        default=FAIL_ABOVE,
        help=f"fail when slower by more than this fraction (default {FAIL_ABOVE})",
    )
    gate.add_argument(
        "--max-cov",
        type=float,
        default=BenchSettings.max_cov,
        help="stored baseline: results noisier than this are re-measured, then refused",
    )
    gate.add_argument("--remeasure", type=int, default=2, help="stored baseline: how often to re-measure noisy results")
    gate.add_argument(
        "--accept",
        action="store_true",
        help="store CURRENT as the baseline (atomically) if it passes, or if there is none yet",
    )
    gate.add_argument("--force", action="store_true", help="with --accept: store CURRENT even if it does not pass")
    gate.add_argument("--batch", type=int, default=1, help="--ab: batch size (default 1)")
    gate.add_argument("--device", default="cpu", help="--ab: cpu or cuda")
    gate.add_argument("--threads", type=int, help="--ab: CPU threads for torch and onnxruntime")
    gate.add_argument("--no-cuda-graph", action="store_true", help="--ab: " + NO_CUDA_GRAPH_HELP)
    gate.add_argument("--runtime-cache", metavar="DIR", help="--ab: " + RUNTIME_CACHE_HELP)
    gate.add_argument("--json", help="--ab: write the verdict here (and a .md beside it)")
    gate.add_argument(
        "--junit",
        metavar="FILE.xml",
        help="also write the verdict as JUnit XML, one test case per judged result (failed: a regression; "
        "skipped: not comparable or undecided), for CI systems' test reports",
    )
    add_settings_flags(gate, "paired A/B settings (--ab)", {"ab": ABSettings}, skip=("fail",))
    gate.set_defaults(func=cmd_gate)

    quantize = commands.add_parser(
        "quantize",
        help="INT8 ONNX with explicit Q/DQ (Linear layers) from an fp32 export, calibrated on the data, with an accuracy report",
    )
    quantize.add_argument("onnx", help="an fp32 MODEL.onnx from 'vitslim export'")
    quantize.add_argument("--precision", choices=("int8",), default="int8", help="int8 (FP8: see docs/int8.md)")
    quantize.add_argument(
        "--data",
        required=True,
        help="'digits' or an ImageFolder directory: calibration from its training split, accuracy on its validation split",
    )
    quantize.add_argument(
        "--calibration-images",
        type=int,
        default=CALIBRATION_IMAGES,
        help=f"images drawn (stratified, seeded) from the training split (default {CALIBRATION_IMAGES})",
    )
    quantize.add_argument("--seed", type=int, default=0, help="seed of the calibration draw")
    quantize.add_argument(
        "--run",
        help="the run directory the ONNX was exported from: parity against its masked PyTorch reference (default: against the fp32 ONNX)",
    )
    quantize.add_argument("--out", required=True, help="MODEL.int8.onnx; the report goes to MODEL.int8.report.json/.md")
    quantize.set_defaults(func=cmd_quantize)

    selftest = commands.add_parser(
        "selftest",
        help="on a GPU machine: build a tiny model with each installed TensorRT, run it in and out of "
        "its profiles, check parity, time it (exit 0 pass, 1 a check failed, 2 no GPU)",
    )
    selftest.add_argument("--library", choices=LIBRARIES, help="only this TensorRT (default: each installed)")
    selftest.add_argument("--work", help="keep the ONNX files and engines here (default: a temporary directory)")
    selftest.add_argument(
        "--prepare",
        metavar="DIR",
        help="only export the tiny model and its reference logits into DIR (needs torch; no GPU)",
    )
    selftest.add_argument(
        "--prepared",
        metavar="DIR",
        help="check the files --prepare or 'vitslim kit' wrote (needs no torch: the Docker runtime image, a Jetson)",
    )
    selftest.add_argument("--json", help="write the checks here")
    selftest.set_defaults(func=cmd_selftest)

    kit = commands.add_parser(
        "kit",
        help="a build kit for another device (a Jetson): the ONNX, reference outputs and run_on_device.sh, "
        "which builds and checks the engine there with the device's own TensorRT",
    )
    kit.add_argument("onnx", help="MODEL.onnx from 'vitslim export'")
    add_build_flags(kit, build_flag_names("kit"))
    kit.add_argument("--out", required=True, help="the kit's directory")
    kit.set_defaults(func=cmd_kit)

    latency = commands.add_parser(
        "latency-table",
        help="measure what the model's blocks cost on one runtime, for latency targets (prune --latency-table) "
        "and predictions (bench --latency-table)",
    )
    _add_model_args(latency, required=False, weights=False)  # random weights: latency does not depend on them
    latency.add_argument("--run", help="instead of --model: the model of this run directory")
    if command == "latency-table":
        from .latency_table import TableSpec

        add_settings_flags(latency, "where the table is measured", {"latency-table": TableSpec}, skip=("model",))
    latency.add_argument("--out", required=True, help="TABLE.json (TABLE.md and TABLE.png beside it)")
    latency.set_defaults(func=cmd_latency_table)

    inspect = commands.add_parser(
        "inspect",
        help="what an .onnx, .engine or run directory is: IO, precision, preprocessing, profiles, build options, layers",
    )
    inspect.add_argument("artifact")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.add_argument(
        "--no-layers", action="store_true", help="engines: skip TensorRT's per-layer information (needs the GPU)"
    )
    inspect.set_defaults(func=cmd_inspect)

    run = commands.add_parser("run", help="the whole pipeline from a YAML recipe (default: the built-in digits recipe)")
    run.add_argument("recipe", nargs="?", help="RECIPE.yaml")
    run.add_argument("--out-dir", help="where runs/NAME goes (default: the recipe's out_dir, 'runs')")
    run.add_argument(
        "--seed", type=int, help="seed of the dense training and of every method (default: the recipe's, 0)"
    )
    run.add_argument("--data", help="'digits' or an ImageFolder directory, instead of the recipe's data")
    run.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one recipe value by its dotted key (YAML value), e.g. --set methods.vtp.finetune_epochs=1 (repeat)",
    )
    run.add_argument(
        "--allow-failed-checks",
        action="store_true",
        help="exit 0 even when a variant misses a tolerance (fp16, INT8); it is still listed in summary.md",
    )
    run.add_argument(
        "--restart",
        action="store_true",
        help="run every stage again: neither skip finished stages nor resume interrupted ones",
    )
    run.set_defaults(func=cmd_run)
    for subcommand in commands.choices.values():  # -v and --debug after the command, too
        subcommand.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log every step"
        )
        subcommand.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error"
        )
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse with vitslim's exit code for bad input (argparse's own is 2, the gate's 'undecided'),
    and no abbreviated flags (a typo such as --epoch must not pass for --epochs)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def one_line(error: BaseException) -> str:
    """The message of `error` as one line of at most MAX_MESSAGE_CHARS. An error raised in a
    DataLoader worker arrives with the worker's traceback in its message; the original message is
    its last line. Any other line break (a file name holding one) is shown as \\n and every other
    control character escaped too, so that the line cannot be rewritten by what a file or a path says."""
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(error).__name__]
    if text.startswith("Caught ") and "DataLoader worker" in lines[0]:
        last = lines[-1]
        text = last.split(": ", 1)[1] if last.startswith("vitslim.") and ": " in last else last
    # line breaks and every other control or format character (ESC sequences, U+2028) escaped
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) or type(error).__name__
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 20] + f" ... ({len(text)} characters)"
    return text


def _terminated(signum, frame):
    raise _Terminated()


class _Terminated(BaseException):
    """SIGTERM as an exception, so that `finally` blocks (temporary files) run as on Ctrl-C."""


# Commands whose --out is written as several files (an engine and its manifest, an ONNX and its
# reports): held under a lock while they run (train, prune and run lock their run directories
# themselves, gate --accept its --baseline-dir). The kit's --out is a directory.
FILE_OUTPUTS = ("build", "export", "quantize", "latency-table")


def _output_lock_of(args):
    from vitslim.core.files import file_output_lock, output_lock

    if args.command in FILE_OUTPUTS and getattr(args, "out", None):
        return file_output_lock(args.out)
    if args.command == "kit" and getattr(args, "out", None):
        return output_lock(args.out)
    return contextlib.nullcontext()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    # vitslim's own steps with -v; the dependencies' INFO (onnxscript, onnxruntime) never
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("vitslim").setLevel(logging.INFO if args.verbose else logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.onnx")
    previous = (
        signal.signal(signal.SIGTERM, _terminated) if threading.current_thread() is threading.main_thread() else None
    )
    resume = (
        " (rerun the same command to resume from the last checkpoint)"
        if args.command in ("train", "prune", "run")
        else ""
    )
    try:
        with _output_lock_of(args):
            return args.func(args)
    except VitslimError as error:
        if args.debug:  # the traceback, and still the exit code of bad input (never a verdict)
            traceback.print_exc()
        print(f"vitslim {args.command}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"vitslim {args.command}: interrupted{resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _Terminated:
        print(f"vitslim {args.command}: terminated{resume}", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception as error:  # noqa: BLE001 (a bug must not read as a verdict: its own exit code)
        if args.debug:
            traceback.print_exc()
        print(
            f"vitslim {args.command}: internal error: {type(error).__name__}: {one_line(error)} "
            "(rerun with --debug for the traceback and report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL_ERROR
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

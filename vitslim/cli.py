"""`python -m vitslim COMMAND ...`: train, export, run. Each command is a few lines over pipeline.py."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import warnings
from pathlib import Path

from export.errors import ExportError
from pruning.errors import PruningError

from deploy.errors import DeployError

USER_ERRORS = (PruningError, ExportError, DeployError)


def _add_model_args(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--model", required=required, help="timm model name, e.g. deit_small_patch16_224")
    parser.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE", help="timm kwargs, e.g. img_size=32 num_classes=10")
    parser.add_argument("--checkpoint", help=".safetensors or .pth weights (loaded with weights_only=True)")
    parser.add_argument("--pretrained", action="store_true", help="timm pretrained weights (needs network access to the hub)")


def _spec(args):
    from pruning.models import parse_model_kwargs
    from pruning.plan import ModelSpec

    return ModelSpec(name=args.model, kwargs=parse_model_kwargs(args.model_kwargs))


def cmd_train(args) -> int:
    from pruning.train import TrainConfig

    from .pipeline import train_run

    config = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, distill_weight=0.0, seed=args.seed)
    info = train_run(_spec(args), args.data, config, Path(args.out), args.checkpoint, args.pretrained)
    print(f"trained {args.model}: val top-1 {info['val_top1']:.2f} %; run directory {args.out}")
    return 0


def _plan_and_model(args):
    """(plan, model) from a run directory, or (dense plan, model) from --model [--checkpoint]."""
    from pruning.models import model_from_checkpoint
    from pruning.plan import dense_plan
    from pruning.run_dir import load_run

    if (args.run_dir is None) == (args.model is None):
        raise PruningError("give either a RUN_DIR or --model NAME (not both)")
    if args.run_dir is not None:
        return load_run(args.run_dir)
    spec = _spec(args)
    model = model_from_checkpoint(spec, args.checkpoint, args.pretrained)
    return dense_plan(spec, len(model.blocks)), model


def cmd_export(args) -> int:
    from export.onnx_export import export_plan
    from pruning.data import calibration_batch

    plan, model = _plan_and_model(args)
    images = None
    if args.data:
        from .pipeline import data_for

        images = calibration_batch(data_for(model, args.data).val, 8)
    result = export_plan(model, plan, args.out, images=images, tolerance=args.tolerance, token_layout=args.token_layout, precision=args.precision)
    report = result.report
    print(
        f"wrote {result.onnx_path} ({report['macs'] / 1e9:.3f} GMACs, {report['macs'] / report['macs_dense']:.1%} of dense; "
        f"max abs diff {report['parity']['max_abs_diff']:.1e}); report {result.report_path}"
    )
    return 0


# Method settings on the command line: flag dest == field name of the method's config dataclass.
METHOD_FLAGS = {
    "prune_ratio": (float, "fraction of the gated dims to remove (VTP), in (0, 1)"),
    "l1": (float, "L1 weight λ on the gates (VTP; paper 1e-4)"),
    "sparsity_epochs": (int, "epochs of sparsity training (VTP)"),
    "finetune_epochs": (int, "epochs of fine-tuning after pruning"),
    "lr": (float, "learning rate of the weights"),
    "gate_lr": (float, "learning rate of the gates (VTP)"),
    "batch_size": (int, "batch size"),
    "distill_weight": (float, "weight of logit distillation from the dense model, in [0, 1]"),
    "round_to": (int, "round kept counts per module / per head to a multiple (8 for TensorRT fused attention)"),
    "seed": (int, "random seed"),
    "epsilon": (float, "Patch Slimming: tolerance on the next block's relative reconstruction error (paper 0.01-0.02)"),
    "target_macs": (float, "Patch Slimming: instead of --epsilon, the fraction of dense MACs to keep (searches epsilon)"),
    "step": (int, "Patch Slimming: tokens added per search step (paper 10)"),
    "block_epochs": (int, "Patch Slimming: epochs of single-block fine-tuning per candidate set"),
    "block_lr": (float, "Patch Slimming: learning rate of the single-block fine-tuning"),
    "calibration_images": (int, "Patch Slimming, DGSSA: training images used for scores / attention statistics"),
    "static_blocks": (int, "DGSSA: the first K blocks get static attention"),
    "similarity_threshold": (float, "DGSSA: instead of K, the leading blocks whose attention cosine similarity across images is >= S"),
    "pyramid": (str, "GLAD: 'BLOCK:PATCHES,...', e.g. '7:98,10:49' aggregates to 98 patches before block 7, 49 before block 10"),
    "attention_weight": (float, "DGSSA: weight of the attention-distillation term toward the dense model's maps"),
    "static_lr": (float, "DGSSA/GLAD: learning rate of the static-attention logits and aggregation matrices"),
}


def _method_config(method, args):
    import dataclasses as dc

    given = {name: getattr(args, name) for name in METHOD_FLAGS if getattr(args, name) is not None}
    if args.per_module:
        given["per_module"] = True
    fields = {f.name for f in dc.fields(method.config_type)}
    stray = sorted(set(given) - fields)
    if stray:
        flags = ", ".join("--" + name.replace("_", "-") for name in stray)
        raise PruningError(f"{flags} does not apply to method {method.name!r}")
    return method.config_type(**given)


def cmd_prune(args) -> int:
    from pruning.methods import get_method

    from .pipeline import data_for, prune_run

    method = get_method(args.method)
    config = _method_config(method, args)
    plan, model = _plan_and_model(args)
    report = prune_run(method.name, config, plan, model, data_for(model, args.data), Path(args.out))
    stages = ", ".join(f"{k[5:]} {v:.2f} %" for k, v in report.items() if k.startswith("top1_"))
    print(f"{method.name}: {report['macs'] / report['macs_dense']:.1%} of dense MACs, {report['params'] / report['params_dense']:.1%} of params; top-1 {stages}; run directory {args.out}")
    return 0


def cmd_build(args) -> int:
    from deploy.build import BatchProfile, BuildSettings, engine_from_onnx

    settings = BuildSettings(
        precision=args.precision, profiles=tuple(BatchProfile.parse(b) for b in args.batch or ["1:8:32"]),
        workspace_mb=args.workspace, timing_cache=Path(args.timing_cache) if args.timing_cache else None, library=args.library,
    )
    result = engine_from_onnx(args.onnx, args.out, settings)
    manifest = result.manifest
    print(
        f"built {result.engine_path} with {manifest['library']} {manifest['version']} ({manifest['precision']}, "
        f"profiles {', '.join(str(p) for p in settings.profiles)}): {manifest['engine']['bytes'] / 1e6:.1f} MB in "
        f"{manifest['build_seconds']:.1f} s; manifest {result.manifest_path}"
    )
    return 0


def cmd_bench(args) -> int:
    from .measure import BenchSpec, bench_markdown, run_bench, write_bench

    spec = BenchSpec(artifact=args.artifact, backend=args.backend, device=args.device, batches=tuple(args.batch or [1, 8]),
                     run_dir=args.run, torch_mode=args.torch_mode, torch_dtype=args.torch_dtype, threads=args.threads)
    report = run_bench(spec)
    print(bench_markdown(report))
    if args.json:
        write_bench(report, Path(args.json))
        print(f"results: {args.json} (+ {Path(args.json).with_suffix('.md').name})")
    return 0


def cmd_compare(args) -> int:
    from deploy.runners import OnnxRuntimeRunner, TensorRTRunner, TorchRunner
    from export.compact import compact_from_plan
    from pruning.data import calibration_batch
    from pruning.run_dir import load_run

    from .measure import compare_run
    from .pipeline import data_for

    plan, model = load_run(args.run_dir)
    images = calibration_batch(data_for(model, args.data).val, max(args.batch or [8])).numpy()
    candidates = {"torch:compact": TorchRunner(compact_from_plan(model, plan), device=args.device)}
    if args.onnx:
        candidates["onnxruntime"] = OnnxRuntimeRunner(args.onnx, device=args.device)
    batches = list(args.batch or [1, 8])
    if args.engine:
        from deploy.runners import check_engine

        manifest = check_engine(Path(args.engine))
        candidates["tensorrt"] = TensorRTRunner(args.engine)
        batches = sorted({b for p in manifest["profiles"] for b in (p["min"], p["opt"], p["max"])})
    rows = compare_run(args.run_dir, candidates, images, batches, args.precision)
    print("| candidate | batch | max abs diff | cosine | top-1 agreement | passed |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['candidate']} | {r['batch']} | {r['max_abs_diff']:.2e} | {r['cosine']:.6f} | {r['top1_agreement']:.1%} | {r['passed']} |")
    if args.json:
        from deploy.files import write_json_atomic

        write_json_atomic(args.json, {"run": args.run_dir, "rows": rows})
    return 0 if all(r["passed"] for r in rows) else 1


def cmd_gate(args) -> int:
    from deploy.bench import BenchSettings
    from deploy.files import write_json_atomic
    from deploy.gate import NOT_COMPARABLE, compare_results

    from .measure import load_results, remeasure

    if (args.baseline is None) == (args.baseline_dir is None):
        raise DeployError("give --baseline FILE or --baseline-dir DIR")
    current = load_results(Path(args.current))

    def baselines() -> list[dict]:
        if args.baseline:
            return load_results(Path(args.baseline))["results"] if Path(args.baseline).is_file() else []
        directory = Path(args.baseline_dir)
        found = [directory / f"{r['fingerprint_id']}.json" for r in current["results"]]
        return [json.loads(p.read_text()) for p in found if p.is_file()]

    verdict = compare_results(current["results"], baselines(), args.warn, args.fail, args.max_cov)
    for attempt in range(args.remeasure):
        if verdict.exit_code != NOT_COMPARABLE or "coefficient of variation" not in verdict.message:
            break
        print(f"too noisy; measuring again ({attempt + 1}/{args.remeasure})")
        current = remeasure(current, BenchSettings(max_cov=args.max_cov))
        verdict = compare_results(current["results"], baselines(), args.warn, args.fail, args.max_cov)
    if verdict.rows:
        print(verdict.table())
    print(f"gate: {verdict.message}")
    if args.accept:
        if args.baseline:
            write_json_atomic(args.baseline, current)
        else:
            for result in current["results"]:
                write_json_atomic(Path(args.baseline_dir) / f"{result['fingerprint_id']}.json", result)
        print("baseline updated")
        return 0
    return verdict.exit_code


def cmd_run(args) -> int:
    from .pipeline import run_recipe
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe)
    if args.out_dir:
        recipe = dataclasses.replace(recipe, out_dir=Path(args.out_dir))
    summary = run_recipe(recipe)
    root = recipe.run_root
    print((root / "summary.md").read_text())
    print(f"done in {summary['seconds']:.0f} s; reports under {root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitslim", description="Compress timm ViTs and export them as slim ONNX graphs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune a dense model and write a run directory")
    _add_model_args(train, required=True)
    train.add_argument("--data", default="digits", help="'digits' (built in) or an ImageFolder directory")
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", required=True, help="run directory to write")
    train.set_defaults(func=cmd_train)

    export = commands.add_parser("export", help="export a run directory (or a dense model) to a slim ONNX + report")
    export.add_argument("run_dir", nargs="?", help="run directory with plan.json and weights.safetensors")
    _add_model_args(export, required=False)
    export.add_argument("--data", help="use validation images of this data set for the parity check (default: random images)")
    export.add_argument("--token-layout", choices=("gather", "slice"), default="gather",
                        help="token selection as a constant Gather per block, or one permutation then Slices (nested plans)")
    export.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                        help="fp16: weights and activations in fp16, LayerNorm and Softmax in fp32 (for strongly typed TensorRT)")
    export.add_argument("--tolerance", type=float, default=1e-4, help="max abs diff on logits allowed vs the masked reference")
    export.add_argument("--out", required=True, help="FILE.onnx; the report goes to FILE.report.json/.md")
    export.set_defaults(func=cmd_export)

    prune = commands.add_parser("prune", help="compress a dense model with a method and write a run directory")
    prune.add_argument("run_dir", nargs="?", help="dense run directory to start from (or use --model)")
    _add_model_args(prune, required=False)
    prune.add_argument("--method", required=True, help="vtp | patch-slim | dgssa-glad")
    prune.add_argument("--data", default="digits", help="'digits' (built in) or an ImageFolder directory")
    for name, (kind, text) in METHOD_FLAGS.items():
        prune.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=text)
    prune.add_argument("--per-module", action="store_true", help="one threshold per gate instead of one global threshold (VTP)")
    prune.add_argument("--out", required=True, help="run directory to write")
    prune.set_defaults(func=cmd_prune)

    build = commands.add_parser("build", help="build a TensorRT engine (+ manifest) from an exported ONNX")
    build.add_argument("onnx", help="MODEL.onnx from 'vitslim export'")
    build.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    build.add_argument("--batch", action="append", metavar="MIN:OPT:MAX", help="a batch optimisation profile (repeat for several); default 1:8:32")
    build.add_argument("--timing-cache", help="timing cache file, read if present and written back")
    build.add_argument("--workspace", type=int, metavar="MB", help="workspace memory limit")
    build.add_argument("--library", choices=("tensorrt", "tensorrt_rtx"), help="default: tensorrt if installed, else tensorrt_rtx")
    build.add_argument("--out", required=True, help="MODEL.engine; the manifest goes to MODEL.engine.json")
    build.set_defaults(func=cmd_build)

    bench = commands.add_parser("bench", help="latency of an artifact (ONNX, engine or run directory), optionally with the PyTorch reference")
    bench.add_argument("artifact", help="MODEL.onnx (onnxruntime), MODEL.engine (tensorrt) or RUN_DIR (torch compact module)")
    bench.add_argument("--backend", required=True, choices=("torch", "onnxruntime", "tensorrt"))
    bench.add_argument("--device", default="cpu", help="cpu or cuda")
    bench.add_argument("--batch", type=int, action="append", help="batch size (repeat); default 1 and 8")
    bench.add_argument("--run", help="also time the PyTorch dense model and compact module of this run directory, and report ratios")
    bench.add_argument("--torch-mode", choices=("eager", "cuda_graph"), default="eager")
    bench.add_argument("--torch-dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="dtype of the PyTorch runners")
    bench.add_argument("--threads", type=int, help="CPU threads for torch and onnxruntime")
    bench.add_argument("--json", help="write results here (and a .md beside it)")
    bench.set_defaults(func=cmd_bench)

    compare = commands.add_parser("compare", help="outputs of each backend vs the masked PyTorch reference of a run")
    compare.add_argument("run_dir")
    compare.add_argument("--onnx", help="exported ONNX of the run")
    compare.add_argument("--engine", help="TensorRT engine of the run (needs a GPU); compares at every profile's min/opt/max batch")
    compare.add_argument("--data", default="digits")
    compare.add_argument("--batch", type=int, action="append", help="batch sizes without an engine; default 1 and 8")
    compare.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="fp32: max abs diff <= 1e-3; fp16: top-1 agreement >= 99 %%")
    compare.add_argument("--device", default="cpu")
    compare.add_argument("--json", help="write the comparison here")
    compare.set_defaults(func=cmd_compare)

    gate = commands.add_parser("gate", help="latency-regression gate: exit 0 pass, 1 regression, 2 not comparable")
    gate.add_argument("current", help="CURRENT.json from 'vitslim bench --json'")
    gate.add_argument("--baseline", help="BASELINE.json (a bench result)")
    gate.add_argument("--baseline-dir", help="directory of baselines keyed by fingerprint id")
    gate.add_argument("--warn", type=float, default=0.05)
    gate.add_argument("--fail", type=float, default=0.10)
    gate.add_argument("--max-cov", type=float, default=0.10, help="results noisier than this are re-measured, then refused")
    gate.add_argument("--remeasure", type=int, default=2, help="how often to re-measure noisy results")
    gate.add_argument("--accept", action="store_true", help="make CURRENT the baseline (atomically)")
    gate.set_defaults(func=cmd_gate)

    run = commands.add_parser("run", help="the whole pipeline from a YAML recipe (default: the built-in digits recipe)")
    run.add_argument("recipe", nargs="?", help="RECIPE.yaml")
    run.add_argument("--out-dir", help="where runs/NAME goes (default: the recipe's out_dir, 'runs')")
    run.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.onnx")
    try:
        return args.func(args)
    except USER_ERRORS as error:
        print(f"vitslim {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vitslim {args.command}: interrupted", file=sys.stderr)
        return 130

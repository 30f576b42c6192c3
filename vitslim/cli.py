"""`python -m vitslim COMMAND ...`: train, export, run. Each command is a few lines over pipeline.py."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import warnings
from pathlib import Path

from export.errors import ExportError
from pruning.errors import PruningError

USER_ERRORS = (PruningError, ExportError)


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


def cmd_export(args) -> int:
    from export.onnx_export import export_plan
    from pruning.data import calibration_batch
    from pruning.models import model_from_checkpoint
    from pruning.plan import dense_plan
    from pruning.run_dir import load_run

    if (args.run_dir is None) == (args.model is None):
        raise PruningError("give either a RUN_DIR or --model NAME (not both)")
    if args.run_dir is not None:
        plan, model = load_run(args.run_dir)
    else:
        spec = _spec(args)
        model = model_from_checkpoint(spec, args.checkpoint, args.pretrained)
        plan = dense_plan(spec, len(model.blocks))
    images = None
    if args.data:
        from .pipeline import data_for

        images = calibration_batch(data_for(model, args.data).val, 8)
    result = export_plan(model, plan, args.out, images=images, tolerance=args.tolerance)
    report = result.report
    print(
        f"wrote {result.onnx_path} ({report['macs'] / 1e9:.3f} GMACs, {report['macs'] / report['macs_dense']:.1%} of dense; "
        f"max abs diff {report['parity']['max_abs_diff']:.1e}); report {result.report_path}"
    )
    return 0


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
    export.add_argument("--tolerance", type=float, default=1e-4, help="max abs diff on logits allowed vs the masked reference")
    export.add_argument("--out", required=True, help="FILE.onnx; the report goes to FILE.report.json/.md")
    export.set_defaults(func=cmd_export)

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

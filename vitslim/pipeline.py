"""Orchestration for the CLI: train a run directory, export it, and run a whole recipe."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from vitslim.core.files import output_lock, write_text_atomic
from vitslim.deploy.bench import BenchSettings
from vitslim.deploy.build import BuildSettings
from vitslim.export.onnx_export import ExportResult, export_plan
from vitslim.pruning.checkpoints import CHECKPOINT_DIR, phase_path
from vitslim.pruning.data import DIGITS, DataSplits, calibration_set, load_data, preprocessing
from vitslim.pruning.errors import PruningError
from vitslim.pruning.macs import plan_macs
from vitslim.pruning.methods import get_method
from vitslim.pruning.models import model_from_checkpoint
from vitslim.pruning.plan import PLAN_JSON, ModelSpec, SlimPlan, dense_plan
from vitslim.pruning.run_dir import begin_run, load_run, read_info, save_run
from vitslim.pruning.timm_adapter import count_params, geometry_of, input_shape_of
from vitslim.pruning.train import TrainConfig, barrier, config_dict, fit, is_main_process

from .plots import block_macs_png, training_curve_png
from .prune_report import model_title, write_prune_report
from .quantization import onnx_logits, top1_of
from .recipe import Recipe, check_listed_above, composed_entry
from .summary import SUMMARY_BATCH, failed_checks, summary_markdown

log = logging.getLogger(__name__)


def data_for(model: nn.Module, source: str) -> DataSplits:
    """Load `source` at the model's input size and check that the class counts agree."""
    in_chans, height, width = input_shape_of(model)
    data = load_data(source, in_chans, (height, width))
    if model.num_classes != data.num_classes:
        raise PruningError(
            f"model has {model.num_classes} classes but data {data.source!r} has {data.num_classes}: "
            f"pass --model-kwargs num_classes={data.num_classes}"
        )
    return data


def preprocessing_for(model: nn.Module, source: Optional[str]) -> Optional[dict]:
    """How images of `source` ('digits' or an ImageFolder) are prepared for `model`; None if unknown."""
    if source is None:
        return None
    in_chans, height, width = input_shape_of(model)
    return preprocessing(DIGITS if source == DIGITS else "image files", in_chans, (height, width))


def run_data_source(run_dir: Optional[str | Path]) -> Optional[str]:
    """The data a run directory was trained or pruned on (its info.json), if it says."""
    return read_info(run_dir).get("data") if run_dir else None


def _names(values: list) -> str:
    return ", ".join(map(str, values[:6])) + (f", ... ({len(values)} in all)" if len(values) > 6 else "")


def check_run_data(run_dir: Optional[str | Path], data: DataSplits, command: str) -> None:
    """Refuse data whose classes differ from the ones the run was trained on (its logits would
    mean other things); warn, and go on, when the classes agree but the images differ (pruning
    or calibrating on other images of the same classes can be meant). Runs that recorded no
    data identity (older runs, --model checkpoints) are not checked."""
    recorded = read_info(run_dir).get("data_identity") if run_dir else None
    if not recorded or not data.identity:
        return
    if recorded["classes"] != data.identity["classes"]:
        raise PruningError(
            f"{run_dir} was trained on data with classes [{_names(recorded['classes'])}] but {data.source} has "
            f"[{_names(data.identity['classes'])}]: give {command} the data the run was trained on ({recorded['source']})"
        )
    if recorded["files"] != data.identity["files"]:
        log.warning(
            f"{command}: {data.source} holds other images ({data.identity['images']}) than {run_dir} was trained on "
            f"({recorded['source']}, {recorded['images']} images) with the same classes: going on"
        )


def writing(out: Path, option: str = "--out"):
    """`out`'s write lock, held by the main process (the other DDP ranks write nothing there)."""
    return output_lock(out, option) if is_main_process() else contextlib.nullcontext()


def checkpoint_dir(out: Path, restart: bool) -> Path:
    """The run directory's checkpoint directory, emptied first with `restart`."""
    if Path(out).exists() and not Path(out).is_dir():
        raise PruningError(f"--out {out} is a file: give a run directory (new or an earlier run's)")
    directory = Path(out) / CHECKPOINT_DIR
    if restart and is_main_process():
        shutil.rmtree(directory, ignore_errors=True)
    barrier()
    return directory


def train_run(
    spec: ModelSpec,
    data_source: str,
    config: TrainConfig,
    out: Path,
    checkpoint: Optional[str] = None,
    pretrained: bool = False,
    restart: bool = False,
) -> dict:
    """Fine-tune the dense model and write a run directory (dense plan + weights + info + curve).
    An interrupted run resumes from its last epoch when rerun (`restart`: start over)."""
    with writing(out):
        return _train_run(spec, data_source, config, out, checkpoint, pretrained, restart)


def _train_run(spec, data_source, config, out, checkpoint, pretrained, restart) -> dict:
    torch.manual_seed(config.seed)  # the initial weights too, so that a run is reproducible
    model = model_from_checkpoint(spec, checkpoint, pretrained)
    data = data_for(model, data_source)
    checkpoints = checkpoint_dir(out, restart)
    result = fit(model, data, config, checkpoint_path=phase_path(checkpoints, "train"))
    info = {
        "model": spec.to_dict(),
        "data": data.source,
        "data_identity": data.identity or None,
        "train": config_dict(config),
        "augmentation": result.augmentation,
        "history": list(result.history),
        "val_top1": result.val_top1,
    }
    if not is_main_process():
        return info
    begin_run(out)
    if result.history:
        training_curve_png(
            list(result.history), out / "training.png", f"{model_title(spec.name, geometry_of(model))} on {data.source}"
        )
    save_run(out, dense_plan(spec, len(model.blocks)), model.cpu(), info)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the run directory is complete
    return info


@dataclass(frozen=True)
class PruneResult:
    """What a compression method made: the plan, the dense-shaped weights that go with it, and
    the report (params and MACs before and after, top-1 per stage, the method's own details)."""

    plan: SlimPlan
    model: nn.Module
    report: dict


def prune_model(
    method_name: str, config, plan: SlimPlan, model: nn.Module, data: DataSplits, checkpoints: Optional[Path] = None
) -> PruneResult:
    """Run a registered method on `model` from the start `plan` (the dense plan, or another
    method's result: methods compose) and measure what it removed; with `checkpoints` its phases
    are written there and resumed from there."""
    from vitslim.export.compact import compact_from_plan

    result = get_method(method_name).run(model, data, config, plan, checkpoints=checkpoints)
    geometry = geometry_of(model)
    start_macs = plan_macs(plan, geometry)["total"]
    report = {
        "model": plan.model.to_dict(),
        "method": method_name,
        "plan_method": result.plan.method,  # e.g. vtp+patch-slim when it started from VTP's run
        "data": data.source,
        "data_identity": data.identity or None,
        "params_dense": count_params(model),
        "params": count_params(compact_from_plan(result.model, result.plan)),
        "macs_dense": plan_macs(dense_plan(plan.model, geometry.depth), geometry)["total"],
        "macs": plan_macs(result.plan, geometry)["total"],
        "top1": result.top1,
        **result.report,
    }
    if not plan.is_dense:
        report["start"] = {
            "method": plan.method,
            "macs": start_macs,
            "params": count_params(compact_from_plan(model, plan)),
        }
    if report["macs"] >= start_macs:
        raise PruningError(
            f"{method_name} removed nothing with these settings ({report['macs']:,} MACs, as many as the model it "
            f"started from): ask it for more (see 'vitslim prune --method {method_name} --help')"
        )
    return PruneResult(plan=result.plan, model=result.model, report=report)


def write_prune_run(result: PruneResult, data: DataSplits, out: Path) -> None:
    """The run directory of a pruned model: plan, weights, info.json, prune_report.md and the method's plot."""
    begin_run(out)  # the human-readable files first, the run itself (plan last) after them
    write_prune_report(result.report, result.plan, result.model, data, out)
    save_run(out, result.plan, result.model, info=result.report)


def prune_run(
    method_name: str, config, plan: SlimPlan, model: nn.Module, data: DataSplits, out: Path, restart: bool = False
) -> dict:
    """Run a registered method and write its run directory (on the main process); return the
    report. An interrupted run resumes from its last checkpoint when rerun (`restart`: start over)."""
    with writing(out):
        checkpoints = checkpoint_dir(out, restart)
        result = prune_model(method_name, config, plan, model, data, checkpoints)
        if is_main_process():
            write_prune_run(result, data, out)
            shutil.rmtree(checkpoints, ignore_errors=True)
        return result.report


def summary_row(
    variant: str, export: ExportResult, pytorch_top1: Optional[float], onnx_top1_value: Optional[float]
) -> dict:
    report = export.report
    return {
        "variant": variant,
        "method": report["method"],
        "macs": report["macs"],
        "macs_fraction": report["macs"] / report["macs_dense"],
        "params": report["params"],
        "precision": report["precision"],
        "pytorch_top1": pytorch_top1,
        "onnx_top1": onnx_top1_value,
        "max_abs_diff": report["parity"]["max_abs_diff"],
        "onnx_mb": report["onnx"]["bytes"] / 1e6,
        "onnx": str(export.onnx_path),
    }


SUMMARY_BENCH = BenchSettings(warmup_seconds=0.5, min_seconds=1.5, min_iterations=20, max_rounds=2)


def engine_columns(onnx_path: Path, settings: BuildSettings) -> dict:
    """Build an engine with whichever TensorRT is installed; say so in one line if none is."""
    from vitslim.deploy.build import engine_from_onnx
    from vitslim.deploy.tensorrt_lib import find_tensorrt

    trt = find_tensorrt()
    if trt is None:
        log.warning(f"no TensorRT installed: skipping the engine for {onnx_path.name} (pip install tensorrt-rtx)")
        return {"engine_mb": None, "engine_library": None}
    result = engine_from_onnx(onnx_path, onnx_path.with_suffix(".engine"), settings)
    return {
        "engine_mb": result.manifest["engine"]["bytes"] / 1e6,
        "engine_library": f"{trt.name} {trt.version}",
        "engine": str(result.engine_path),
    }


def latency_columns(
    onnx_path: Path, plan: SlimPlan, model: nn.Module, with_timm: bool = False, int8_path: Optional[Path] = None
) -> dict:
    """Median latency at SUMMARY_BATCH on this machine's CPU: onnxruntime on the ONNX (and on its
    INT8 version) and PyTorch on the compact module, and with `with_timm` timm's own model
    (`model`, the baseline of every speed-up), measured in the same run."""
    from vitslim.deploy.bench import benchmark
    from vitslim.deploy.runners import OnnxRuntimeRunner, TorchRunner
    from vitslim.export.compact import compact_from_plan

    images = np.random.default_rng(0).standard_normal((SUMMARY_BATCH, *input_shape_of(model))).astype(np.float32)
    columns = {}
    runners = [("onnxruntime", OnnxRuntimeRunner(onnx_path)), ("torch", TorchRunner(compact_from_plan(model, plan)))]
    if int8_path is not None:
        runners.append(("int8", OnnxRuntimeRunner(int8_path)))
    if with_timm:
        runners.append(("timm", TorchRunner(model)))
    for name, runner in runners:
        with runner:
            result = benchmark(runner, images, "fp32", None, SUMMARY_BENCH, label=name)
        columns[f"{name}_ms"] = result["median_ms"]
        columns[f"{name}_p90_ms"] = result["p90_ms"]
    return columns


def int8_columns(
    name: str,
    onnx_path: Path,
    plan: SlimPlan,
    model: nn.Module,
    data: DataSplits,
    root: Path,
    images: torch.Tensor,
    seed: int,
    fp32: tuple[np.ndarray, np.ndarray],
) -> dict:
    """The variant's fp16 export and INT8 Q/DQ version (vitslim.quantization), measured on the
    validation split against the masked reference: the summary's INT8 table."""
    from .quantization import quantize_and_measure, reference_logits

    fp16 = export_plan(
        model,
        plan,
        root / f"{name}.fp16.onnx",
        images=images,
        precision="fp16",
        images_source=f"validation images of {data.source}",
        preprocessing=preprocessing_for(model, data.source),
    ).onnx_path
    report = quantize_and_measure(
        onnx_path,
        data,
        root / f"{name}.int8.onnx",
        reference_logits(model, plan, data.val),
        fp16_path=fp16,
        seed=seed,
        fp32=fp32,
    )
    by_precision = {r["precision"]: r for r in report["rows"]}
    int8 = by_precision["int8"]
    return {
        "fp16_top1": by_precision["fp16"]["top1"],
        "fp16_passed": by_precision["fp16"]["passed"],
        "int8_top1": int8["top1"],
        "int8_agreement": int8["agreement"],
        "int8_cosine": int8["cosine"],
        "int8_passed": int8["passed"],
        "int8_mb": int8["mb"],
        "int8_onnx": str(root / f"{name}.int8.onnx"),
    }


STAGE_FILE = "recipe_stage.json"  # in each stage's run directory: the settings it was made with


def _finished_stage(directory: Path, stage: dict) -> Optional[dict]:
    """info.json of a stage that finished earlier with exactly these settings, else None."""
    try:
        recorded = json.loads((directory / STAGE_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return None  # never finished (or the record is damaged): run the stage again
    if recorded != stage or not (directory / PLAN_JSON).is_file():
        return None
    try:
        return read_info(directory) or None  # no info.json: run the stage again
    except PruningError:
        return None  # a damaged info.json: run the stage again


def _run_stage(name: str, directory: Path, stage: dict, restart: bool, run, progress: RunProgress) -> tuple[dict, bool]:
    """(info, ran): `run()` (which writes `directory` and returns its info) unless the stage
    finished earlier with the same settings; then its info is reused and `ran` is False."""
    info = None if restart else _finished_stage(directory, stage)
    if info is not None:
        log.warning(f"{name}: finished earlier with the same settings ({directory}); skipped")
        progress.end(skipped=True)
        return info, False
    if is_main_process():
        (directory / STAGE_FILE).unlink(
            missing_ok=True
        )  # until this run of the stage finishes, its directory describes no settings
    barrier()
    info = run()
    if is_main_process():
        write_text_atomic(directory / STAGE_FILE, json.dumps(stage, indent=1))
    barrier()
    progress.end()
    return info, True


def _epochs_of(config) -> float:
    """The training epochs a method's settings ask for (its *_epochs fields, warm-up excluded)."""
    return float(
        sum(
            getattr(config, f.name)
            for f in dataclasses.fields(config)
            if f.name.endswith("epochs") and f.name != "warmup_epochs" and isinstance(getattr(config, f.name), int)
        )
    )


class RunProgress:
    """Where `vitslim run` is: stage i of N and an overall ETA. The work is counted in units (a
    training epoch is one; exporting, checking and measuring a variant is one); the ETA is the
    time per unit of the stages run so far (skipped ones excluded) times the units left."""

    def __init__(self, stages: list[tuple[str, float]], report: Optional[Callable[[str], None]]) -> None:
        self.units = {name: max(1.0, units) for name, units in stages}
        self.names = [name for name, _ in stages]
        self.report = report
        self.left = sum(self.units.values())
        self.timed_units = self.timed_seconds = 0.0
        self.current: Optional[tuple[str, float]] = None

    def eta(self) -> str:
        if not self.timed_units:
            return "ETA after the first stage"
        seconds = self.timed_seconds / self.timed_units * self.left
        return f"about {seconds / 60:.1f} min left" if seconds >= 90 else f"about {seconds:.0f} s left"

    def begin(self, name: str) -> None:
        self.current = (name, time.perf_counter())
        if self.report is not None:
            self.report(f"run: stage {self.names.index(name) + 1}/{len(self.names)}: {name} ({self.eta()})")

    def end(self, skipped: bool = False) -> None:
        name, started = self.current
        self.left -= self.units[name]
        if not skipped:
            self.timed_units += self.units[name]
            self.timed_seconds += time.perf_counter() - started


def run_recipe(recipe: Recipe, restart: bool = False, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Train the dense model, run each method, export every variant with parity checked, and write
    the summary under runs/NAME. Stages that finished earlier with the same settings are skipped,
    interrupted ones resume (`restart`: everything from the start). `progress` receives one line
    per stage: its number, name and the overall ETA."""
    stages = [("dense", float(recipe.train.epochs))] + [(name, _epochs_of(config)) for name, config in recipe.methods]
    stages += [(f"export {name}", 1.0) for name in ["dense", *(name for name, _ in recipe.methods)]]
    with writing(recipe.run_root, "the recipe's run directory"):
        return _run_recipe(recipe, restart, RunProgress(stages, progress if is_main_process() else None))


def _run_recipe(recipe: Recipe, restart: bool, progress: RunProgress) -> dict:
    started = time.perf_counter()
    root = recipe.run_root
    dense_dir = root / "dense"
    dense_stage = {
        "model": recipe.model.to_dict(),
        "data": recipe.data,
        "train": config_dict(recipe.train),
        "checkpoint": recipe.checkpoint,
        "pretrained": recipe.pretrained,
    }
    progress.begin("dense")
    info, dense_ran = _run_stage(
        "dense",
        dense_dir,
        dense_stage,
        restart,
        lambda: train_run(
            recipe.model, recipe.data, recipe.train, dense_dir, recipe.checkpoint, recipe.pretrained, restart
        ),
        progress,
    )
    plan, model = load_run(dense_dir)
    data = data_for(model, recipe.data)
    variants = [("dense", dense_dir, info["val_top1"])]
    # A stage whose start ran in this invocation runs again from the beginning, even with the same
    # settings: its start's weights are new (a run directory deleted, another machine). A composed
    # entry's record holds its start's record, so changing the start's settings reruns it too.
    stages, ran = {}, {"dense"} if dense_ran else set()
    for name, config in recipe.methods:
        start, method = composed_entry(name)
        stage = {"method": method, "config": dataclasses.asdict(config), "dense": dense_stage}
        start_plan, start_model = (plan, model)
        if start is not None:
            check_listed_above(name, start, list(stages))  # checked when read too; a Recipe built in code
            stage["start"] = stages[start]
            start_plan, start_model = load_run(root / start)
        stages[name] = stage
        fresh = restart or (start or "dense") in ran
        run = functools.partial(prune_run, method, config, start_plan, start_model, data, root / name, fresh)
        progress.begin(name)
        report, stage_ran = _run_stage(name, root / name, stage, fresh, run, progress)
        if stage_ran:
            ran.add(name)
        variants.append((name, root / name, report["top1"]))
    if not is_main_process():
        return {}
    images = calibration_set(data.val, 8).images
    exports, rows = {}, []
    for name, run_dir, top1 in variants:
        progress.begin(f"export {name}")
        variant_plan, variant_model = load_run(run_dir)
        exports[name] = export_plan(
            variant_model,
            variant_plan,
            root / f"{name}.onnx",
            images=images,
            images_source=f"validation images of {data.source}",
            preprocessing=preprocessing_for(variant_model, data.source),
            precision=recipe.deploy.precision,
            token_layout=recipe.deploy.token_layout,
            channel_layout=recipe.deploy.channel_layout,
            attention=recipe.deploy.attention,
        )
        fp32 = onnx_logits(
            exports[name].onnx_path, data.val
        )  # one pass over the validation split: the summary's top-1 and the INT8 report's fp32 row
        row = summary_row(name, exports[name], top1, top1_of(*fp32))
        if recipe.deploy.int8 and recipe.deploy.precision == "fp32":  # INT8 quantizes fp32 exports
            row.update(
                int8_columns(
                    name,
                    exports[name].onnx_path,
                    variant_plan,
                    variant_model,
                    data,
                    root,
                    images,
                    recipe.train.seed,
                    fp32,
                )
            )
        if recipe.deploy.engines:
            row.update(engine_columns(exports[name].onnx_path, recipe.build))
        if recipe.deploy.latency:
            row.update(
                latency_columns(
                    exports[name].onnx_path,
                    variant_plan,
                    variant_model,
                    with_timm=name == "dense",
                    int8_path=Path(row["int8_onnx"]) if "int8_onnx" in row else None,
                )
            )
        rows.append(row)
        progress.end()
    summary = {
        "recipe": recipe.name,
        "data": data.source,
        "seed": recipe.train.seed,
        "rows": rows,
        "failed_checks": failed_checks(rows),
        "seconds": time.perf_counter() - started,
    }
    write_text_atomic(root / "summary.json", json.dumps(summary, indent=1))
    write_text_atomic(root / "summary.md", summary_markdown(f"vitslim run: {recipe.name}", rows, recipe.build))
    block_macs_png(
        {name: e.report["blocks"] for name, e in exports.items()},
        root / "block_macs.png",
        f"{recipe.name}: MACs per block of {model_title(recipe.model.name, geometry_of(model))}",
    )
    return summary

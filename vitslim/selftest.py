"""`vitslim selftest`: the minute-long check a user runs on their GPU machine (and in the Docker
image) for what no machine of vitslim's own CI can show: that engines built by each installed
TensorRT load, pick the right optimisation profile, compute what the masked PyTorch reference
computes, and can be timed.

A tiny ViT (random weights, fixed seed) with a slim plan that uses token selection, channel
pruning and narrower value heads is exported in fp32 and fp16, in both attention forms TensorRT
parses (the ONNX Attention op, skipped with a reason by a TensorRT older than 10.14, and
MatMul -> Softmax -> MatMul), with the masked reference's logits
for seeded images (`prepare`, needs torch); each installed TensorRT builds both with two batch
profiles (1:2:4 and 8:8:16). On a GPU each engine then runs at a batch inside each profile
(parity against the reference logits), at a batch outside both (which must be refused with a
one-line error before any work), replays its enqueue from a CUDA graph (output against the
reference again) and is timed so; a TensorRT-RTX engine's runtime cache is written and must be
accepted when the engine is loaded again (`run_checks`, needs only numpy, TensorRT and
Polygraphy: the Docker runtime image runs it on files prepared in the export image). fp32 engines
are held to the fp32 tolerance; fp16 engines of this random-weight model to cosine >= 0.999
(random logits lie too close together for a top-1 criterion). One table, one row per check.
Where onnxruntime-gpu is installed, the same ONNX files also run on onnxruntime's CUDA provider
(plain runs and CUDA-graph replays, parity against the reference, timing).
Exit 0 when every check passed, 1 when one failed, 2 when no GPU is present (builds still checked).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from vitslim.core.errors import EXIT_CHECK_FAILED, EXIT_OK, EXIT_UNDECIDED, VitslimError
from vitslim.core.limits import MAX_BATCH
from vitslim.core.precision import Parity, compare_outputs, tolerance_for
from vitslim.deploy.bench import BenchSettings, benchmark
from vitslim.deploy.build import BUILD_OPTIONS, BatchProfile, BuildSettings, build_settings_from_text, engine_from_onnx
from vitslim.deploy.errors import DeployError
from vitslim.deploy.gpu import describe as describe_gpu
from vitslim.deploy.gpu import gpu_info
from vitslim.deploy.runners import TensorRTRunner, numpy_dtype_of
from vitslim.deploy.tensorrt_lib import LIBRARIES, find_tensorrt
from vitslim.export.attention_form import (
    DEFAULT_ATTENTION_FORM,
    NEEDS_ATTENTION_LAYER,
    TENSORRT_FORMS,
)  # no torch: the runtime image has none

PASS, FAIL, NO_GPU = EXIT_OK, EXIT_CHECK_FAILED, EXIT_UNDECIDED
PROFILES = (BatchProfile(1, 2, 4), BatchProfile(8, 8, 16))
INSIDE, OUTSIDE = [2, 16], 32  # a batch in each profile, and one in neither
MODEL = (
    "deit_tiny_patch16_224",
    {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 3, "num_heads": 2, "num_classes": 10},
)
REFERENCE = "reference.npz"  # per model and checked batch: seeded images and the reference logits
KIT = "kit.json"  # what a prepared directory holds: models, their profiles, the batches to check, build options
FP16_MIN_COSINE = 0.999


@dataclass(frozen=True)
class Check:
    check: str
    library: str
    passed: Optional[bool]  # None: not run (no GPU)
    detail: str


def tiny_model_and_plan():
    """A 3-block ViT on 32x32 images (16 patches + class token) and a plan that uses every kind of
    selection the exporter writes: kept tokens, qkv/fc1 input channels, narrower value heads, MLP
    hidden units."""
    import timm
    import torch

    from vitslim.pruning.plan import BlockPlan, ModelSpec, SlimPlan

    torch.manual_seed(0)
    model = timm.create_model(MODEL[0], **MODEL[1]).eval()
    blocks = (
        BlockPlan(qkv_in=tuple(range(40)), hidden=tuple(range(0, 256, 3))),
        BlockPlan(
            kept_tokens=(0, *range(1, 17, 2)),
            proj_in=tuple(range(0, 24)) + tuple(range(32, 56)),
            fc1_in=tuple(range(48)),
        ),
        BlockPlan(kept_tokens=(0,)),
    )
    return model, SlimPlan(model=ModelSpec(*MODEL), blocks=blocks, method="selftest")


def write_kit(directory: Path, models: list[dict], arrays: dict, build: Optional[dict] = None) -> Path:
    """A prepared directory: kit.json (each model's ONNX file, precision, profiles, the batches to
    check inside them and one outside) and reference.npz ('NAME/images_B', 'NAME/logits_B')."""
    from vitslim.core.files import atomic_path, write_json_atomic

    with atomic_path(directory / REFERENCE) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
    write_json_atomic(directory / KIT, {"kind": "vitslim kit", "version": 1, "models": models, "build": build or {}})
    return directory


def prepare(work: Path, progress=print) -> Path:
    """Export the tiny model (fp32, fp16) into `work` with the masked reference's logits (torch)."""
    import torch

    from vitslim.export.onnx_export import export_plan
    from vitslim.pruning.reference import MaskedReference

    work.mkdir(parents=True, exist_ok=True)
    model, plan = tiny_model_and_plan()
    reference, arrays, models = MaskedReference(model, plan).eval(), {}, []
    for form in TENSORRT_FORMS:
        for precision in ("fp32", "fp16"):
            progress(f"selftest: exporting the tiny model ({precision}, attention as {form})")
            name = f"tiny-{precision}" + ("" if form == DEFAULT_ATTENTION_FORM else f"-{form}")
            export_plan(model, plan, work / f"{name}.onnx", precision=precision, attention=form)
            models.append(
                {
                    "name": name,
                    "onnx": f"{name}.onnx",
                    "precision": precision,
                    "profiles": [str(p) for p in PROFILES],
                    "inside": list(INSIDE),
                    "outside": OUTSIDE,
                    "input": [3, 32, 32],
                    "attention_form": form,
                }
            )
    for batch in INSIDE:
        images = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        with torch.no_grad():
            logits = reference(torch.from_numpy(images)).numpy()
        for entry in models:
            arrays[f"{entry['name']}/images_{batch}"], arrays[f"{entry['name']}/logits_{batch}"] = images, logits
    return write_kit(work, models, arrays)


def make_kit(onnx_path: Path, out: Path, profiles: tuple[BatchProfile, ...], build: Optional[dict] = None) -> Path:
    """A kit for `onnx_path` (e.g. for a Jetson): the ONNX, onnxruntime's logits on seeded images
    at each profile's opt batch, one batch outside every profile, build options (e.g. dla_core),
    and run_on_device.sh, which builds and checks the engine on the device with its own TensorRT
    (vitslim selftest --prepared)."""
    import onnxruntime as ort

    from vitslim.core.files import write_bytes_atomic, write_text_atomic
    from vitslim.core.metadata import image_shape_of
    from vitslim.core.precision import graph_precision
    from vitslim.deploy.build import read_onnx

    graph = read_onnx(onnx_path)
    shape = list(image_shape_of(graph))
    out.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", onnx_path.stem).strip("-.")[:64] or "model"  # fits KIT_NAME
    write_bytes_atomic(out / f"{name}.onnx", onnx_path.read_bytes())
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    source = session.get_inputs()[0]
    dtype = numpy_dtype_of(source.type)
    inside = sorted({p.opt for p in profiles})
    arrays = {}
    for batch in inside:
        images = np.random.default_rng(batch).standard_normal((batch, *shape)).astype(np.float32)
        arrays[f"{name}/images_{batch}"] = images
        arrays[f"{name}/logits_{batch}"] = session.run(None, {source.name: images.astype(dtype)})[0].astype(np.float32)
    model = {
        "name": name,
        "onnx": f"{name}.onnx",
        "precision": graph_precision(graph),
        "profiles": [str(p) for p in profiles],
        "inside": inside,
        "outside": max(p.max for p in profiles) + 1,
        "input": shape,
        "reference": "onnxruntime (CPU) on the export machine",
    }
    write_kit(out, [model], arrays, build)
    script = write_text_atomic(out / "run_on_device.sh", RUN_ON_DEVICE)
    script.chmod(0o755)
    return out


RUN_ON_DEVICE = """#!/bin/sh
# Build this kit's engine on this device with its own TensorRT (JetPack's on a Jetson) and check
# it against the reference outputs made on the export machine: vitslim selftest --prepared.
# Needs python3 with numpy and TensorRT's Python package (JetPack has both); installs vitslim
# (the wheel in this kit, built with 'pip wheel --no-deps -w KIT .' from a vitslim checkout) and
# what its deploy side imports.
set -eu
cd "$(dirname "$0")"
python3 -m pip install --user --no-deps ./vitslim-*.whl
python3 -m pip install --user "polygraphy>=0.49" "onnx>=1.17" "pyyaml>=6"
exec python3 -m vitslim selftest --prepared .
"""


def parity_passes(parity: Parity, precision: str) -> tuple[bool, str]:
    if precision == "fp16":
        return parity.cosine >= FP16_MIN_COSINE, f"cosine >= {FP16_MIN_COSINE}"
    tolerance = tolerance_for(precision)
    return parity.passes(tolerance), str(tolerance.to_dict())


def runtime_checks(
    engine: Path, library: str, model: dict, reference: dict, runtime_cache: Optional[Path] = None
) -> list[Check]:
    """Load, profile choice, parity inside each profile, refusal outside, CUDA-graph replay parity,
    timing, and (TensorRT-RTX, `runtime_cache`) the runtime cache written and accepted again on a
    second load (needs a GPU)."""
    checks, name, precision = [], model["name"], model["precision"]
    try:
        runner = TensorRTRunner(engine, runtime_cache=runtime_cache)
        with runner:
            checks.append(Check(f"{name}: loads on this GPU", library, True, str(runner.description["gpu"]["name"])))
            for batch in model["inside"]:
                parity = compare_outputs(
                    reference[f"{name}/logits_{batch}"], runner.infer(reference[f"{name}/images_{batch}"])
                )
                passed, criterion = parity_passes(parity, precision)
                checks.append(
                    Check(
                        f"{name}: batch {batch} matches the reference",
                        library,
                        passed,
                        f"profile {runner.profile}: max abs diff {parity.max_abs_diff:.1e}, cosine {parity.cosine:.6f}, "
                        f"top-1 agreement {parity.top1_agreement:.0%} (needs {criterion})",
                    )
                )
            outside = model["outside"]
            try:
                runner.infer(np.zeros((outside, *model["input"]), dtype=np.float32))
                checks.append(
                    Check(f"{name}: batch {outside} (outside every profile) refused", library, False, "it ran")
                )
            except DeployError as error:
                checks.append(
                    Check(
                        f"{name}: batch {outside} (outside every profile) refused",
                        library,
                        "outside every optimisation profile" in str(error),
                        str(error),
                    )
                )
            batch = model["inside"][-1]
            prepared = runner.prepare(reference[f"{name}/images_{batch}"])  # bound to fixed buffers, enqueue captured
            for _ in range(3):  # TensorRT-RTX captures its own graph after the first enqueues
                runner.run_prepared(prepared)
            parity = compare_outputs(reference[f"{name}/logits_{batch}"], runner.bound_output())
            passed, criterion = parity_passes(parity, precision)
            how = (
                "a replay of the captured enqueue"
                if runner.trt.name == "tensorrt"
                else "TensorRT-RTX's own graph replay"
            )
            checks.append(
                Check(
                    f"{name}: CUDA-graph replay at batch {batch} matches the reference",
                    library,
                    passed,
                    f"{how}: max abs diff {parity.max_abs_diff:.1e}, cosine {parity.cosine:.6f} (needs {criterion})",
                )
            )
            timing = benchmark(
                runner,
                np.zeros((batch, *model["input"]), dtype=np.float32),
                precision,
                settings=BenchSettings(warmup_seconds=0.5, min_seconds=1.0, max_rounds=1),
                label=name,
            )
            checks.append(
                Check(
                    f"{name}: timed at batch {batch} (CUDA graph, CUDA events)",
                    library,
                    timing["median_ms"] > 0,
                    f"median {timing['median_ms']:.3f} ms, p90 {timing['p90_ms']:.3f} ms, {timing['iterations']} runs",
                )
            )
        if runtime_cache is not None:
            with TensorRTRunner(engine, runtime_cache=runtime_cache) as again:
                again.infer(reference[f"{name}/images_{model['inside'][0]}"])
                checks.append(
                    Check(
                        f"{name}: runtime cache reloaded",
                        library,
                        again.runtime_cache_loaded is True,
                        f"{runner.runtime_cache_path.name}: {runner.runtime_cache_path.stat().st_size} bytes, "
                        f"{'accepted' if again.runtime_cache_loaded else 'rejected'} on the second load",
                    )
                )
    except VitslimError as error:
        checks.append(Check(f"{name}: runs", library, False, str(error)))
    except Exception as error:  # a crash is what this command exists to catch: report it as a failed check
        checks.append(Check(f"{name}: runs", library, False, f"{type(error).__name__}: {error}"))
    return checks


def onnxruntime_checks(prepared: Path, kit: dict, reference: dict) -> list[Check]:
    """Each kit ONNX on onnxruntime's CUDA provider (onnxruntime-gpu): parity at every batch with
    plain runs and with CUDA-graph replays, and timing so (needs a GPU)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return [
            Check(
                "onnxruntime on the GPU",
                "-",
                None,
                "onnxruntime is not installed: pip install onnxruntime-gpu to check it",
            )
        ]

    from vitslim.deploy.runners import OnnxRuntimeRunner

    label = f"onnxruntime {ort.__version__}"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return [
            Check(
                "onnxruntime on the GPU",
                label,
                None,
                "this onnxruntime has no CUDA provider: pip install onnxruntime-gpu to check it",
            )
        ]
    checks = []
    for model in kit["models"]:
        name = model["name"]
        try:
            for cuda_graph in (False, True):
                how = "CUDA-graph replays" if cuda_graph else "plain runs"
                with OnnxRuntimeRunner(prepared / model["onnx"], device="cuda", cuda_graph=cuda_graph) as runner:
                    for batch in model["inside"]:
                        parity = compare_outputs(
                            reference[f"{name}/logits_{batch}"], runner.infer(reference[f"{name}/images_{batch}"])
                        )
                        passed, criterion = parity_passes(parity, model["precision"])
                        checks.append(
                            Check(
                                f"{name}: batch {batch} on the CUDA provider ({how}) matches the reference",
                                label,
                                passed,
                                f"max abs diff {parity.max_abs_diff:.1e}, cosine {parity.cosine:.6f} (needs {criterion})",
                            )
                        )
                    batch = model["inside"][-1]
                    timing = benchmark(
                        runner,
                        reference[f"{name}/images_{batch}"],
                        model["precision"],
                        settings=BenchSettings(warmup_seconds=0.5, min_seconds=1.0, max_rounds=1),
                        label=name,
                    )
                    checks.append(
                        Check(
                            f"{name}: timed on the CUDA provider at batch {batch} ({how}, CUDA events)",
                            label,
                            timing["median_ms"] > 0,
                            f"median {timing['median_ms']:.3f} ms, p90 {timing['p90_ms']:.3f} ms, {timing['iterations']} runs",
                        )
                    )
        except VitslimError as error:
            checks.append(Check(f"{name}: runs on onnxruntime's CUDA provider", label, False, str(error)))
        except Exception as error:  # a crash is what this command exists to catch
            checks.append(
                Check(f"{name}: runs on onnxruntime's CUDA provider", label, False, f"{type(error).__name__}: {error}")
            )
    return checks


def read_kit(prepared: Path) -> tuple[dict, dict]:
    import json

    if not (prepared / KIT).is_file() or not (prepared / REFERENCE).is_file():
        raise DeployError(
            f"{prepared} holds no {KIT} and {REFERENCE}: make them with 'vitslim selftest --prepare {prepared}' or 'vitslim kit'"
        )
    try:
        kit = json.loads((prepared / KIT).read_text())
        reference = dict(np.load(prepared / REFERENCE))
        fields = ("name", "onnx", "precision", "profiles", "inside", "outside", "input")
        if not isinstance(kit.get("models"), list) or not all(
            isinstance(m, dict) and all(f in m for f in fields) for m in kit["models"]
        ):
            raise ValueError("models")
        build = kit.get("build", {})
        if not isinstance(build, dict) or not set(build) <= set(BUILD_OPTIONS):
            raise ValueError("build")  # only build options: never a file (timing cache) or a library
        build_settings_from_text(build, f"{prepared / KIT} build")  # bad values: a one-line error here
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise DeployError(
            f"{prepared / KIT} or {REFERENCE} is unreadable or incomplete ({type(error).__name__}): prepare the directory again"
        ) from None
    for model in kit["models"]:
        _check_kit_model(prepared, model)
    return kit, reference


KIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a kit's model names become engine file names


def _check_kit_model(prepared: Path, model: dict) -> None:
    """A kit's model entry names files inside the kit and nothing else: its name is a plain slug
    (engines and manifests are named after it), its ONNX a regular file in the kit's folder."""
    name, onnx = model["name"], model["onnx"]
    if not isinstance(name, str) or not KIT_NAME.fullmatch(name):
        raise DeployError(
            f"{prepared / KIT}: model name {name!r} is not a plain name (letters, digits, . _ -): prepare the kit again"
        )
    path = prepared / str(onnx)
    inside = path.resolve().parent == prepared.resolve()
    if not isinstance(onnx, str) or Path(onnx).name != onnx or not inside or path.is_symlink() or not path.is_file():
        raise DeployError(
            f"{prepared / KIT}: model {name}'s ONNX {onnx!r} is not a file in {prepared} (paths and links are refused): "
            "prepare the kit again"
        )
    profiles = model["profiles"]
    if not isinstance(profiles, list) or not profiles or not all(isinstance(p, str) for p in profiles):
        raise DeployError(
            f"{prepared / KIT}: model {name}'s profiles must be a list of MIN:OPT:MAX: prepare the kit again"
        )
    for profile in profiles:
        BatchProfile.parse(profile)  # a one-line error for a bad one
    numbers = [model["outside"], *model["inside"]] if isinstance(model["inside"], list) else [None]
    if not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_BATCH for n in numbers):
        raise DeployError(
            f"{prepared / KIT}: model {name}'s batches must be integers in 1..{MAX_BATCH}: prepare the kit again"
        )


def run_checks(prepared: Path, library: Optional[str] = None, progress=print) -> list[Check]:
    """Every check on a prepared directory (selftest --prepare, or vitslim kit), for `library` or
    each installed TensorRT (each library's runtime checks in a process of their own: Polygraphy
    serves one TensorRT per process)."""
    gpu = gpu_info()
    libraries = [library] if library else [name for name in LIBRARIES if find_tensorrt(name) is not None]
    checks = [
        Check(
            "GPU present",
            "-",
            True if gpu else None,
            describe_gpu(gpu) if gpu else "nvidia-smi sees no NVIDIA GPU: the runtime checks are skipped",
        )
    ]
    kit, reference = read_kit(prepared)
    if gpu is not None and library is None:  # once, in the first process (a --library child checks its TensorRT only)
        checks += onnxruntime_checks(prepared, kit, reference)
    if not libraries:
        return checks + [
            Check(
                "TensorRT installed",
                "-",
                False,
                "neither tensorrt nor tensorrt_rtx imports: pip install tensorrt (or tensorrt-rtx)",
            )
        ]
    for index, library_name in enumerate(libraries):
        if gpu is not None and index > 0:
            checks += _in_subprocess(library_name, prepared)
            continue
        trt = find_tensorrt(library_name)
        label = f"{library_name} {trt.version}"
        for model in kit["models"]:
            if not trt.has_attention_layer and _attention_form(prepared, model) == NEEDS_ATTENTION_LAYER:
                checks.append(
                    Check(
                        f"{model['name']}: builds",
                        label,
                        None,
                        f"skipped: {label} has no attention layer (TensorRT parses the ONNX "
                        f"Attention op from 10.14 on): export with --attention matmul-softmax for it",
                    )
                )
                continue
            engine = prepared / f"{model['name']}-{library_name}.engine"
            profiles = tuple(BatchProfile.parse(p) for p in model["profiles"])
            progress(f"selftest: building {engine.name} with {label}")
            try:
                started = time.perf_counter()
                settings = BuildSettings(profiles=profiles, library=library_name, **kit.get("build", {}))
                manifest = engine_from_onnx(prepared / model["onnx"], engine, settings).manifest
                built = (
                    manifest["precision"] == model["precision"]
                    and [str(BatchProfile(**p)) for p in manifest["profiles"]] == model["profiles"]
                )
                checks.append(
                    Check(
                        f"{model['name']}: builds strongly typed, manifest right",
                        label,
                        built,
                        f"{time.perf_counter() - started:.1f} s, {manifest['engine']['bytes'] / 1e6:.1f} MB, target {manifest['target']['kind']}",
                    )
                )
            except VitslimError as error:
                checks.append(Check(f"{model['name']}: builds", label, False, str(error)))
                continue
            if gpu is None:
                checks.append(Check(f"{model['name']}: runs", label, None, "not run: no GPU"))
            else:
                progress(f"selftest: running {engine.name}")
                runtime_cache = prepared / "runtime-cache" if library_name == "tensorrt_rtx" else None
                checks += runtime_checks(engine, label, model, reference, runtime_cache)
    return checks


def _attention_form(prepared: Path, model: dict):
    """The kit model's attention form: from kit.json (selftest) or the ONNX's metadata (vitslim kit)."""
    from vitslim.core.metadata import attention_form_of
    from vitslim.deploy.build import read_onnx

    return model.get("attention_form") or attention_form_of(read_onnx(prepared / model["onnx"]))


def _in_subprocess(library: str, prepared: Path) -> list[Check]:
    """`library`'s checks from `vitslim selftest --library L --prepared DIR --json FILE` in a process
    of its own (its GPU row is dropped: this process reports the GPU)."""
    import json

    with tempfile.TemporaryDirectory(prefix="vitslim-selftest-") as directory:
        result = Path(directory) / "checks.json"
        completed = subprocess.run(
            [
                sys.executable,
                "-m",
                "vitslim",
                "selftest",
                "--library",
                library,
                "--prepared",
                str(prepared),
                "--json",
                str(result),
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if not result.is_file():
            return [
                Check(
                    "runs",
                    library,
                    False,
                    f"selftest --library {library} exited {completed.returncode}: {completed.stderr.strip()[-300:]}",
                )
            ]
        return [Check(**entry) for entry in json.loads(result.read_text())["checks"][1:]]


def table(checks: list[Check]) -> str:
    lines = ["| check | library | result | detail |", "|---|---|---|---|"]
    lines += [
        f"| {c.check} | {c.library} | {'pass' if c.passed else 'FAIL' if c.passed is False else 'skipped'} | {c.detail} |"
        for c in checks
    ]
    return "\n".join(lines)


def exit_code(checks: list[Check]) -> int:
    """1 if any check failed, else 2 if there is no GPU (nothing at run time was verified), else 0."""
    if any(c.passed is False for c in checks):
        return FAIL
    return NO_GPU if checks[0].passed is None else PASS


def run(
    work: Optional[Path] = None, library: Optional[str] = None, prepared: Optional[Path] = None
) -> tuple[int, list[Check]]:
    """Prepare (unless `prepared` is given) into `work` (default: a temporary directory), check."""
    if prepared is not None:
        checks = run_checks(prepared, library)
    elif work is not None:
        checks = run_checks(prepare(work), library)
    else:
        with tempfile.TemporaryDirectory(prefix="vitslim-selftest-") as directory:
            checks = run_checks(prepare(Path(directory)), library)
    return exit_code(checks), checks


def to_dict(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]

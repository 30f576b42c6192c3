"""`vitslim selftest`: the minute-long check a user runs on their GPU machine (and in the Docker
image) for what no machine of vitslim's own CI can show: that engines built by each installed
TensorRT load, pick the right optimisation profile, compute what the masked PyTorch reference
computes, and can be timed.

A tiny ViT (random weights, fixed seed) with a slim plan that uses token selection, channel
pruning and narrower value heads is exported in fp32 and fp16, with the masked reference's logits
for seeded images (`prepare`, needs torch); each installed TensorRT builds both with two batch
profiles (1:2:4 and 8:8:16). On a GPU each engine then runs at a batch inside each profile
(parity against the reference logits), at a batch outside both (which must be refused with a
one-line error before any work) and is timed (`run_checks`, needs only numpy, TensorRT and
Polygraphy: the Docker runtime image runs it on files prepared in the export image). fp32 engines
are held to the fp32 tolerance; fp16 engines of this random-weight model to cosine >= 0.999
(random logits lie too close together for a top-1 criterion). One table, one row per check.
Exit 0 when every check passed, 1 when one failed, 2 when no GPU is present (builds still checked).
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from vitslim.deploy.bench import BenchSettings, benchmark
from vitslim.deploy.build import BatchProfile, BuildSettings, engine_from_onnx
from vitslim.deploy.errors import DeployError
from vitslim.deploy.gpu import gpu_info
from vitslim.deploy.runners import TensorRTRunner
from vitslim.deploy.tensorrt_lib import LIBRARIES, find_tensorrt
from vitslim.errors import VitslimError
from vitslim.precision import Parity, compare_outputs, tolerance_for

PASS, FAIL, NO_GPU = 0, 1, 2
PROFILES = (BatchProfile(1, 2, 4), BatchProfile(8, 8, 16))
INSIDE, OUTSIDE = (2, 16), 32  # a batch in each profile, and one in neither
MODEL = ("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 3, "num_heads": 2, "num_classes": 10})
REFERENCE = "reference.npz"  # seeded images and the masked reference's logits, per batch in INSIDE
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
        BlockPlan(kept_tokens=(0, *range(1, 17, 2)), proj_in=tuple(range(0, 24)) + tuple(range(32, 56)), fc1_in=tuple(range(48))),
        BlockPlan(kept_tokens=(0,)),
    )
    return model, SlimPlan(model=ModelSpec(*MODEL), blocks=blocks, method="selftest")


def prepare(work: Path, progress=print) -> Path:
    """Export the tiny model (fp32, fp16) into `work` with the reference logits beside (torch)."""
    import torch

    from vitslim.export.onnx_export import export_plan
    from vitslim.pruning.reference import MaskedReference

    work.mkdir(parents=True, exist_ok=True)
    model, plan = tiny_model_and_plan()
    for precision in ("fp32", "fp16"):
        progress(f"selftest: exporting the tiny model ({precision})")
        export_plan(model, plan, work / f"tiny-{precision}.onnx", precision=precision)
    reference, arrays = MaskedReference(model, plan).eval(), {}
    for batch in INSIDE:
        images = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        with torch.no_grad():
            arrays[f"logits_{batch}"] = reference(torch.from_numpy(images)).numpy()
        arrays[f"images_{batch}"] = images
    np.savez(work / REFERENCE, **arrays)
    return work


def parity_passes(parity: Parity, precision: str) -> tuple[bool, str]:
    if precision == "fp16":
        return parity.cosine >= FP16_MIN_COSINE, f"cosine >= {FP16_MIN_COSINE}"
    tolerance = tolerance_for(precision)
    return parity.passes(tolerance), str(tolerance.to_dict())


def runtime_checks(engine: Path, library: str, precision: str, reference: dict) -> list[Check]:
    """Load, profile choice, parity inside each profile, refusal outside, timing (needs a GPU)."""
    checks, name = [], f"{precision} engine"
    try:
        runner = TensorRTRunner(engine)
        with runner:
            checks.append(Check(f"{name}: loads on this GPU", library, True, str(runner.description["gpu"]["name"])))
            for batch in INSIDE:
                parity = compare_outputs(reference[f"logits_{batch}"], runner.infer(reference[f"images_{batch}"]))
                passed, criterion = parity_passes(parity, precision)
                checks.append(Check(f"{name}: batch {batch} matches the reference", library, passed,
                                    f"profile {runner.profile}: max abs diff {parity.max_abs_diff:.1e}, cosine {parity.cosine:.6f}, "
                                    f"top-1 agreement {parity.top1_agreement:.0%} (needs {criterion})"))
            try:
                runner.infer(np.zeros((OUTSIDE, 3, 32, 32), dtype=np.float32))
                checks.append(Check(f"{name}: batch {OUTSIDE} (outside both profiles) refused", library, False, "it ran"))
            except DeployError as error:
                checks.append(Check(f"{name}: batch {OUTSIDE} (outside both profiles) refused", library, "outside every optimisation profile" in str(error), str(error)))
            timing = benchmark(runner, np.zeros((8, 3, 32, 32), dtype=np.float32), precision,
                               settings=BenchSettings(warmup_seconds=0.5, min_seconds=1.0, max_rounds=1), label="selftest")
            checks.append(Check(f"{name}: timed at batch 8 (CUDA events)", library, timing["median_ms"] > 0,
                                f"median {timing['median_ms']:.3f} ms, p90 {timing['p90_ms']:.3f} ms, {timing['iterations']} runs"))
    except VitslimError as error:
        checks.append(Check(f"{name}: runs", library, False, str(error)))
    except Exception as error:  # a crash is what this command exists to catch: report it as a failed check
        checks.append(Check(f"{name}: runs", library, False, f"{type(error).__name__}: {error}"))
    return checks


def run_checks(prepared: Path, library: Optional[str] = None, progress=print) -> list[Check]:
    """Every check on the files `prepare` wrote, for `library` or each installed TensorRT (each
    library's runtime checks in a process of their own: Polygraphy serves one TensorRT per process)."""
    gpu = gpu_info()
    libraries = [library] if library else [name for name in LIBRARIES if find_tensorrt(name) is not None]
    checks = [Check("GPU present", "-", True if gpu else None, f"{gpu['name']} (compute capability {gpu['compute_capability']}, {gpu['sm_count']} SMs, "
                    f"driver {gpu['driver']})" if gpu else "nvidia-smi sees no NVIDIA GPU: the runtime checks are skipped")]
    if not libraries:
        return checks + [Check("TensorRT installed", "-", False, "neither tensorrt nor tensorrt_rtx imports: pip install tensorrt (or tensorrt-rtx)")]
    if not (prepared / REFERENCE).is_file():
        raise DeployError(f"{prepared} holds no {REFERENCE}: make it with 'vitslim selftest --prepare {prepared}'")
    reference = dict(np.load(prepared / REFERENCE))
    for index, name in enumerate(libraries):
        if gpu is not None and index > 0:
            checks += _in_subprocess(name, prepared)
            continue
        trt = find_tensorrt(name)
        for precision in ("fp32", "fp16"):
            engine = prepared / f"tiny-{precision}-{name}.engine"
            progress(f"selftest: building {engine.name} with {name} {trt.version}")
            try:
                started = time.perf_counter()
                manifest = engine_from_onnx(prepared / f"tiny-{precision}.onnx", engine, BuildSettings(profiles=PROFILES, library=name)).manifest
                built = manifest["precision"] == precision and [(p["min"], p["max"]) for p in manifest["profiles"]] == [(1, 4), (8, 16)]
                checks.append(Check(f"{precision} engine: builds strongly typed, manifest right", f"{name} {trt.version}", built,
                                    f"{time.perf_counter() - started:.1f} s, {manifest['engine']['bytes'] / 1e6:.1f} MB, target {manifest['target']['kind']}"))
            except VitslimError as error:
                checks.append(Check(f"{precision} engine: builds", f"{name} {trt.version}", False, str(error)))
                continue
            if gpu is None:
                checks.append(Check(f"{precision} engine: runs", f"{name} {trt.version}", None, "not run: no GPU"))
            else:
                progress(f"selftest: running {engine.name}")
                checks += runtime_checks(engine, f"{name} {trt.version}", precision, reference)
    return checks


def _in_subprocess(library: str, prepared: Path) -> list[Check]:
    completed = subprocess.run([sys.executable, "-m", "vitslim", "selftest", "--library", library, "--prepared", str(prepared)],
                               capture_output=True, text=True, timeout=900)
    rows = [line.split("|") for line in completed.stdout.splitlines() if line.startswith("| ") and library in line]
    return [Check(row[1].strip(), library, row[3].strip() == "pass", row[4].strip()) for row in rows] or \
        [Check("runs", library, False, f"selftest --library {library} exited {completed.returncode}: {completed.stderr.strip()[-300:]}")]


def table(checks: list[Check]) -> str:
    lines = ["| check | library | result | detail |", "|---|---|---|---|"]
    lines += [f"| {c.check} | {c.library} | {'pass' if c.passed else 'FAIL' if c.passed is False else 'skipped'} | {c.detail} |" for c in checks]
    return "\n".join(lines)


def exit_code(checks: list[Check]) -> int:
    """1 if any check failed, else 2 if there is no GPU (nothing at run time was verified), else 0."""
    if any(c.passed is False for c in checks):
        return FAIL
    return NO_GPU if checks[0].passed is None else PASS


def run(work: Optional[Path] = None, library: Optional[str] = None, prepared: Optional[Path] = None) -> tuple[int, list[Check]]:
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

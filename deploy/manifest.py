"""The engine manifest (ENGINE.json beside ENGINE): the one writer and reader of the format.

A manifest binds an engine to what made it (library and version, ONNX digest, precision,
profiles, build options), to its own file name and digest, and to the GPUs it runs on (its
target). Readers refuse a manifest of another version, with a missing field, an unknown target
kind, or one that describes another engine file.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

from vitslim.core.files import read_json, sha256_of, write_json_atomic
from vitslim.core.limits import MAX_BATCH
from vitslim.core.precision import GRAPH_PRECISIONS, TOLERANCES

from .errors import DeployError
from .gpu import gpu_description
from .tensorrt_lib import LIBRARIES, require_tensorrt

# 2: strongly typed everywhere, build_options, tolerance, timing_cache; 3: network (typing, attention)
MANIFEST_VERSION = 3


class TargetKind(str, Enum):
    """Which GPUs an engine runs on (the manifest's target.kind; the values are the manifest's text)."""

    DEVICE_SPECIFIC = "device-specific"  # the build GPU's model
    AMPERE_PLUS = "any Ampere or later GPU"  # full TensorRT, hardware compatibility ampere+
    SAME_COMPUTE_CAPABILITY = "same compute capability"  # full TensorRT, same-compute-capability
    PORTABLE = "portable (ahead of time)"  # TensorRT-RTX: its compute-capability targets


TARGET_KINDS = tuple(kind.value for kind in TargetKind)


def manifest_path_of(engine_path: Path) -> Path:
    return engine_path.with_suffix(engine_path.suffix + ".json")


def write_manifest(engine_path: Path, manifest: dict) -> Path:
    """ENGINE.json for `engine_path`, written atomically."""
    return write_json_atomic(manifest_path_of(engine_path), manifest)


MANIFEST_FIELDS = (
    "manifest_version",
    "library",
    "version",
    "target",
    "precision",
    "tolerance",
    "preprocessing",
    "build_options",
    "timing_cache",
    "profiles",
    "input",
    "network",
    "onnx",
    "engine",
)


def read_manifest(engine_path: Path) -> dict:
    """The manifest beside `engine_path` (ENGINE.json), checked for its version and fields."""
    manifest_path = manifest_path_of(engine_path)
    if not engine_path.is_file():
        raise DeployError(f"engine {engine_path} does not exist: build it with 'vitslim build'")
    if not manifest_path.is_file():
        raise DeployError(f"engine {engine_path} has no manifest {manifest_path.name}: rebuild it with 'vitslim build'")
    manifest = read_json(manifest_path, "engine manifest", "rebuild the engine with 'vitslim build'", DeployError)
    missing = [name for name in MANIFEST_FIELDS if not isinstance(manifest, dict) or name not in manifest]
    if missing:
        raise DeployError(
            f"engine manifest {manifest_path} lacks {', '.join(missing)}: rebuild the engine with 'vitslim build'"
        )
    if manifest["library"] not in LIBRARIES:
        raise DeployError(
            f"engine manifest {manifest_path} names library {manifest['library']!r}, not one of {LIBRARIES}: rebuild the engine with 'vitslim build'"
        )
    if not isinstance(manifest["target"], dict) or manifest["target"].get("kind") not in TARGET_KINDS:
        raise DeployError(
            f"engine manifest {manifest_path} names an unknown target kind: rebuild the engine with 'vitslim build'"
        )
    engine_file = manifest["engine"].get("file") if isinstance(manifest["engine"], dict) else None
    if engine_file != engine_path.name:  # a manifest is bound to its engine's file name
        raise DeployError(
            f"engine manifest {manifest_path} describes {engine_file!r}, not {engine_path.name}: keep an engine and its manifest "
            "together under the names 'vitslim build' gave them, or rebuild"
        )
    if manifest["manifest_version"] != MANIFEST_VERSION:
        raise DeployError(
            f"engine manifest {manifest_path} has version {manifest['manifest_version']!r}, this vitslim reads {MANIFEST_VERSION}: rebuild the engine"
        )
    problem = _field_problem(manifest)
    if problem:
        raise DeployError(f"engine manifest {manifest_path}: {problem}: rebuild the engine with 'vitslim build'")
    return manifest


def _is_count(value, low: int = 1, high: int = MAX_BATCH) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_digest(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _field_problem(manifest: dict) -> Optional[str]:
    """What is wrong with the fields readers use (None: nothing): profiles, input, precision and
    tolerance, the ONNX it was built from (a plain file name beside the engine) and digests."""
    profiles = manifest["profiles"]
    if not (
        isinstance(profiles, list)
        and profiles
        and all(isinstance(p, dict) and all(_is_count(p.get(k)) for k in ("min", "opt", "max")) for p in profiles)
        and all(p["min"] <= p["opt"] <= p["max"] for p in profiles)
    ):
        return f"its profiles are not MIN <= OPT <= MAX batch sizes in 1..{MAX_BATCH}"
    shape = manifest["input"].get("shape") if isinstance(manifest["input"], dict) else None
    if not (isinstance(shape, list) and len(shape) >= 2 and all(_is_count(d, high=1 << 20) for d in shape[1:])):
        return "its input shape is not a list of positive integers after the batch"
    if not isinstance(manifest["build_options"], dict) or not isinstance(manifest["network"], dict):
        return "its build options or network description is not a mapping"
    if manifest["preprocessing"] is not None and not isinstance(manifest["preprocessing"], dict):
        return "its preprocessing is not a mapping"
    if manifest["precision"] not in GRAPH_PRECISIONS or not (
        isinstance(manifest["tolerance"], str) and manifest["tolerance"] in TOLERANCES
    ):
        return f"its precision or tolerance is not one of {GRAPH_PRECISIONS} / {tuple(TOLERANCES)}"
    onnx = manifest["onnx"]
    name = onnx.get("file") if isinstance(onnx, dict) else None
    if not (isinstance(name, str) and name and Path(name).name == name and name not in (".", "..")):
        return "the ONNX it names is not a plain file name beside the engine"
    if not _is_digest(onnx.get("sha256")) or not _is_digest(manifest["engine"].get("sha256")):
        return "its ONNX or engine digest is not a sha256"
    return None


def _capability(text: str) -> tuple[int, int]:
    major, _, minor = str(text).partition(".")
    return int(major), int(minor or 0)


def check_target(target: dict, here: Optional[dict]) -> None:
    """Refuse an engine built for another GPU than `here` (gpu_description()), by the manifest's
    target: device-specific and same-compute-capability engines need the build GPU's compute
    capability, Ampere+ engines compute capability 8.0 or later, RTX engines one of their targets."""
    kind, built = target.get("kind"), (target.get("gpu") or {}).get("compute_capability")
    if kind in (TargetKind.DEVICE_SPECIFIC, TargetKind.SAME_COMPUTE_CAPABILITY):
        if built is None:
            raise DeployError(
                "the engine's manifest does not say which GPU it was built for (built without a visible GPU?): rebuild it on the GPU that runs it"
            )
        if here is None or _capability(here["compute_capability"]) != _capability(built):
            raise DeployError(
                f"engine was built for {target['gpu']} but this machine has {here or 'no NVIDIA GPU'}: rebuild it here"
            )
    elif kind == TargetKind.AMPERE_PLUS:
        if here is None or _capability(here["compute_capability"]) < (8, 0):
            raise DeployError(
                f"engine was built for Ampere or later GPUs but this machine has {here or 'no NVIDIA GPU'}"
            )
    elif kind == TargetKind.PORTABLE and here is not None:
        targets = target.get("compute_capabilities") or []
        capability = _capability(here["compute_capability"])
        covered = any(capability == _sm(t) or (t.endswith(" and later") and capability >= _sm(t)) for t in targets)
        if not covered:
            sm = "SM{}{}".format(*capability)
            raise DeployError(
                f"engine was built for {targets} but this GPU ({here['name']}) is {sm}: rebuild for it "
                f"(--compute-capability {sm} where TensorRT-RTX supports it) or use full TensorRT"
            )


def _sm(target: str) -> tuple[int, int]:
    """'SM86' -> (8, 6), 'SM120 and later' -> (12, 0)."""
    digits = target.split()[0].removeprefix("SM")
    return int(digits[:-1]), int(digits[-1])


def check_engine(engine_path: Path) -> dict:
    """Refuse an engine whose manifest is missing, whose bytes changed, or that was built by another
    library/version or for another GPU than the one here. Returns the manifest."""
    manifest = read_manifest(engine_path)
    if sha256_of(engine_path) != manifest["engine"]["sha256"]:
        raise DeployError(
            f"engine {engine_path} changed since it was built (sha256 differs from its manifest): rebuild it"
        )
    trt = require_tensorrt(manifest["library"])
    if trt.version != manifest["version"]:
        raise DeployError(
            f"engine was built with {manifest['library']} {manifest['version']} but {trt.version} is installed: rebuild it"
        )
    check_target(manifest["target"], gpu_description())
    return manifest


def profile_for(profiles: list[dict], batch: int, engine_name: str = "the engine") -> int:
    """The index of the first optimisation profile whose [min, max] holds `batch`."""
    for index, profile in enumerate(profiles):
        if profile["min"] <= batch <= profile["max"]:
            return index
    ranges = ", ".join(f"{p['min']}..{p['max']}" for p in profiles)
    raise DeployError(
        f"batch {batch} is outside every optimisation profile of {engine_name} ({ranges}): "
        f"use a batch in range or rebuild with --batch MIN:OPT:MAX"
    )


def check_batches(manifest: dict, batches, engine_name: str) -> None:
    """Refuse, before any work, a batch size that no optimisation profile of the engine holds."""
    for batch in batches:
        profile_for(manifest["profiles"], batch, engine_name)

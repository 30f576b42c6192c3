"""Engines from ONNX: a loader that builds, a manifest that describes, atomic writes.

Works with full TensorRT (10: builder precision flags; 11: strongly typed) and TensorRT-RTX
(strongly typed; builds ahead of time on a machine without a GPU).
"""
from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from .errors import DeployError
from vitslim.files import sha256_of, write_bytes_atomic, write_json_atomic
from vitslim.precision import PRECISIONS, graph_precision
from .tensorrt_lib import TensorRT, require_tensorrt

MANIFEST_VERSION = 1
# TensorRT-RTX with no compute capability set builds a portable engine (its documentation).
RTX_DEFAULT_TARGETS = ["SM80", "SM86", "SM89", "SM120 and later"]


@dataclass(frozen=True)
class BatchProfile:
    """One optimisation profile over the batch dimension."""

    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str) -> "BatchProfile":
        """'1:8:32' -> BatchProfile(1, 8, 32); a single number N means N:N:N."""
        try:
            values = [int(v) for v in text.split(":")]
        except ValueError:
            raise DeployError(f"batch profile {text!r} is not MIN:OPT:MAX (e.g. 1:8:32)") from None
        if len(values) == 1:
            values *= 3
        if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
            raise DeployError(f"batch profile {text!r} must be MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX")
        return cls(*values)

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


DEFAULT_PROFILE = BatchProfile(1, 8, 32)


@dataclass(frozen=True)
class BuildSettings:
    precision: str = "fp32"
    profiles: tuple[BatchProfile, ...] = (DEFAULT_PROFILE,)
    workspace_mb: Optional[int] = None
    timing_cache: Optional[Path] = None
    library: Optional[str] = None  # "tensorrt" or "tensorrt_rtx"; None picks the installed one

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise DeployError(f"precision {self.precision!r} is not one of {PRECISIONS}")
        if not self.profiles:
            raise DeployError("give at least one --batch MIN:OPT:MAX profile")


def read_onnx(onnx_path: Path):
    """The ONNX ModelProto of `onnx_path`, or a one-line error for a missing or unreadable file."""
    import onnx

    if not Path(onnx_path).is_file():
        raise DeployError(f"ONNX file {onnx_path} does not exist: export one with 'vitslim export'")
    try:
        return onnx.load(str(onnx_path), load_external_data=False)
    except Exception as error:  # protobuf raises several decode error types
        raise DeployError(f"{onnx_path} is not a valid ONNX file ({type(error).__name__}): re-export it with 'vitslim export'") from None


def onnx_precision(onnx_path: Path) -> str:
    """fp16 if the graph holds float16 weights (an fp16 export), else fp32."""
    return graph_precision(read_onnx(onnx_path))


def _network(trt: TensorRT, builder, onnx_path: Path):
    # No creation flags: explicit batch is the only mode since TensorRT 10; TensorRT 10 networks are
    # then weakly typed (builder precision flags apply), TensorRT 11 and RTX strongly typed.
    network = builder.create_network(0)
    parser = trt.module.OnnxParser(network, trt.logger())
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise DeployError(f"{trt.name} cannot parse {onnx_path}: {errors}")
    return network, parser


def _config(trt: TensorRT, builder, network, settings: BuildSettings):
    config = builder.create_builder_config()
    if settings.workspace_mb:
        config.set_memory_pool_limit(trt.module.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    if settings.precision == "fp16" and not trt.strongly_typed:
        config.set_flag(trt.module.BuilderFlag.FP16)
    if settings.precision == "fp32" and hasattr(trt.module.BuilderFlag, "TF32"):
        # TensorRT enables TF32 by default; an fp32 engine is held to IEEE fp32 parity (1e-4)
        config.clear_flag(trt.module.BuilderFlag.TF32)
    source = network.get_input(0)
    features = tuple(source.shape)[1:]
    for batch in settings.profiles:
        profile = builder.create_optimization_profile()
        profile.set_shape(source.name, (batch.min, *features), (batch.opt, *features), (batch.max, *features))
        config.add_optimization_profile(profile)
    cache = None
    if settings.timing_cache is not None and hasattr(config, "create_timing_cache"):
        existing = settings.timing_cache.read_bytes() if settings.timing_cache.is_file() else b""
        cache = config.create_timing_cache(existing)
        config.set_timing_cache(cache, ignore_mismatch=False)
    return config, cache


def gpu_description() -> Optional[dict]:
    """Name and compute capability of CUDA device 0, via torch if it is installed with CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}


def engine_target(trt: TensorRT) -> dict:
    """What the engine runs on: the build GPU for full TensorRT, the portable list for RTX AOT."""
    if trt.name == "tensorrt_rtx":
        return {"kind": "portable (ahead of time)", "compute_capabilities": RTX_DEFAULT_TARGETS, "build_gpu": gpu_description()}
    gpu = gpu_description()
    return {"kind": "device-specific", "gpu": gpu}


@dataclass(frozen=True)
class BuildResult:
    engine_path: Path
    manifest_path: Path
    manifest: dict = field(default_factory=dict)


def manifest_path_of(engine_path: Path) -> Path:
    return engine_path.with_suffix(engine_path.suffix + ".json")


def engine_from_onnx(onnx_path: str | Path, out_path: str | Path, settings: BuildSettings = BuildSettings()) -> BuildResult:
    """Build `onnx_path` into an engine at `out_path` with a manifest beside it (ENGINE.json).

    A failed build leaves neither file; a strongly typed library refuses fp16 unless the ONNX is
    an fp16 export.
    """
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise DeployError(f"ONNX file {onnx_path} does not exist: export one with 'vitslim export'")
    trt = require_tensorrt(settings.library)
    graph_precision = onnx_precision(onnx_path)
    if trt.strongly_typed and settings.precision != graph_precision:
        raise DeployError(
            f"{trt.name} {trt.version} is strongly typed: the ONNX is {graph_precision}, so it builds a {graph_precision} engine; "
            f"export with --precision {settings.precision} instead of asking the builder"
        )
    started = time.perf_counter()
    builder = trt.module.Builder(trt.logger())
    network, _parser = _network(trt, builder, onnx_path)
    config, cache = _config(trt, builder, network, settings)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DeployError(f"{trt.name} failed to build {onnx_path} (see its log above); no engine written")
    engine_bytes = bytes(serialized)
    build_seconds = time.perf_counter() - started
    write_bytes_atomic(out_path, engine_bytes)
    if cache is not None:
        write_bytes_atomic(settings.timing_cache, bytes(cache.serialize()))
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "library": trt.name, "version": trt.version,
        "target": engine_target(trt),
        "precision": settings.precision,
        "profiles": [asdict(p) for p in settings.profiles],
        "input": {"name": network.get_input(0).name, "shape": list(network.get_input(0).shape)},
        "onnx": {"file": onnx_path.name, "sha256": sha256_of(onnx_path)},
        "engine": {"file": out_path.name, "sha256": sha256_of(out_path), "bytes": len(engine_bytes)},
        "build_seconds": build_seconds,
        "host": {"machine": platform.machine(), "system": platform.system(), "processor": platform.processor() or platform.machine()},
    }
    manifest_path = write_json_atomic(manifest_path_of(out_path), manifest)
    return BuildResult(engine_path=out_path, manifest_path=manifest_path, manifest=manifest)

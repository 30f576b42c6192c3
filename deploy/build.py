"""Engines from ONNX: a loader that builds, a manifest that describes, atomic writes.

One precision rule for full TensorRT 10 and 11 and TensorRT-RTX: every network is built strongly
typed, so the ONNX decides (an fp16 export builds an fp16 engine, with any fp32 op exactly where
the ONNX has it); a `precision` that differs from the ONNX's is refused. TF32
is off for fp32 unless asked for, and then recorded. Every build option lands in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from vitslim.core.files import sha256_of, write_bytes_atomic, write_json_atomic
from vitslim.core.limits import MAX_BATCH, MAX_WORKSPACE_MB
from vitslim.core.metadata import attention_form_of, preprocessing_of
from vitslim.core.precision import GRAPH_PRECISIONS, graph_precision
from vitslim.core.settings import check_value, setting

from .errors import DeployError
from .gpu import gpu_description
from .manifest import MANIFEST_VERSION, TargetKind, manifest_path_of, write_manifest
from .tensorrt_lib import LIBRARIES, TensorRT, require_tensorrt

log = logging.getLogger(__name__)

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")  # what vitslim takes for a serialized engine
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
        if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2] <= MAX_BATCH:
            raise DeployError(f"batch profile {text!r} must be MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX <= {MAX_BATCH}")
        return cls(*values)

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


DEFAULT_PROFILE = BatchProfile(1, 8, 32)


HARDWARE_COMPATIBILITY = {
    "none": "NONE",
    "ampere+": "AMPERE_PLUS",
    "same-compute-capability": "SAME_COMPUTE_CAPABILITY",
}


# What a manifest records as build_options, and what kits and recipes may set besides profiles.
BUILD_OPTIONS = (
    "tf32",
    "optimization_level",
    "hardware_compatibility",
    "version_compatible",
    "compute_capabilities",
    "dla_core",
    "gpu_fallback",
    "workspace_mb",
)


@dataclass(frozen=True)
class BuildSettings:
    """How an engine is built, declared once: the flags of `vitslim build` and `vitslim kit`, a
    recipe's deploy keys and the manifest's build_options are generated from these fields."""

    precision: Optional[str] = setting(
        None,
        "must match the ONNX's (every build is strongly typed: the ONNX decides); default: the ONNX's",
        choices=GRAPH_PRECISIONS,
    )
    profiles: tuple[BatchProfile, ...] = setting(
        (DEFAULT_PROFILE,),
        "a batch optimisation profile (repeat for several)",
        flag="--batch",
        metavar="MIN:OPT:MAX",
        item=BatchProfile.parse,
    )
    workspace_mb: Optional[int] = setting(None, "workspace memory limit (MB)", flag="--workspace", metavar="MB")
    timing_cache: Optional[Path] = setting(
        None,
        "timing cache file, used if it was made with this library, version and GPU (key in FILE.json), then written back",
        metavar="FILE",
        item=Path,
    )
    library: Optional[str] = setting(
        None, "tensorrt or tensorrt_rtx; default: tensorrt if installed, else tensorrt_rtx", choices=LIBRARIES
    )
    tf32: bool = setting(
        False, "let fp32 matrix products use TF32 (recorded; compare then holds the engine to the tf32 tolerance)"
    )
    optimization_level: Optional[int] = setting(
        None, "builder optimisation level (TensorRT's default 3)", metavar="0-5"
    )
    hardware_compatibility: str = setting(
        "none",
        "full TensorRT: an engine for any Ampere+ GPU or any GPU of the build GPU's compute capability",
        choices=tuple(HARDWARE_COMPATIBILITY),
    )
    version_compatible: bool = setting(
        False, "full TensorRT: an engine later TensorRT versions can run (carries its lean runtime)"
    )
    compute_capabilities: tuple[str, ...] = setting(
        (),
        "TensorRT-RTX: a target GPU architecture, e.g. SM86 (repeat); default its portable set",
        flag="--compute-capability",
        metavar="SMxy",
        item=str,
    )
    dla_core: Optional[int] = setting(None, "Jetson Orin: build for this DLA core", metavar="N")
    gpu_fallback: bool = setting(
        True, "with --dla-core: layers DLA cannot run go to the GPU (--no-gpu-fallback: fail instead)"
    )

    def __post_init__(self) -> None:
        for name in ("profiles", "compute_capabilities"):  # a kit's or recipe's JSON/YAML list
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.timing_cache is not None:
            object.__setattr__(self, "timing_cache", Path(self.timing_cache))
        if self.library is not None and self.library not in LIBRARIES:
            raise DeployError(f"library {self.library!r} is not one of {LIBRARIES}")
        if self.precision is not None and self.precision not in GRAPH_PRECISIONS:
            raise DeployError(f"precision {self.precision!r} is not one of {GRAPH_PRECISIONS}")
        if not self.profiles:
            raise DeployError("give at least one --batch MIN:OPT:MAX profile")
        if self.optimization_level is not None and not 0 <= self.optimization_level <= 5:
            raise DeployError(f"--optimization-level {self.optimization_level} must be in 0..5")
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise DeployError(
                f"--hardware-compatibility {self.hardware_compatibility!r} is not one of {tuple(HARDWARE_COMPATIBILITY)}"
            )
        if self.dla_core is not None and self.dla_core < 0:
            raise DeployError(f"--dla-core {self.dla_core} must be >= 0")
        if self.workspace_mb is not None and not 1 <= self.workspace_mb <= MAX_WORKSPACE_MB:
            raise DeployError(f"--workspace {self.workspace_mb} must be >= 1 and at most {MAX_WORKSPACE_MB} (MB)")

    def options(self) -> dict:
        """What the manifest records of these settings (the build options)."""
        options = {name: getattr(self, name) for name in BUILD_OPTIONS}
        options["compute_capabilities"] = list(self.compute_capabilities)
        if self.dla_core is None:
            options["gpu_fallback"] = None  # meaningless without a DLA core
        return options


def build_settings_from_text(values: dict, where: str) -> BuildSettings:
    """BuildSettings from values read as text or YAML (a recipe's deploy keys, a CLI's strings):
    each field's `item` spelling parses it; a tuple field takes a list or a comma-separated string.
    Unknown keys and values of the wrong type are refused by name."""
    known = {f.name: f for f in fields(BuildSettings)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise DeployError(f"{where}: unknown build setting(s) {unknown}; known: {sorted(known)}")
    parsed = {}
    for name, value in values.items():
        field, kind = known[name], str(known[name].type)
        item = field.metadata.get("item")
        if kind.startswith("tuple["):
            parts = value.split(",") if isinstance(value, str) else value
            if not isinstance(parts, (list, tuple)) or not all(isinstance(p, str) for p in parts):
                hint = " (quote it: YAML reads 1:8:32 as a base-60 number)" if isinstance(value, int) else ""
                raise DeployError(f"{where}.{name}: {value!r} is not a list or a comma-separated string{hint}")
            parsed[name] = tuple(item(p.strip()) for p in parts if p.strip())
            continue
        parses = item is not None and value is not None  # a Path: text in, the field's value out
        if parses:
            expected = None if isinstance(value, str) else "a string"
        else:
            expected = check_value(field, value)
        if expected:
            raise DeployError(f"{where}.{name}: {value!r} is not {expected}")
        parsed[name] = item(value) if parses else value
    return BuildSettings(**parsed)


def read_onnx(onnx_path: Path):
    """The ONNX ModelProto of `onnx_path`, or a one-line error for a missing or unreadable file."""
    import onnx

    if not Path(onnx_path).is_file():
        raise DeployError(f"ONNX file {onnx_path} does not exist: export one with 'vitslim export'")
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as error:  # protobuf raises several decode error types
        raise DeployError(
            f"{onnx_path} is not a valid ONNX file ({type(error).__name__}): re-export it with 'vitslim export'"
        ) from None
    check_external_data(model, Path(onnx_path))
    return model


def check_external_data(model, onnx_path: Path) -> None:
    """Weights stored beside an ONNX must be regular files in its folder: a location that leaves
    the folder, or a symlink, would let an ONNX from elsewhere read any file into an engine
    (onnx and onnxruntime refuse them too; TensorRT's parser does not)."""
    folder = onnx_path.resolve().parent
    for tensor in _all_tensors(model.graph):
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), None)
        if location is None:
            continue
        path = onnx_path.parent / location
        if (
            Path(location).is_absolute()
            or folder not in path.resolve().parents
            or path.is_symlink()
            or not path.is_file()
        ):
            raise DeployError(
                f"{onnx_path}: the external weights of {tensor.name} ({location!r}) are not a regular file in its folder "
                "(absolute paths, '..' and links are refused): re-export it with 'vitslim export'"
            )


def _all_tensors(graph):
    """Every TensorProto of `graph`: initializers, sparse initializers, and the tensors of node
    attributes (Constant values), subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _all_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_tensors(subgraph)


def onnx_precision(onnx_path: Path) -> str:
    """fp16 if the graph holds float16 weights (an fp16 export), else fp32."""
    return graph_precision(read_onnx(onnx_path))


def _network(trt: TensorRT, builder, onnx_path: Path):
    # Strongly typed on every library: tensor types come from the ONNX, so TensorRT 10 cannot move
    # any op an ONNX keeps in fp32 (weak typing is deprecated from 10.12).
    network = builder.create_network(1 << int(trt.module.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.module.OnnxParser(network, trt.logger())
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        hint = PARSE_HINTS.get(attention_form_of(read_onnx(onnx_path)), "")
        raise DeployError(f"{trt.name} cannot parse {onnx_path}{hint}: {errors}")
    return network, parser


# Why a vitslim ONNX may not parse, by its attention form (export.attention_form), and the fix.
PARSE_HINTS = {
    "attention-op": " (its attention is the ONNX Attention op, which TensorRT parses "
    "from 10.14 on: for an older TensorRT export with --attention matmul-softmax)",
    "ort-mha": " (its attention is onnxruntime's com.microsoft.MultiHeadAttention, which TensorRT cannot parse: export with --attention attention-op)",
}


def decomposable_attention(trt: TensorRT, network) -> int:
    """Let every attention layer fall back to several kernels where TensorRT has no fused kernel
    for its shapes and types (the ONNX parser leaves it fused-only, and TensorRT-RTX 1.7 then fails
    the build of rectangular attention, or of fp32 attention); a fused kernel is still used where
    one fits. Returns the number of attention layers."""
    if not trt.has_attention_layer:
        return 0
    count = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type == trt.module.LayerType.ATTENTION_INPUT:
            layer.__class__ = trt.module.IAttentionInputLayer  # the Python API's downcast
            layer.attention.decomposable = True
            count += 1
    return count


def _require(trt: TensorRT, owner, attribute: str, option: str):
    """`owner.attribute`, or a one-line error saying this library lacks the option."""
    if not hasattr(owner, attribute):
        raise DeployError(
            f"{option} is not available in {trt.name} {trt.version}: leave it out or use another TensorRT"
        )
    return getattr(owner, attribute)


def _config(trt: TensorRT, builder, network, settings: BuildSettings):
    module, config = trt.module, builder.create_builder_config()
    if hasattr(module, "ProfilingVerbosity"):  # layer types and tactics for 'vitslim inspect' (names only by default)
        config.profiling_verbosity = module.ProfilingVerbosity.DETAILED
    if settings.workspace_mb:
        config.set_memory_pool_limit(module.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    if hasattr(module.BuilderFlag, "TF32"):
        # TensorRT enables TF32 by default; an fp32 engine is held to IEEE fp32 parity (1e-4) unless asked
        (config.set_flag if settings.tf32 else config.clear_flag)(module.BuilderFlag.TF32)
    if settings.optimization_level is not None:
        _require(trt, config, "builder_optimization_level", "--optimization-level")
        config.builder_optimization_level = settings.optimization_level
    if settings.hardware_compatibility != "none":
        levels = _require(trt, module, "HardwareCompatibilityLevel", "--hardware-compatibility")
        config.hardware_compatibility_level = getattr(levels, HARDWARE_COMPATIBILITY[settings.hardware_compatibility])
    if settings.version_compatible:
        if (
            trt.name == "tensorrt_rtx"
        ):  # its builder asks for libnvinfer_lean, which TensorRT-RTX does not ship (seen with 1.7)
            raise DeployError(
                "--version-compatible is for full TensorRT (TensorRT-RTX has no lean runtime): leave it out"
            )
        config.set_flag(_require(trt, module.BuilderFlag, "VERSION_COMPATIBLE", "--version-compatible"))
    if settings.compute_capabilities:
        if trt.name != "tensorrt_rtx":
            raise DeployError(
                "--compute-capability targets TensorRT-RTX builds; full TensorRT builds for the GPU it runs on"
            )
        known = module.ComputeCapability.__members__
        unknown = [c for c in settings.compute_capabilities if c not in known]
        if unknown:
            raise DeployError(
                f"--compute-capability {unknown[0]} is not one of {[c for c in known if c.startswith('SM')]}"
            )
        config.num_compute_capabilities = len(settings.compute_capabilities)
        for index, capability in enumerate(settings.compute_capabilities):
            config.set_compute_capability(known[capability], index)
    if settings.dla_core is not None:
        config.default_device_type = module.DeviceType.DLA
        config.DLA_core = settings.dla_core
        if settings.gpu_fallback:
            config.set_flag(module.BuilderFlag.GPU_FALLBACK)
    source = network.get_input(0)
    features = tuple(source.shape)[1:]
    for batch in settings.profiles:
        profile = builder.create_optimization_profile()
        profile.set_shape(source.name, (batch.min, *features), (batch.opt, *features), (batch.max, *features))
        config.add_optimization_profile(profile)
    return config


def timing_cache_key(trt: TensorRT) -> dict:
    """What a timing cache was measured on: library, version and GPU (timings do not transfer)."""
    return {"library": trt.name, "version": trt.version, "gpu": gpu_description()}


def _timing_cache(trt: TensorRT, config, path: Optional[Path]) -> tuple[object, dict]:
    """Attach the timing cache at `path` when it was made here (same library, version, GPU; its
    key is in PATH.json) and report what happened; a cache from elsewhere is not used, and the
    new one replaces it."""
    if path is None:
        return None, {"file": None}
    if not hasattr(config, "create_timing_cache"):
        return None, {"file": str(path), "used": False, "reason": f"{trt.name} has no timing cache"}
    key, key_path = timing_cache_key(trt), Path(str(path) + ".json")
    existing, reason = b"", "no cache yet"
    if path.is_file():
        try:
            stored = json.loads(key_path.read_text())
        except (OSError, ValueError):
            stored = None
        if stored == key:
            existing, reason = path.read_bytes(), None
        else:
            reason = f"made for {stored or 'an unknown GPU/library (no key file)'}, not {key}: starting a new cache"
    cache = config.create_timing_cache(existing)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        reason = f"{trt.name} rejected {path}: starting a new cache"
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache, {"file": str(path), "used": reason is None, "reason": reason, "key": key}


def engine_target(trt: TensorRT, settings: BuildSettings) -> dict:
    """What the engine runs on: for RTX the compute capabilities it was built for; for full
    TensorRT the build GPU, or any Ampere+ GPU / the same compute capability with a hardware
    compatibility level; a DLA core on Jetson."""
    if trt.name == "tensorrt_rtx":
        targets = list(settings.compute_capabilities) or RTX_DEFAULT_TARGETS
        return {"kind": TargetKind.PORTABLE.value, "compute_capabilities": targets, "build_gpu": gpu_description()}
    kind = {
        "none": TargetKind.DEVICE_SPECIFIC,
        "ampere+": TargetKind.AMPERE_PLUS,
        "same-compute-capability": TargetKind.SAME_COMPUTE_CAPABILITY,
    }[settings.hardware_compatibility]
    return {"kind": kind.value, "gpu": gpu_description(), "dla_core": settings.dla_core}


@dataclass(frozen=True)
class BuildResult:
    engine_path: Path
    manifest_path: Path
    manifest: dict = field(default_factory=dict)


def engine_from_onnx(
    onnx_path: str | Path, out_path: str | Path, settings: BuildSettings = BuildSettings()
) -> BuildResult:
    """Build `onnx_path` into an engine at `out_path` with a manifest beside it (ENGINE.json).

    A failed build leaves neither file; a strongly typed library refuses fp16 unless the ONNX is
    an fp16 export.
    """
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    trt = require_tensorrt(settings.library)
    source = read_onnx(onnx_path)
    precision = graph_precision(source)
    if settings.precision not in (None, precision):
        raise DeployError(
            f"the ONNX is {precision} and every build is strongly typed (the ONNX decides): export with --precision {settings.precision} "
            f"or leave --precision out"
        )
    if settings.tf32 and precision != "fp32":
        raise DeployError(f"--tf32 applies to fp32 graphs; this ONNX is {precision}")
    started = time.perf_counter()
    builder = trt.module.Builder(trt.logger())
    network, _parser = _network(trt, builder, onnx_path)
    attention_layers = decomposable_attention(trt, network)
    config = _config(trt, builder, network, settings)
    cache, cache_report = _timing_cache(trt, config, settings.timing_cache)
    if cache_report.get("reason") and cache_report["file"]:
        log.warning(f"timing cache {cache_report['file']}: {cache_report['reason']}")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DeployError(f"{trt.name} failed to build {onnx_path} (see its log above); no engine written")
    engine_bytes = bytes(serialized)
    build_seconds = time.perf_counter() - started
    write_bytes_atomic(out_path, engine_bytes)
    if cache is not None:
        write_bytes_atomic(settings.timing_cache, bytes(cache.serialize()))
        write_json_atomic(Path(str(settings.timing_cache) + ".json"), cache_report["key"])
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "library": trt.name,
        "version": trt.version,
        "target": engine_target(trt, settings),
        "precision": precision,
        "tolerance": "tf32" if settings.tf32 else precision,  # the TOLERANCES entry compare holds it to
        "preprocessing": preprocessing_of(source),
        "build_options": settings.options(),
        "network": {
            "typing": "strongly typed",
            "attention_form": attention_form_of(source),
            "attention_layers": attention_layers,
        },
        "timing_cache": cache_report,
        "profiles": [asdict(p) for p in settings.profiles],
        "input": {"name": network.get_input(0).name, "shape": list(network.get_input(0).shape)},
        "onnx": {"file": onnx_path.name, "sha256": sha256_of(onnx_path)},
        "engine": {"file": out_path.name, "sha256": sha256_of(out_path), "bytes": len(engine_bytes)},
        "build_seconds": build_seconds,
        "host": {
            "machine": platform.machine(),
            "system": platform.system(),
            "processor": platform.processor() or platform.machine(),
        },
    }
    manifest_path = write_manifest(out_path, manifest)
    return BuildResult(engine_path=out_path, manifest_path=manifest_path, manifest=manifest)


def engine_cache_key(onnx_sha256: str, trt: TensorRT, settings: BuildSettings) -> str:
    """What decides an engine's bytes: the ONNX bytes (their sha256), library and version, GPU,
    precision, profiles and build options (a short sha256 of them)."""
    key = {
        "onnx": onnx_sha256,
        "library": trt.name,
        "version": trt.version,
        "gpu": gpu_description(),
        "precision": settings.precision,
        "profiles": [asdict(p) for p in settings.profiles],
        "options": settings.options(),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _copy_engine(source: Path, target: Path) -> dict:
    """Copy an engine and its manifest (atomically each); the manifest names the new file."""
    manifest = json.loads(manifest_path_of(source).read_text())
    manifest["engine"]["file"] = target.name
    write_bytes_atomic(target, source.read_bytes())
    write_json_atomic(manifest_path_of(target), manifest)
    return manifest


def _cache_entry_matches(manifest, cached: Path, onnx_sha256: str, trt: TensorRT, settings: BuildSettings) -> bool:
    """A cache entry is used only when its manifest says it is this request's engine: these bytes
    under this name, from this ONNX, library and version, with these profiles and options (an
    entry copied over another's, or edited, is rebuilt instead of trusted by its own word)."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("engine"), dict):
        return False
    wanted = {
        "engine": (cached.name, sha256_of(cached)),
        "onnx": onnx_sha256,
        "library": (trt.name, trt.version),
        "profiles": [asdict(p) for p in settings.profiles],
        "build_options": settings.options(),
    }
    found = {
        "engine": (manifest["engine"].get("file"), manifest["engine"].get("sha256")),
        "onnx": (manifest.get("onnx") or {}).get("sha256"),
        "library": (manifest.get("library"), manifest.get("version")),
        "profiles": manifest.get("profiles"),
        "build_options": manifest.get("build_options"),
    }
    return found == wanted and settings.precision in (None, manifest.get("precision"))


def cached_engine(
    onnx_path: str | Path, out_path: str | Path, settings: BuildSettings, cache: str | Path
) -> tuple[BuildResult, bool]:
    """The engine for `onnx_path` at `out_path`, copied from `cache` when an engine with the same
    engine_cache_key was built before (its bytes checked against its manifest), else built and
    stored there. Returns (result, whether it came from the cache)."""
    onnx_path, out_path, cache = Path(onnx_path), Path(out_path), Path(cache)
    read_onnx(onnx_path)  # a one-line error for a missing or unreadable file before anything else
    trt = require_tensorrt(settings.library)
    onnx_sha256 = sha256_of(onnx_path)
    cached = cache / f"{onnx_path.stem}-{engine_cache_key(onnx_sha256, trt, settings)}.engine"
    if cached.is_file() and manifest_path_of(cached).is_file():
        try:
            manifest = json.loads(manifest_path_of(cached).read_text())
        except (OSError, ValueError):
            manifest = {}  # a damaged cache entry is rebuilt (and replaced)
        if _cache_entry_matches(manifest, cached, onnx_sha256, trt, settings):
            manifest = _copy_engine(cached, out_path)
            return BuildResult(engine_path=out_path, manifest_path=manifest_path_of(out_path), manifest=manifest), True
    result = engine_from_onnx(onnx_path, out_path, settings)
    _copy_engine(out_path, cached)
    return result, False

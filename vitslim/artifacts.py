"""What vitslim measures, compares and inspects: an exported ONNX file, a built engine or a run
directory. One class per kind knows the kind's runner, input shape, precision, digest, MAC
fraction and description, so that `bench`, `compare`, `gate` and `inspect` never branch on the
backend. `open_artifact` tells the kinds apart by what the path is.

torch, timm and pruning/export are imported only by the run directory's methods, so that
benchmarking and gating engines or ONNX files works where only numpy, onnx and TensorRT are
installed (the Docker runtime image, Jetson).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import ClassVar, Optional

from vitslim.core.files import sha256_of
from vitslim.deploy.build import ENGINE_SUFFIXES
from vitslim.deploy.errors import DeployError
from vitslim.deploy.manifest import check_batches, check_engine
from vitslim.deploy.runners import Runner

# Layer names/types TensorRT gives fused attention (fMHA / flash kernels; Myelin names the fused
# region after the ops it swallowed). A heuristic: TensorRT documents no flag for it.
ATTENTION_MARKERS = ("mha", "attention", "flash")


@dataclass(frozen=True)
class RunnerOptions:
    """How to run an artifact; each kind reads the options that apply to it."""

    device: str = "cpu"
    threads: Optional[int] = None  # onnxruntime's intra-op threads (PyTorch's are process-wide: the caller sets them)
    # GPU runners (TensorRT, onnxruntime on CUDA) replay a captured CUDA graph (trtexec --useCudaGraph)
    cuda_graph: bool = True
    runtime_cache: Optional[str] = None  # TensorRT-RTX: directory of its runtime caches
    torch_mode: str = "eager"  # run directories only
    torch_dtype: str = "fp32"  # run directories only


class Artifact:
    """Base of the three kinds; `path` exists and is of the kind (see open_artifact)."""

    backend: ClassVar[str]  # the runner that runs it
    what: ClassVar[str]  # what it is, in messages

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def label(self) -> str:
        return f"{self.backend}:{self.path.name}"

    def check_batches(self, batches) -> None:
        """Refuse, before any work, batch sizes the artifact cannot run (an engine's profiles)."""

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The per-image input shape (C, H, W)."""
        raise NotImplementedError

    def precision(self, options: RunnerOptions) -> str:
        raise NotImplementedError

    @property
    def digest(self) -> Optional[str]:
        """The sha256 of what runs (None for a run directory: many files)."""
        return None

    def macs_fraction(self) -> Optional[float]:
        """Its MACs over the dense model's (None when nothing beside it says)."""
        raise NotImplementedError

    def runner(self, options: RunnerOptions = RunnerOptions()) -> Runner:
        raise NotImplementedError

    def describe(self, layers: bool = True) -> dict:
        """What `vitslim inspect` prints."""
        raise NotImplementedError

    def export_report(self) -> Optional[dict]:
        """The export report that describes it (None: none does)."""
        return None

    def made_from(self, plan, model) -> str:
        """Whether it was made from (`plan`, `model`), by the digests its export report records:
        one line saying so, or saying that nothing tells; a one-line DeployError when it was
        made from another run (comparing them would measure nothing)."""
        from vitslim.pruning.checkpoints import weights_digest
        from vitslim.pruning.plan import plan_digest

        recorded = (self.export_report() or {}).get("made_from")
        if not isinstance(recorded, dict):
            return f"{self.path.name}: no export report records what it was made from (not checked)"
        differs = [
            what
            for what, key, digest in (
                ("weights", "weights_digest", lambda: weights_digest(model)),
                ("plan", "plan_digest", lambda: plan_digest(plan)),
            )
            if recorded.get(key) != digest()
        ]
        if differs:
            raise DeployError(
                f"{self.path} was exported from another run (its export report's {' and '.join(differs)} digest "
                "differs from this run's): compare it with the run it was exported from, or export this run"
            )
        return f"{self.path.name}: exported from this run (weights and plan digests match its export report)"


class OnnxArtifact(Artifact):
    backend = "onnxruntime"
    what = "an ONNX file (.onnx)"

    @cached_property
    def model(self):
        from vitslim.deploy.build import read_onnx

        return read_onnx(self.path)

    @property
    def input_shape(self) -> tuple[int, ...]:
        from vitslim.core.metadata import image_shape_of

        return image_shape_of(self.model)

    def precision(self, options: RunnerOptions = RunnerOptions()) -> str:
        from vitslim.core.precision import graph_precision

        return graph_precision(self.model)

    @cached_property
    def digest(self) -> str:
        return sha256_of(self.path)

    @property
    def preprocessing(self) -> Optional[dict]:
        from vitslim.core.metadata import preprocessing_of

        return preprocessing_of(self.model)

    def export_report(self) -> Optional[dict]:
        from vitslim.export.report import read_report

        return read_report(self.path, self.digest)

    def macs_fraction(self) -> Optional[float]:
        from vitslim.export.report import macs_fraction_of

        return macs_fraction_of(self.export_report())

    def runner(self, options: RunnerOptions = RunnerOptions()) -> Runner:
        from vitslim.deploy.runners import OnnxRuntimeRunner

        return OnnxRuntimeRunner(
            self.path,
            device=options.device,
            threads=options.threads,
            cuda_graph=options.cuda_graph and options.device.startswith("cuda"),
        )

    def describe(self, layers: bool = True) -> dict:
        import onnx

        from vitslim.core.metadata import attention_form_of, tensor_dims

        model = self.model
        io = {
            kind: [
                {
                    "name": v.name,
                    "shape": tensor_dims(v),
                    "dtype": onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type),
                }
                for v in values
            ]
            for kind, values in (("inputs", model.graph.input), ("outputs", model.graph.output))
        }
        description = {
            "kind": "onnx",
            "file": str(self.path),
            "bytes": self.path.stat().st_size,
            "sha256": self.digest,
            "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
            "producer": model.producer_name,
            "precision": self.precision(),
            "attention_form": attention_form_of(model),
            **io,
            "preprocessing": self.preprocessing,
            "ops": dict(sorted(Counter(node.op_type for node in model.graph.node).items())),
        }
        report = self.export_report()
        if report is not None:
            description["export_report"] = {
                k: report.get(k)
                for k in ("method", "macs", "macs_dense", "params", "params_dense", "token_layout", "passes", "parity")
            }
        return description


class EngineArtifact(Artifact):
    backend = "tensorrt"
    what = "a TensorRT engine (.engine)"

    @cached_property
    def manifest(self) -> dict:
        """The checked manifest: checked once per artifact, since checking hashes the whole engine."""
        return check_engine(self.path)

    def check_batches(self, batches) -> None:
        check_batches(self.manifest, batches, self.path.name)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["input"]["shape"][1:])

    def precision(self, options: RunnerOptions = RunnerOptions()) -> str:
        return self.manifest["precision"]

    @property
    def tolerance(self) -> str:
        """The precision whose tolerance the engine is held to (tf32 for an fp32 engine built with TF32)."""
        return self.manifest["tolerance"]

    @property
    def digest(self) -> str:
        return self.manifest["engine"]["sha256"]

    @property
    def preprocessing(self) -> Optional[dict]:
        return self.manifest["preprocessing"]

    def export_report(self) -> Optional[dict]:
        """The export report of the ONNX the engine was built from (beside the engine, where
        'vitslim build' put it); the manifest's ONNX digest binds the report to it, so no ONNX is
        hashed again."""
        from vitslim.export.report import read_report

        onnx = self.manifest["onnx"]
        return read_report(self.path.with_name(onnx["file"]), onnx["sha256"])

    def macs_fraction(self) -> Optional[float]:
        from vitslim.export.report import macs_fraction_of

        return macs_fraction_of(self.export_report())

    def runner(self, options: RunnerOptions = RunnerOptions()) -> Runner:
        from vitslim.deploy.runners import TensorRTRunner

        return TensorRTRunner(
            self.path, cuda_graph=options.cuda_graph, runtime_cache=options.runtime_cache, manifest=self.manifest
        )

    def describe(self, layers: bool = True) -> dict:
        from vitslim.deploy.gpu import gpu_info

        keys = (
            "library",
            "version",
            "precision",
            "tolerance",
            "profiles",
            "input",
            "target",
            "build_options",
            "network",
            "preprocessing",
            "timing_cache",
            "onnx",
            "engine",
        )
        description = {"kind": "engine", "file": str(self.path), **{k: self.manifest[k] for k in keys}}
        if not layers:
            return description
        if gpu_info() is None:
            description["layers"] = (
                "per-layer information needs the GPU that runs the engine: run 'vitslim inspect' there"
            )
            return description
        with self.runner() as runner:
            information = runner.layer_information()
        names = [str(layer.get("Name", layer)) if isinstance(layer, dict) else str(layer) for layer in information]
        kinds = Counter(str(layer.get("LayerType", "?")) if isinstance(layer, dict) else "?" for layer in information)
        fused = [n for n in names if any(marker in n.lower() for marker in ATTENTION_MARKERS)]
        description["layers"] = {
            "count": len(information),
            "types": dict(kinds),
            "attention_fused_layers": fused,
            "attention_fused": bool(fused),
            "names": names,
        }
        return description


class RunArtifact(Artifact):
    backend = "torch"
    what = "a run directory"

    @cached_property
    def run(self) -> tuple:
        """(plan, model with the run's weights)."""
        from vitslim.pruning.run_dir import load_run

        return load_run(self.path)

    @property
    def input_shape(self) -> tuple[int, ...]:
        from vitslim.pruning.timm_adapter import input_shape_of

        return tuple(input_shape_of(self.run[1]))

    def precision(self, options: RunnerOptions = RunnerOptions()) -> str:
        return options.torch_dtype

    def macs_fraction(self) -> float:
        from vitslim.pruning.macs import macs_fraction
        from vitslim.pruning.timm_adapter import geometry_of

        plan, model = self.run
        return macs_fraction(plan, geometry_of(model))

    def runner(self, options: RunnerOptions = RunnerOptions()) -> Runner:
        from vitslim.deploy.runners import TorchRunner
        from vitslim.export.compact import compact_from_plan

        plan, model = self.run
        return TorchRunner(
            compact_from_plan(model, plan), device=options.device, mode=options.torch_mode, dtype=options.torch_dtype
        )

    def describe(self, layers: bool = True) -> dict:
        from vitslim.pruning.macs import plan_macs
        from vitslim.pruning.timm_adapter import geometry_of

        plan, model = self.run
        shaped = ("static_attention", "token_aggregation")  # matrices: their shape; index lists: their length
        fields = ("kept_tokens", "qkv_in", "proj_in", "fc1_in", "hidden", *shaped)
        blocks = [
            {
                field: None
                if getattr(b, field) is None
                else list(getattr(b, field).shape)
                if field in shaped
                else len(getattr(b, field))
                for field in fields
            }
            for b in plan.blocks
        ]
        return {
            "kind": "run directory",
            "dir": str(self.path),
            "method": plan.method,
            "model": plan.model.to_dict(),
            "macs": plan_macs(plan, geometry_of(model))["total"],
            "macs_fraction": self.macs_fraction(),
            "blocks": blocks,
        }


ARTIFACT_TYPES = {kind.backend: kind for kind in (OnnxArtifact, EngineArtifact, RunArtifact)}
BACKENDS = tuple(ARTIFACT_TYPES)


def artifact_type_of(path: Path) -> type[Artifact]:
    """The kind of `path` from what it is: a directory is a run, an .engine/.plan file an engine,
    anything else an ONNX file (its bytes are checked when it is read)."""
    if path.is_dir():
        return RunArtifact
    return EngineArtifact if path.suffix in ENGINE_SUFFIXES else OnnxArtifact


def open_artifact(path: str | Path, backend: Optional[str] = None, flags: Optional[dict] = None) -> Artifact:
    """The artifact at `path`; with `backend`, refused in one line when it is of another kind,
    naming the option that takes that kind (`flags`: backend -> option; default --backend)."""
    path = Path(path)
    if backend is not None and backend not in ARTIFACT_TYPES:
        raise DeployError(f"unknown backend {backend!r}: {', '.join(BACKENDS)}")
    if not path.exists():
        raise DeployError(f"artifact {path} does not exist: give an exported .onnx, a built .engine or a run directory")
    kind = artifact_type_of(path)
    if backend is not None and kind.backend != backend:
        option = (flags or {}).get(kind.backend, f"--backend {kind.backend}")
        raise DeployError(f"{path} is {kind.what}, not {ARTIFACT_TYPES[backend].what}: give it with {option}")
    return kind(path)

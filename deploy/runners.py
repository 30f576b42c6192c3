"""Runners: one interface over PyTorch modules, onnxruntime sessions and TensorRT engines.

Loaders build (export/, deploy.build); runners only run. A runner is a context manager with
`infer(images) -> logits` on numpy arrays, plus `infer_device(batch)` that runs on inputs already
resident on the device (what benchmarks time), and a `description` for fingerprints.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .build import MANIFEST_VERSION, manifest_path_of
from .errors import DeployError
from vitslim.files import sha256_of
from .tensorrt_lib import require_tensorrt


class Runner:
    """Base: subclasses implement activate/deactivate, infer and the device-resident pair."""

    backend = "base"
    device = "cpu"

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate(self) -> None:
        pass

    def deactivate(self) -> None:
        pass

    def infer(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def prepare(self, images: np.ndarray):
        """Put `images` where `run_prepared` reads them (the device); returns a handle."""
        return images

    def run_prepared(self, prepared) -> None:
        """One inference on prepared inputs, without copying results back (for timing)."""
        self.infer(prepared)

    def synchronize(self) -> None:
        pass

    @property
    def description(self) -> dict:
        return {"backend": self.backend, "device": self.device}


TORCH_MODES = ("eager", "cuda_graph", "compile")
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # name -> torch dtype attribute


class TorchRunner(Runner):
    """A PyTorch module (e.g. the compact module or timm's dense model): eager, CUDA graphs (CUDA
    only), or torch.compile (with CUDA graphs on CUDA: mode "reduce-overhead"). Compilation and
    graph capture happen on the first call per input shape and are timed apart, in
    `setup_seconds`, so that latency excludes them."""

    backend = "torch"

    def __init__(self, module, device: str = "cpu", mode: str = "eager", dtype: str = "fp32") -> None:
        import torch

        if mode not in TORCH_MODES:
            raise DeployError(f"torch runner mode {mode!r} is not one of {TORCH_MODES}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise DeployError("--device cuda asked for, but torch sees no CUDA GPU")
        if mode == "cuda_graph" and not device.startswith("cuda"):
            raise DeployError("CUDA graphs need --device cuda")
        self.torch = torch
        self.device, self.mode = device, mode
        if dtype not in TORCH_DTYPES:
            raise DeployError(f"torch runner dtype {dtype!r} is not one of {tuple(TORCH_DTYPES)}")
        self.dtype = getattr(torch, TORCH_DTYPES[dtype])
        if device.startswith("cuda") and dtype == "fp32":
            # fp32 means IEEE fp32 (held to the fp32 tolerance); torch lets cuDNN convolutions use
            # TF32 by default. This is process-wide, as torch's switches are.
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        self.module = module.to(device=device, dtype=self.dtype).eval()
        self._graphs: dict = {}
        self.setup_seconds: dict[str, float] = {}  # input shape -> seconds of compilation / capture
        if mode == "compile":
            # Runners are used one after another; every module and batch shares timm's forward code
            # object, so without a reset dynamo's recompile limit (8) would silently fall back to eager.
            torch._dynamo.reset()
            self.module = torch.compile(self.module, mode="reduce-overhead" if device.startswith("cuda") else "default", dynamic=False)

    def infer(self, images: np.ndarray) -> np.ndarray:
        prepared = self.prepare(images)
        with self.torch.no_grad():
            return self._forward(prepared).float().cpu().numpy()

    def prepare(self, images: np.ndarray):
        return self.torch.as_tensor(np.ascontiguousarray(images)).to(device=self.device, dtype=self.dtype)

    def _forward(self, batch):
        key = tuple(batch.shape)
        if self.mode != "cuda_graph" and str(key) in self.setup_seconds:
            return self.module(batch)
        if self.mode != "cuda_graph":  # first call of this shape: compilation (compile mode) happens here
            started = time.perf_counter()
            for _ in range(3 if self.mode == "compile" else 1):  # reduce-overhead records its graph on a later call
                output = self.module(batch)
            self.synchronize()
            self.setup_seconds[str(key)] = time.perf_counter() - started
            return output
        if key not in self._graphs:
            started = time.perf_counter()
            static_in = batch.clone()
            stream = self.torch.cuda.Stream()
            stream.wait_stream(self.torch.cuda.current_stream())
            with self.torch.cuda.stream(stream):
                for _ in range(3):  # warm up outside the graph, as torch.cuda.graphs requires
                    self.module(static_in)
            self.torch.cuda.current_stream().wait_stream(stream)
            graph = self.torch.cuda.CUDAGraph()
            with self.torch.cuda.graph(graph):
                static_out = self.module(static_in)
            self._graphs[key] = (graph, static_in, static_out)
            self.setup_seconds[str(key)] = time.perf_counter() - started
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(batch)
        graph.replay()
        return static_out

    def run_prepared(self, prepared) -> None:
        with self.torch.no_grad():
            self._forward(prepared)

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    @property
    def description(self) -> dict:
        name = self.torch.cuda.get_device_name(0) if self.device.startswith("cuda") else None
        return {"backend": self.backend, "device": self.device, "mode": self.mode, "gpu": name, "torch": self.torch.__version__}


class OnnxRuntimeRunner(Runner):
    """An ONNX file in onnxruntime (CPU provider, or CUDA where that provider exists)."""

    backend = "onnxruntime"

    def __init__(self, onnx_path: str | Path, device: str = "cpu", threads: Optional[int] = None) -> None:
        self.onnx_path, self.device, self.threads = Path(onnx_path), device, threads
        self.session = None

    def activate(self) -> None:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if self.device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise DeployError("onnxruntime here has no CUDAExecutionProvider: use --device cpu or install onnxruntime-gpu")
            providers = [("CUDAExecutionProvider", {"use_tf32": 0})]  # fp32 is IEEE fp32
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        self.session = ort.InferenceSession(str(self.onnx_path), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.input_dtype = np.float16 if "float16" in self.session.get_inputs()[0].type else np.float32

    def deactivate(self) -> None:
        self.session = None

    def infer(self, images: np.ndarray) -> np.ndarray:
        if self.session is None:
            raise DeployError("use the onnxruntime runner inside 'with'")
        return self.session.run(None, {self.input_name: images.astype(self.input_dtype)})[0].astype(np.float32)

    @property
    def description(self) -> dict:
        import onnxruntime as ort

        return {"backend": self.backend, "device": self.device, "onnxruntime": ort.__version__, "onnx_sha256": sha256_of(self.onnx_path)}


MANIFEST_FIELDS = ("manifest_version", "library", "version", "target", "precision", "profiles", "input", "onnx", "engine")


def read_manifest(engine_path: Path) -> dict:
    """The manifest beside `engine_path` (ENGINE.json), checked for its version and fields."""
    manifest_path = manifest_path_of(engine_path)
    if not engine_path.is_file():
        raise DeployError(f"engine {engine_path} does not exist: build it with 'vitslim build'")
    if not manifest_path.is_file():
        raise DeployError(f"engine {engine_path} has no manifest {manifest_path.name}: rebuild it with 'vitslim build'")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DeployError(f"engine manifest {manifest_path} is unreadable ({type(error).__name__}): rebuild the engine with 'vitslim build'") from None
    missing = [name for name in MANIFEST_FIELDS if not isinstance(manifest, dict) or name not in manifest]
    if missing:
        raise DeployError(f"engine manifest {manifest_path} lacks {', '.join(missing)}: rebuild the engine with 'vitslim build'")
    if manifest["manifest_version"] != MANIFEST_VERSION:
        raise DeployError(f"engine manifest {manifest_path} has version {manifest['manifest_version']!r}, this vitslim reads {MANIFEST_VERSION}: rebuild the engine")
    return manifest


def check_batches(engine_path: Path, batches) -> None:
    """Refuse, before any work, a batch size that no optimisation profile of the engine holds."""
    profiles = check_engine(engine_path)["profiles"]
    for batch in batches:
        if not any(p["min"] <= batch <= p["max"] for p in profiles):
            ranges = ", ".join(f"{p['min']}..{p['max']}" for p in profiles)
            raise DeployError(f"batch {batch} is outside every optimisation profile of {engine_path.name} ({ranges}): "
                              f"use a batch in range or rebuild with --batch MIN:OPT:MAX")


def check_engine(engine_path: Path) -> dict:
    """Refuse an engine whose manifest is missing, whose bytes changed, or that was built by another
    library/version or for another GPU than the one here. Returns the manifest."""
    manifest = read_manifest(engine_path)
    if sha256_of(engine_path) != manifest["engine"]["sha256"]:
        raise DeployError(f"engine {engine_path} changed since it was built (sha256 differs from its manifest): rebuild it")
    trt = require_tensorrt(manifest["library"])
    if trt.version != manifest["version"]:
        raise DeployError(f"engine was built with {manifest['library']} {manifest['version']} but {trt.version} is installed: rebuild it")
    target = manifest["target"]
    if target.get("kind") == "device-specific" and target.get("gpu"):
        from .build import gpu_description

        here = gpu_description()
        if here is None or here["compute_capability"] != target["gpu"]["compute_capability"]:
            raise DeployError(f"engine was built for {target['gpu']} but this machine has {here or 'no CUDA GPU'}: rebuild it here")
    return manifest


class TensorRTRunner(Runner):
    """A TensorRT engine, with torch CUDA tensors as its input and output buffers."""

    backend = "tensorrt"
    device = "cuda"

    def __init__(self, engine_path: str | Path, profile: int = 0) -> None:
        self.engine_path, self.profile = Path(engine_path), profile
        self.manifest = check_engine(self.engine_path)

    def activate(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise DeployError("the TensorRT runner needs a CUDA GPU")
        self.torch = torch
        self.trt = require_tensorrt(self.manifest["library"])
        runtime = self.trt.module.Runtime(self.trt.logger())
        blob = self.engine_path.read_bytes()
        if hasattr(runtime, "get_engine_validity"):  # the library's own check, before deserialising
            validity, diagnostics = runtime.get_engine_validity(blob)
            if validity.name == "INVALID":
                raise DeployError(f"{self.trt.name} reports {self.engine_path.name} invalid on this GPU (diagnostics {diagnostics}): rebuild it here")
        self.engine = runtime.deserialize_cuda_engine(blob)
        if self.engine is None:
            raise DeployError(f"{self.trt.name} could not load {self.engine_path} on this GPU: rebuild it here")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.context.set_optimization_profile_async(self.profile, self.stream.cuda_stream)
        self.input_name = self.engine.get_tensor_name(0)
        self.output_name = self.engine.get_tensor_name(1)

    def deactivate(self) -> None:
        self.context = self.engine = None

    def prepare(self, images: np.ndarray):
        torch = self.torch
        batch = torch.as_tensor(np.ascontiguousarray(images), device="cuda", dtype=torch.float32)
        self.context.set_input_shape(self.input_name, tuple(batch.shape))
        shape = tuple(self.context.get_tensor_shape(self.output_name))
        output = torch.empty(shape, device="cuda", dtype=torch.float32)
        self.context.set_tensor_address(self.input_name, batch.data_ptr())
        self.context.set_tensor_address(self.output_name, output.data_ptr())
        return batch, output

    def run_prepared(self, prepared) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise DeployError("TensorRT execution failed")

    def synchronize(self) -> None:
        self.stream.synchronize()

    def infer(self, images: np.ndarray) -> np.ndarray:
        prepared = self.prepare(images)
        self.run_prepared(prepared)
        self.synchronize()
        return prepared[1].cpu().numpy()

    @property
    def description(self) -> dict:
        return {"backend": self.backend, "device": "cuda", "library": self.manifest["library"], "version": self.manifest["version"],
                "engine_sha256": self.manifest["engine"]["sha256"], "onnx_sha256": self.manifest["onnx"]["sha256"], "precision": self.manifest["precision"]}

"""Runners: one interface over PyTorch modules, onnxruntime sessions and TensorRT engines.

Loaders build (export/, deploy.build); runners only run. A runner is a context manager with
`infer(images) -> logits` on numpy arrays, plus `infer_device(batch)` that runs on inputs already
resident on the device (what benchmarks time), and a `description` for fingerprints.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from vitslim.core.files import sha256_of

from .errors import DeployError
from .manifest import check_engine
from .tensorrt_lib import require_tensorrt

log = logging.getLogger(__name__)


def numpy_dtype_of(ort_type: str):
    """numpy's dtype for an onnxruntime IO type ('tensor(float16)' -> float16; fp32 otherwise)."""
    return np.float16 if "float16" in ort_type else np.float32


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
            self.module = torch.compile(
                self.module, mode="reduce-overhead" if device.startswith("cuda") else "default", dynamic=False
            )

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
        return {
            "backend": self.backend,
            "device": self.device,
            "mode": self.mode,
            "gpu": name,
            "torch": self.torch.__version__,
        }


@dataclass
class OrtBinding:
    """A batch bound to device memory for onnxruntime: its input and output OrtValues, the IO
    binding and the run options (each batch shape is its own CUDA graph, by gpu_graph_id)."""

    images: object  # OrtValue on the GPU
    output: object  # OrtValue on the GPU
    binding: object  # onnxruntime.IOBinding
    run_options: object  # onnxruntime.RunOptions


class OnnxRuntimeRunner(Runner):
    """An ONNX file in onnxruntime: the CPU provider, or the CUDA provider (onnxruntime-gpu).

    On CUDA, inputs and outputs live in device memory bound once per batch shape (no host copies in
    what is timed), the graph's own input dtype is used (fp16 graphs take fp16 if their input is),
    onnxruntime computes on a stream of ours so that CUDA events time the GPU work, and with
    `cuda_graph` (onnxruntime's enable_cuda_graph) each batch shape is captured once and replayed,
    as the PyTorch and TensorRT runners are. fp32 is IEEE fp32 (TF32 off)."""

    backend = "onnxruntime"

    def __init__(
        self, onnx_path: str | Path, device: str = "cpu", threads: Optional[int] = None, cuda_graph: bool = False
    ) -> None:
        if cuda_graph and not device.startswith("cuda"):
            raise DeployError("CUDA graphs need --device cuda")
        if device.startswith("cuda") and device not in ("cuda", "cuda:0"):
            raise DeployError(
                f"the onnxruntime runner uses the first visible GPU: pick it with CUDA_VISIBLE_DEVICES and pass --device cuda, not {device}"
            )
        self.onnx_path, self.device, self.threads, self.cuda_graph = Path(onnx_path), device, threads, cuda_graph
        self.session = self._timer = self._stream = None
        self._bound: dict[tuple, OrtBinding] = {}
        self.setup_seconds: dict[str, float] = {}

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def activate(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        providers = ["CPUExecutionProvider"]
        try:
            if self.on_cuda:
                providers = [("CUDAExecutionProvider", self._cuda_options(ort)), "CPUExecutionProvider"]
            self.session = ort.InferenceSession(str(self.onnx_path), options, providers=providers)
        except DeployError:
            self.deactivate()  # the stream and events made for it
            raise
        except Exception as error:  # onnxruntime raises its own types (e.g. a graph that CUDA graphs cannot hold)
            self.deactivate()
            hint = ": time it with --no-cuda-graph" if self.cuda_graph else ""
            raise DeployError(
                f"onnxruntime cannot load {self.onnx_path.name} ({type(error).__name__}: {str(error).splitlines()[0][:300]}){hint}"
            ) from None
        if self.on_cuda and self.session.get_providers()[0] != "CUDAExecutionProvider":
            self.deactivate()
            raise DeployError(
                f"onnxruntime could not start its CUDA provider for {self.onnx_path.name} (its log above says why): check the GPU "
                f"and onnxruntime-gpu's CUDA libraries"
            )
        graph_input = self.session.get_inputs()[0]
        self.input_name, self.output_name = graph_input.name, self.session.get_outputs()[0].name
        self.input_dtype = numpy_dtype_of(graph_input.type)

    def _cuda_options(self, ort) -> dict:
        from .cuda_graph import CudaRuntime, EventTimer

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise DeployError(
                "onnxruntime here has no CUDAExecutionProvider: use --device cpu or install onnxruntime-gpu"
            )
        if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu >= 1.21 finds pip's CUDA/cuDNN libraries so
            ort.preload_dlls()
        self.cudart = CudaRuntime.loaded()
        self._stream = self.cudart.new_stream()
        self._timer = EventTimer(self.cudart, self._stream)
        return {
            "device_id": 0,
            "use_tf32": 0,
            "user_compute_stream": str(self._stream),
            "enable_cuda_graph": int(self.cuda_graph),
        }

    def deactivate(self) -> None:
        self._bound = {}
        self.session = None
        if self._timer is not None:
            self._timer.free()
            self.cudart.destroy_stream(self._stream)
        self._timer = self._stream = None

    def _require_session(self) -> None:
        if self.session is None:
            raise DeployError("use the onnxruntime runner inside 'with'")

    def infer(self, images: np.ndarray) -> np.ndarray:
        self._require_session()
        if not self.on_cuda:
            return self.session.run(None, {self.input_name: images.astype(self.input_dtype)})[0].astype(np.float32)
        bound = self.prepare(images)
        self.run_prepared(bound)
        return bound.output.numpy().astype(np.float32)

    def prepare(self, images: np.ndarray):
        """CPU: the images in the graph's input dtype. CUDA: the batch copied into the device input
        of its shape (bound once per shape, with its output; captured with `cuda_graph`, the capture
        timed in setup_seconds)."""
        self._require_session()
        host = np.ascontiguousarray(images, dtype=self.input_dtype)
        if not self.on_cuda:
            return host
        bound = self._bound.get(host.shape)
        if bound is not None:
            bound.images.update_inplace(host)  # same device address: a captured graph reads it
            return bound
        started = time.perf_counter()
        bound = self._bind(host)
        for _ in range(3 if self.cuda_graph else 1):  # onnxruntime captures on a run after the first
            self.run_prepared(bound)
        self._bound[host.shape] = bound
        self.setup_seconds[str(host.shape)] = time.perf_counter() - started
        return bound

    def _bind(self, host: np.ndarray) -> OrtBinding:
        import onnxruntime as ort

        device_id = 0  # the first visible GPU (see __init__)
        images = ort.OrtValue.ortvalue_from_numpy(host, "cuda", device_id)
        output_meta = self.session.get_outputs()[0]
        output_dtype = numpy_dtype_of(output_meta.type)
        output_shape = [len(host)] + [int(d) for d in output_meta.shape[1:]]
        output = ort.OrtValue.ortvalue_from_shape_and_type(output_shape, output_dtype, "cuda", device_id)
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, images)
        binding.bind_ortvalue_output(self.output_name, output)
        run_options = ort.RunOptions()
        if self.cuda_graph:  # one captured graph per batch shape (ids > 0; 0 is onnxruntime's default)
            run_options.add_run_config_entry("gpu_graph_id", str(len(self._bound) + 1))
        return OrtBinding(images=images, output=output, binding=binding, run_options=run_options)

    def run_prepared(self, prepared) -> None:
        if not self.on_cuda:
            self.infer(prepared)
            return
        self._require_session()
        self.session.run_with_iobinding(prepared.binding, prepared.run_options)

    def synchronize(self) -> None:
        if self._stream is not None:
            self.cudart.synchronize_stream(self._stream)

    def time_ms(self, prepared) -> float:
        """One run_prepared between two CUDA events on onnxruntime's compute stream (CUDA only)."""
        if self._timer is None:
            raise DeployError("the onnxruntime runner times GPU work with CUDA events: activate it with --device cuda")
        return self._timer.time_ms(lambda: self.run_prepared(prepared))

    @property
    def description(self) -> dict:
        import onnxruntime as ort

        from .gpu import gpu_info

        description = {
            "backend": self.backend,
            "device": self.device,
            "onnxruntime": ort.__version__,
            "onnx_sha256": sha256_of(self.onnx_path),
        }
        if self.on_cuda:
            description.update(provider="CUDAExecutionProvider", cuda_graph=self.cuda_graph, gpu=gpu_info())
        return description


def check_batches(manifest: dict, batches, engine_name: str) -> None:
    """Refuse, before any work, a batch size that no optimisation profile of the engine holds."""
    for batch in batches:
        profile_for(manifest["profiles"], batch, engine_name)


def import_polygraphy(library: str):
    """Polygraphy's TensorRT backend for `library`. Polygraphy picks TensorRT-RTX over TensorRT by
    an environment variable read at its import, so one process runs engines of one library."""
    import os
    import sys

    wanted = "1" if library == "tensorrt_rtx" else "0"
    if "polygraphy" in sys.modules and os.environ.get("POLYGRAPHY_USE_TENSORRT_RTX", "0") != wanted:
        raise DeployError(
            f"this process already loaded Polygraphy for another TensorRT library: run {library} engines in a process of their own"
        )
    os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = wanted
    try:
        from polygraphy import cuda
        from polygraphy.backend.trt import TrtRunner
    except ImportError:
        raise DeployError("the TensorRT runner uses Polygraphy: pip install polygraphy") from None
    return cuda, TrtRunner


RUNTIME_CACHE_SUFFIX = ".rtx-runtime-cache"


def runtime_cache_path(directory: Path, manifest: dict) -> Path:
    """One runtime-cache file per engine in `directory`, named by the engine's bytes."""
    return directory / f"{manifest['engine']['sha256'][:16]}{RUNTIME_CACHE_SUFFIX}"


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


@dataclass
class Binding:
    """A batch bound to a TensorRT context for timing: its input, a fixed output buffer, what one
    inference launches, and the captured CUDA graph where there is one."""

    prepared: dict
    output: object  # a Polygraphy DeviceArray
    launch: Callable[[], None]
    graph: Optional[object] = None  # a deploy.cuda_graph.CapturedGraph


class TensorRTRunner(Runner):
    """A TensorRT 10/11 or TensorRT-RTX engine, run by Polygraphy's TrtRunner (no torch needed):
    Polygraphy finds the IO tensors by mode, allocates buffers of each tensor's dtype, sets shapes
    and addresses and checks every boolean TensorRT returns, all on its own CUDA stream. This
    class adds what Polygraphy leaves to its user: the manifest checks, the optimisation profile
    whose range holds each batch (a batch outside every profile is refused before any work),
    TensorRT-RTX's eager kernel specialisation for dynamic shapes (so timed runs never mix kernel
    sets compiled in the background), and timing on device-resident inputs.

    Timing (`cuda_graph`, on by default, as trtexec --useCudaGraph): `prepare` binds the batch to
    fixed input and output buffers, enqueues once (TensorRT asks for one enqueue before a capture;
    RTX compiles its shape-specialised kernels there) and captures the enqueue in a CUDA graph that
    `time_ms` replays between two CUDA events. TensorRT-RTX captures and replays by itself (its
    runtime config's WHOLE_GRAPH_CAPTURE strategy: manual capture would need engines built with
    REQUIRE_USER_ALLOCATION), so there `time_ms` times a bare enqueue. Without `cuda_graph`,
    `time_ms` times Polygraphy's enqueue, host work included. `infer` goes through Polygraphy
    either way and drops the binding, which the next `time_ms` makes again."""

    backend = "tensorrt"
    device = "cuda"

    def __init__(
        self,
        engine_path: str | Path,
        cuda_graph: bool = True,
        runtime_cache: Optional[str | Path] = None,
        manifest: Optional[dict] = None,
    ) -> None:
        """`runtime_cache`: a directory for TensorRT-RTX's runtime cache (the kernels it compiles
        on this GPU), one file per engine, read at activation and written back at deactivation.
        `manifest`: what check_engine returned for this engine, from a caller that checked it
        already (checking hashes the whole engine); None: checked here."""
        self.engine_path, self.cuda_graph = Path(engine_path), cuda_graph
        self.manifest = check_engine(self.engine_path) if manifest is None else manifest
        self.runtime_cache_path = (
            None if runtime_cache is None else runtime_cache_path(Path(runtime_cache), self.manifest)
        )
        if self.runtime_cache_path is not None and self.manifest["library"] != "tensorrt_rtx":
            raise DeployError(
                f"--runtime-cache holds the kernels TensorRT-RTX compiles at run time, but {self.engine_path.name} was built by "
                f"{self.manifest['library']}, whose engines carry their kernels: drop --runtime-cache"
            )
        # whether the cache file was read and accepted (None: none read)
        self.runtime_cache_loaded: Optional[bool] = None
        self.runner = self.engine = self.context = self._bound = self._timer = self._runtime_cache = None
        self.setup_seconds: dict[str, float] = {}

    def activate(self) -> None:
        from .cuda_graph import CudaRuntime, EventTimer
        from .gpu import gpu_info

        if gpu_info() is None:
            raise DeployError(
                "the TensorRT runner needs an NVIDIA GPU (nvidia-smi sees none): run it on the GPU machine, e.g. 'vitslim selftest'"
            )
        cuda, TrtRunner = import_polygraphy(self.manifest["library"])
        self.cuda, trt = cuda, require_tensorrt(self.manifest["library"])
        runtime = trt.module.Runtime(trt.logger())
        if self.manifest["build_options"].get("version_compatible"):
            runtime.engine_host_code_allowed = True  # a version-compatible plan carries its lean runtime
        blob = self.engine_path.read_bytes()
        if hasattr(runtime, "get_engine_validity"):  # TensorRT-RTX only: its own check before deserialising
            validity, diagnostics = runtime.get_engine_validity(blob)
            if validity.name == "INVALID":
                raise DeployError(
                    f"{trt.name} reports {self.engine_path.name} invalid on this GPU (diagnostics {diagnostics}): rebuild it here"
                )
            if validity.name == "SUBOPTIMAL":
                log.warning(
                    f"{trt.name}: {self.engine_path.name} runs on this GPU but suboptimally (diagnostics {diagnostics}); rebuild it here for full speed"
                )
        engine = runtime.deserialize_cuda_engine(blob)
        if engine is None:
            raise DeployError(f"{trt.name} could not load {self.engine_path} on this GPU: rebuild it here")
        self.trt = trt
        context = self._context(engine)
        self.engine, self.context = engine, context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_name = next(n for n in names if engine.get_tensor_mode(n) == trt.module.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if engine.get_tensor_mode(n) == trt.module.TensorIOMode.OUTPUT)
        self.input_dtype = np.dtype(trt.module.nptype(engine.get_tensor_dtype(self.input_name)))
        self.runner = TrtRunner(context)
        self.runner.activate()
        self.profile, self._device_arrays = 0, []
        self.cudart = CudaRuntime.from_polygraphy(cuda)
        self._timer = EventTimer(self.cudart, self.runner.stream.ptr)

    def _context(self, engine):
        if not hasattr(engine, "create_runtime_config"):
            return engine.create_execution_context()
        module, config = self.trt.module, engine.create_runtime_config()
        strategies = getattr(module, "DynamicShapesKernelSpecializationStrategy", None)
        if strategies is not None:
            config.dynamic_shapes_kernel_specialization_strategy = strategies.EAGER
        graphs = getattr(module, "CudaGraphStrategy", None)
        if graphs is not None:  # TensorRT-RTX captures and replays its enqueue itself
            config.cuda_graph_strategy = graphs.WHOLE_GRAPH_CAPTURE if self.cuda_graph else graphs.DISABLED
        if self.runtime_cache_path is not None:
            self._runtime_cache = config.create_runtime_cache()
            if self.runtime_cache_path.is_file():
                # TensorRT-RTX checks the blob against this GPU, driver and its own version itself
                self.runtime_cache_loaded = bool(self._runtime_cache.deserialize(self.runtime_cache_path.read_bytes()))
                if not self.runtime_cache_loaded:
                    log.warning(
                        f"{self.trt.name}: runtime cache {self.runtime_cache_path} was made for another GPU, driver or version: "
                        f"not used (replaced when this run ends)"
                    )
            if not config.set_runtime_cache(self._runtime_cache):
                raise DeployError(
                    f"{self.trt.name} refused the runtime cache {self.runtime_cache_path}: delete it, or run without --runtime-cache"
                )
        return engine.create_execution_context(config)

    def deactivate(self) -> None:
        self._unbind()
        if self._timer is not None:
            self._timer.free()
        if self._runtime_cache is not None:  # written back with what this run compiled
            from vitslim.core.files import write_bytes_atomic

            self.runtime_cache_path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(self.runtime_cache_path, bytes(self._runtime_cache.serialize()))
            self._runtime_cache = None
        for device in getattr(self, "_device_arrays", []):
            device.free()
        self._device_arrays = []
        if self.runner is not None:
            self.runner.deactivate()
        self.runner = self.engine = self.context = self._timer = None

    def layer_information(self) -> list:
        """TensorRT's engine inspector: one entry per layer (a dict with LayerType, inputs, outputs
        and tactic for engines built with detailed profiling verbosity, as vitslim builds them)."""
        inspector = self.engine.create_engine_inspector()
        inspector.execution_context = self.context
        information = json.loads(inspector.get_engine_information(self.trt.module.LayerInformationFormat.JSON))
        return information.get("Layers", []) if isinstance(information, dict) else information

    def _use_profile_for(self, batch: int) -> None:
        index = profile_for(self.manifest["profiles"], batch, self.engine_path.name)
        if index != self.profile:
            self._unbind()  # a binding holds the old profile's shapes
            self.runner.set_profile(index)  # Polygraphy checks TensorRT's boolean
            self.profile = index

    def infer(self, images: np.ndarray) -> np.ndarray:
        if self.runner is None:
            raise DeployError("use the TensorRT runner inside 'with'")
        self._use_profile_for(len(images))
        self._unbind()  # Polygraphy rebinds the context to its own buffers
        outputs = self.runner.infer({self.input_name: np.ascontiguousarray(images, dtype=self.input_dtype)})
        return np.asarray(outputs[self.output_name], dtype=np.float32)

    def prepare(self, images: np.ndarray):
        """The batch copied to the GPU once (a Polygraphy DeviceArray), in the engine's input dtype;
        with `cuda_graph`, bound and captured (its time in setup_seconds, not in any latency)."""
        self._use_profile_for(len(images))
        host = np.ascontiguousarray(images, dtype=self.input_dtype)
        device = self.cuda.DeviceArray(shape=host.shape, dtype=host.dtype)
        device.copy_from(host, self.runner.stream)
        self._device_arrays.append(
            device
        )  # freed on deactivate (Polygraphy's arrays are not freed by the garbage collector)
        prepared = {self.input_name: device}
        if self.cuda_graph:
            started = time.perf_counter()
            self._bind(prepared)
            self.setup_seconds[str(tuple(images.shape))] = time.perf_counter() - started
        return prepared

    def _check(self, succeeded, what: str) -> None:
        if not succeeded:
            raise DeployError(
                f"{self.trt.name} refused {what} for {self.engine_path.name} while binding it for timing: time it with --no-cuda-graph"
            )

    def _bind(self, prepared) -> None:
        """Bind `prepared` and a fixed output buffer to the context (no output allocator: a graph
        cannot call back into Python), enqueue once, and capture the enqueue (full TensorRT)."""
        self._use_profile_for(
            prepared[self.input_name].shape[0]
        )  # another batch may have switched the profile since prepare()
        self._unbind()
        try:
            self._bind_and_capture(prepared)
        except BaseException:
            self._unbind()  # never leave a half-made binding that time_ms would take for a captured one
            raise

    def _bind_and_capture(self, prepared) -> None:
        from .cuda_graph import CapturedGraph

        context, stream, device = self.context, self.runner.stream.ptr, prepared[self.input_name]
        self._check(context.set_input_shape(self.input_name, tuple(device.shape)), f"input shape {tuple(device.shape)}")
        self._check(context.set_tensor_address(self.input_name, device.ptr), "the input address")
        self._check(context.set_output_allocator(self.output_name, None), "unsetting the output allocator")
        output = self.cuda.DeviceArray(
            shape=tuple(context.get_tensor_shape(self.output_name)),
            dtype=np.dtype(self.trt.module.nptype(self.engine.get_tensor_dtype(self.output_name))),
        )
        self._bound = Binding(prepared=prepared, output=output, launch=self._enqueue)
        self._check(context.set_tensor_address(self.output_name, output.ptr), "the output address")
        self._enqueue()
        self.runner.stream.synchronize()
        if self.trt.name == "tensorrt":
            if hasattr(context, "is_stream_capturable") and not context.is_stream_capturable(stream):
                raise DeployError(
                    f"{self.engine_path.name} cannot be captured in a CUDA graph on this GPU (TensorRT says so): time it with --no-cuda-graph"
                )
            self._bound.graph = CapturedGraph(
                self.cudart, stream, lambda: context.execute_async_v3(stream), self.engine_path.name
            )
            self._bound.launch = self._bound.graph.launch

    def _enqueue(self) -> None:
        self._check(self.context.execute_async_v3(self.runner.stream.ptr), "execute_async_v3")

    def _unbind(self) -> None:
        if self._bound is not None:
            self.runner.stream.synchronize()  # nothing in flight still reads the buffers
            if self._bound.graph is not None:
                self._bound.graph.free()
            self._bound.output.free()
            self._bound = None

    def bound_output(self) -> np.ndarray:
        """The output buffer of the bound batch, on the host (what the last graph replay wrote)."""
        if self._bound is None:
            raise DeployError("no batch is bound: call prepare() and run_prepared() first (and no infer() in between)")
        self.runner.stream.synchronize()
        return np.asarray(self._bound.output.numpy(), dtype=np.float32)

    def _ready_for(self, prepared) -> None:
        """What must hold before `prepared` runs (done outside any timed interval): its profile
        active and, with `cuda_graph`, it bound and captured (another batch or infer() may have
        intervened since prepare())."""
        if not self.cuda_graph:
            self._use_profile_for(prepared[self.input_name].shape[0])
        elif self._bound is None or self._bound.prepared is not prepared:
            self._bind(prepared)

    def run_prepared(self, prepared) -> None:
        self._ready_for(prepared)
        if self.cuda_graph:
            self._bound.launch()
        else:
            self.runner.infer(
                prepared, check_inputs=False, copy_outputs_to_host=False
            )  # prepare() made the input: no per-call checks

    def synchronize(self) -> None:
        self.runner.stream.synchronize()

    def time_ms(self, prepared) -> float:
        """One `run_prepared` (a graph replay with `cuda_graph`) timed by CUDA events on the
        runner's stream, as the PyTorch runners are timed."""
        self._ready_for(prepared)  # outside the timed interval
        return self._timer.time_ms(lambda: self.run_prepared(prepared))

    @property
    def description(self) -> dict:
        from .gpu import gpu_info

        return {
            "backend": self.backend,
            "device": "cuda",
            "library": self.manifest["library"],
            "version": self.manifest["version"],
            "gpu": gpu_info(),
            "engine_sha256": self.manifest["engine"]["sha256"],
            "onnx_sha256": self.manifest["onnx"]["sha256"],
            "precision": self.manifest["precision"],
            "build_options": self.manifest["build_options"],
            "cuda_graph": self.cuda_graph,
        }

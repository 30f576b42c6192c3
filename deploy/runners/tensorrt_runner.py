"""The TensorRT runner: a TensorRT 10/11 or TensorRT-RTX engine, run by Polygraphy."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import DeployError
from ..manifest import check_engine, profile_for
from ..tensorrt_lib import require_tensorrt
from .base import Runner

log = logging.getLogger(__name__)


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

    def activate_impl(self) -> None:
        from ..cuda_graph import CudaRuntime, EventTimer
        from ..gpu import gpu_info

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
        self._check_profiles(engine)
        self.runner = TrtRunner(context)
        self.runner.activate()
        self.profile, self._device_arrays = 0, []
        self.cudart = CudaRuntime.from_polygraphy(cuda)
        self._timer = EventTimer(self.cudart, self.runner.stream.ptr)

    def _check_profiles(self, engine) -> None:
        """The batch profiles the engine itself holds must be the manifest's, which bench and
        compare chose their batches by: an edited manifest is refused here, before any run."""
        if not hasattr(engine, "get_tensor_profile_shape"):
            return  # a library that cannot tell
        held = []
        for index in range(engine.num_optimization_profiles):
            low, opt, high = (tuple(shape) for shape in engine.get_tensor_profile_shape(self.input_name, index))
            held.append({"min": low[0], "opt": opt[0], "max": high[0]})
        recorded = [{key: profile[key] for key in ("min", "opt", "max")} for profile in self.manifest["profiles"]]
        if held != recorded:

            def ranges(profiles) -> str:
                return ", ".join(f"{p['min']}:{p['opt']}:{p['max']}" for p in profiles)

            raise DeployError(
                f"{self.engine_path.name}'s manifest lists batch profiles {ranges(recorded)} but the engine holds "
                f"{ranges(held)} (an edited or mixed-up manifest): rebuild the engine with 'vitslim build'"
            )

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

    def deactivate_impl(self) -> None:
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
        self.require_active()
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

    def infer_impl(self, images: np.ndarray) -> np.ndarray:
        self._use_profile_for(len(images))
        self._unbind()  # Polygraphy rebinds the context to its own buffers
        outputs = self.runner.infer({self.input_name: np.ascontiguousarray(images, dtype=self.input_dtype)})
        return np.asarray(outputs[self.output_name], dtype=np.float32)

    def prepare_impl(self, images: np.ndarray):
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
        from ..cuda_graph import CapturedGraph

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

    def run_prepared_impl(self, prepared) -> None:
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
        self.require_active()
        self._ready_for(prepared)  # outside the timed interval
        return self._timer.time_ms(lambda: self.run_prepared_impl(prepared))

    @property
    def description(self) -> dict:
        from ..gpu import gpu_info

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

"""The PyTorch runner: a module (timm's own model or a compact one) eager, under CUDA graphs, or
compiled."""

from __future__ import annotations

import time

import numpy as np

from ..errors import DeployError
from .base import Runner

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

    def infer_impl(self, images: np.ndarray) -> np.ndarray:
        prepared = self.prepare_impl(images)
        with self.torch.no_grad():
            return self._forward(prepared).float().cpu().numpy()

    def prepare_impl(self, images: np.ndarray):
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

    def run_prepared_impl(self, prepared) -> None:
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

"""The TensorRT runner's own logic against a FAKE of TensorRT's runtime and Polygraphy's runner
(no GPU here can run an engine): which optimisation profile each batch gets, refusal outside every
profile before any work, IO tensors found by mode and the input dtype taken from the engine, the
manifest and GPU checks, the order of the CUDA-graph binding and capture (against a fake of the
CUDA runtime too), and TensorRT-RTX's runtime cache read, checked and written back. What only a GPU can show (that real engines load, compute the right
numbers, capture into graphs whose replays compute them too, and are timed correctly) is
`vitslim selftest`'s job on the user's machine; deploy/cuda_graph.py's CUDA calls themselves are
checked on a real GPU by tests/deploy/test_cuda_graph_gpu.py."""

from __future__ import annotations

import types

import numpy as np
import pytest
from vitslim.deploy import manifest as manifest_module
from vitslim.deploy import runners
from vitslim.deploy.errors import DeployError
from vitslim.deploy.runners import tensorrt_runner


class FakeContext:
    """The execution-context calls the runner makes itself (binding a batch for timing)."""

    def __init__(self, log, engine):
        self.log, self.engine, self.shape = log, engine, None

    def set_input_shape(self, name, shape):
        self.shape = shape
        self.log.append(("shape", name, shape))
        return True

    def set_tensor_address(self, name, pointer):
        self.log.append(("address", name, pointer))
        return True

    def set_output_allocator(self, name, allocator):
        self.log.append(("allocator", name, allocator))
        return True

    def get_tensor_shape(self, name):
        return (self.shape[0], 10)

    def execute_async_v3(self, stream):
        self.log.append("enqueue")
        return self.engine.enqueue_succeeds.pop(0) if self.engine.enqueue_succeeds else True


class FakeEngine:
    """Tensors listed output first (a real engine need not list the input at index 0)."""

    names = ("logits", "images")

    def __init__(self, dtype, log, rtx=False):
        self.dtype, self.log, self.num_io_tensors, self.enqueue_succeeds = dtype, log, 2, []
        self.config = types.SimpleNamespace() if rtx else None

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_mode(self, name):
        return "INPUT" if name == "images" else "OUTPUT"

    def get_tensor_dtype(self, name):
        return self.dtype if name == "images" else "float32"

    def __getattr__(self, name):
        if name == "create_runtime_config" and self.config is not None:  # TensorRT-RTX engines only
            return lambda: self.config
        raise AttributeError(name)

    def create_execution_context(self, *config):
        return FakeContext(self.log, self)


class FakeTrtRunner:
    """Polygraphy's TrtRunner as the runner uses it: activate, set_profile, infer, its stream."""

    log: list

    def __init__(self, context):
        self.log = context.log
        self.stream = types.SimpleNamespace(synchronize=lambda: None, ptr=7)

    def activate(self):
        self.log.append("activate")

    def deactivate(self):
        self.log.append("deactivate")

    def set_profile(self, index):
        self.log.append(("profile", index))

    def infer(self, feed, check_inputs=True, copy_outputs_to_host=True):
        ((name, images),) = feed.items()
        self.log.append(
            ("infer", name, len(images), images.dtype) if copy_outputs_to_host else ("infer on device", name)
        )
        return {"logits": np.zeros((images.shape[0], 10), dtype=np.float32)}


class FakeCudart:
    """libcudart as ctypes shows it: every function returns 0 (success) and is logged by name;
    the ones that make a graph, executable or event write a handle through their pointer."""

    def __init__(self, log):
        self.log, self.failing = log, {}

    def __getattr__(self, name):
        def function(*arguments):
            if name != "cudaGetErrorName":
                self.log.append(name)
            if name in ("cudaStreamEndCapture", "cudaGraphInstantiateWithFlags", "cudaEventCreate"):
                pointer = arguments[1] if name == "cudaStreamEndCapture" else arguments[0]
                pointer._obj.value = 1000 + len(self.log)
            if name == "cudaGetErrorName":
                return b"cudaErrorStreamCaptureInvalidated"
            return self.failing.get(name, 0)

        setattr(self, name, function)  # ctypes functions keep attributes (restype) like this
        return function


class FakeDeviceArray:
    def __init__(self, shape, dtype):
        self.shape, self.dtype, self.ptr = shape, dtype, 4096 + sum(shape)

    def copy_from(self, host, stream):
        pass

    def free(self):
        pass

    def numpy(self):
        return np.ones(self.shape, dtype=self.dtype)


@pytest.fixture
def fake(monkeypatch):
    log = []
    engine = FakeEngine("float16", log)
    module = types.SimpleNamespace(
        Runtime=lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda blob: engine),
        TensorIOMode=types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"),
        nptype=lambda dtype: np.float16 if dtype == "float16" else np.float32,
        CudaGraphStrategy=types.SimpleNamespace(WHOLE_GRAPH_CAPTURE="whole graph", DISABLED="disabled"),
    )
    trt = types.SimpleNamespace(module=module, name="tensorrt", version="10.13", logger=lambda: None)
    manifest = {
        "library": "tensorrt",
        "version": "10.13",
        "profiles": [{"min": 1, "opt": 2, "max": 4}, {"min": 8, "opt": 8, "max": 16}],
        "build_options": {"version_compatible": False},
        "engine": {"sha256": "x"},
        "onnx": {"sha256": "y"},
        "precision": "fp16",
    }
    cudart = FakeCudart(log)
    cuda = types.SimpleNamespace(wrapper=lambda: types.SimpleNamespace(handle=cudart), DeviceArray=FakeDeviceArray)
    monkeypatch.setattr(tensorrt_runner, "check_engine", lambda path: manifest)
    monkeypatch.setattr(tensorrt_runner, "require_tensorrt", lambda library: trt)
    monkeypatch.setattr(tensorrt_runner, "import_polygraphy", lambda library: (cuda, FakeTrtRunner))
    monkeypatch.setattr(
        "vitslim.deploy.gpu.gpu_info", lambda index=0: {"name": "Fake GPU", "compute_capability": "9.0"}
    )
    return types.SimpleNamespace(manifest=manifest, log=log, engine=engine, trt=trt, cudart=cudart)


def test_each_batch_gets_the_profile_that_holds_it(tmp_path, fake):
    (tmp_path / "m.engine").write_bytes(b"engine")
    with runners.TensorRTRunner(tmp_path / "m.engine") as runner:
        assert runner.input_name == "images" and runner.output_name == "logits"  # by mode, not by index
        for batch in (2, 16, 3, 8):
            assert runner.infer(np.zeros((batch, 3, 4, 4), dtype=np.float32)).shape == (batch, 10)
        log = runner.runner.log
    log = [entry for entry in log if not str(entry).startswith("cudaEvent")]
    # profile 0 is active after activation; switching only when the batch needs another profile
    assert log == [
        "activate",
        ("infer", "images", 2, np.float16),
        ("profile", 1),
        ("infer", "images", 16, np.float16),
        ("profile", 0),
        ("infer", "images", 3, np.float16),
        ("profile", 1),
        ("infer", "images", 8, np.float16),
        "deactivate",
    ]


def test_a_batch_outside_every_profile_is_refused_before_any_work(tmp_path, fake):
    (tmp_path / "m.engine").write_bytes(b"engine")
    with runners.TensorRTRunner(tmp_path / "m.engine") as runner:
        with pytest.raises(
            DeployError, match=r"batch 5 is outside every optimisation profile of m.engine \(1..4, 8..16\)"
        ):
            runner.infer(np.zeros((5, 3, 4, 4), dtype=np.float32))
        assert [entry for entry in runner.runner.log if not str(entry).startswith("cudaEvent")] == ["activate"]


def test_the_engine_s_own_profiles_must_be_the_manifest_s(tmp_path, fake, monkeypatch):
    """What bench and compare believe about profiles is checked against the engine itself."""
    held = [((1, 3, 4, 4), (2, 3, 4, 4), (4, 3, 4, 4)), ((8, 3, 4, 4), (8, 3, 4, 4), (16, 3, 4, 4))]
    fake.engine.__dict__.update(num_optimization_profiles=2, get_tensor_profile_shape=lambda name, i: held[i])
    (tmp_path / "m.engine").write_bytes(b"engine")
    with runners.TensorRTRunner(tmp_path / "m.engine") as runner:  # they agree
        assert runner.infer(np.zeros((2, 3, 4, 4), dtype=np.float32)).shape == (2, 10)
    fake.manifest["profiles"][1]["max"] = 64  # an edited manifest
    with pytest.raises(DeployError, match="lists batch profiles 1:2:4, 8:8:64 but the engine holds 1:2:4, 8:8:16"):
        runners.TensorRTRunner(tmp_path / "m.engine").activate()


def test_no_gpu_is_a_one_line_error(tmp_path, fake, monkeypatch):
    monkeypatch.setattr("vitslim.deploy.gpu.gpu_info", lambda index=0: None)
    (tmp_path / "m.engine").write_bytes(b"engine")
    with pytest.raises(DeployError, match="needs an NVIDIA GPU"):
        runners.TensorRTRunner(tmp_path / "m.engine").activate()


def test_engine_targets_against_the_gpu_here():
    portable = {"kind": "portable (ahead of time)", "compute_capabilities": ["SM80", "SM86", "SM89", "SM120 and later"]}
    for capability in ("8.0", "8.9", "12.0", "12.1"):
        manifest_module.check_target(portable, {"name": "g", "compute_capability": capability})
    for capability in ("7.5", "9.0"):  # Turing; Hopper is no TensorRT-RTX target
        with pytest.raises(DeployError, match=f"is SM{capability.replace('.', '')}"):
            manifest_module.check_target(portable, {"name": "g", "compute_capability": capability})
    specific = {"kind": "device-specific", "gpu": {"name": "H100", "compute_capability": "9.0"}}
    manifest_module.check_target(specific, {"name": "H100", "compute_capability": "9.0"})
    with pytest.raises(DeployError, match="rebuild it here"):
        manifest_module.check_target(specific, {"name": "A10", "compute_capability": "8.6"})
    with pytest.raises(DeployError, match="does not say which GPU"):
        manifest_module.check_target(
            {"kind": "device-specific", "gpu": None}, {"name": "A10", "compute_capability": "8.6"}
        )
    ampere = {"kind": "any Ampere or later GPU", "gpu": {"compute_capability": "8.6"}}
    manifest_module.check_target(ampere, {"name": "L4", "compute_capability": "8.9"})
    with pytest.raises(DeployError, match="Ampere or later"):
        manifest_module.check_target(ampere, {"name": "T4", "compute_capability": "7.5"})


TIMING_EVENTS = ["cudaEventRecord", "cudaEventRecord", "cudaEventSynchronize", "cudaEventElapsedTime"]


def test_timing_binds_fixed_buffers_and_replays_a_captured_graph(tmp_path, fake):
    (tmp_path / "m.engine").write_bytes(b"engine")
    with runners.TensorRTRunner(tmp_path / "m.engine") as runner:
        images = np.zeros((8, 3, 4, 4), dtype=np.float32)
        del fake.log[:]
        prepared = runner.prepare(images)
        # fixed addresses and no output allocator, one enqueue (TensorRT flushes deferred updates
        # there), then the capture of one enqueue on the runner's stream
        assert fake.log == [
            ("profile", 1),
            ("shape", "images", (8, 3, 4, 4)),
            ("address", "images", 4096 + 8 + 3 + 4 + 4),
            ("allocator", "logits", None),
            ("address", "logits", 4096 + 8 + 10),
            "enqueue",
            "cudaStreamBeginCapture",
            "enqueue",
            "cudaStreamEndCapture",
            "cudaGraphInstantiateWithFlags",
        ]
        assert str((8, 3, 4, 4)) in runner.setup_seconds
        del fake.log[:]
        runner.time_ms(prepared)
        runner.time_ms(prepared)
        assert (
            fake.log == [TIMING_EVENTS[0], "cudaGraphLaunch", *TIMING_EVENTS[1:]] * 2
        )  # replays only: no enqueue, no capture
        assert runner.bound_output().shape == (8, 10)
        del fake.log[:]
        runner.infer(images)  # Polygraphy rebinds the context to its own buffers: the graph goes
        assert fake.log == ["cudaGraphExecDestroy", "cudaGraphDestroy", ("infer", "images", 8, np.float16)]
        del fake.log[:]
        runner.time_ms(prepared)  # and is captured again, outside the timed interval
        assert fake.log[-9:] == [
            "cudaStreamBeginCapture",
            "enqueue",
            "cudaStreamEndCapture",
            "cudaGraphInstantiateWithFlags",
            TIMING_EVENTS[0],
            "cudaGraphLaunch",
            *TIMING_EVENTS[1:],
        ]
        assert runner.description["cuda_graph"] is True


def test_a_failed_capture_is_a_one_line_error_and_leaves_no_binding(tmp_path, fake):
    (tmp_path / "m.engine").write_bytes(b"engine")
    with runners.TensorRTRunner(tmp_path / "m.engine") as runner:
        fake.engine.enqueue_succeeds[:] = [True, False]  # the warm-up enqueue works, the captured one does not
        with pytest.raises(
            DeployError,
            match=r"^m.engine cannot be captured in a CUDA graph \(it could not be enqueued during stream capture\): time it with --no-cuda-graph$",
        ):
            runner.prepare(np.zeros((2, 3, 4, 4), dtype=np.float32))
        assert fake.log[-3:] == [
            "enqueue",
            "cudaStreamEndCapture",
            "cudaGraphDestroy",
        ]  # capture ended, the partial graph freed
        assert runner._bound is None
        fake.cudart.failing["cudaStreamEndCapture"] = 901  # capture invalidated by an operation TensorRT cannot capture
        with pytest.raises(
            DeployError, match=r"cannot be captured in a CUDA graph \(cudaErrorStreamCaptureInvalidated\)"
        ):
            runner.prepare(np.zeros((2, 3, 4, 4), dtype=np.float32))


def test_tensorrt_rtx_replays_its_own_graph_and_without_graphs_polygraphy_enqueues(tmp_path, fake, monkeypatch):
    fake.engine.config = types.SimpleNamespace()
    fake.manifest["library"], fake.trt.name = "tensorrt_rtx", "tensorrt_rtx"
    (tmp_path / "m.engine").write_bytes(b"engine")
    with runners.TensorRTRunner(tmp_path / "m.engine") as runner:
        assert fake.engine.config.cuda_graph_strategy == "whole graph"
        prepared = runner.prepare(np.zeros((2, 3, 4, 4), dtype=np.float32))
        del fake.log[:]
        runner.time_ms(prepared)
        assert fake.log == [
            TIMING_EVENTS[0],
            "enqueue",
            *TIMING_EVENTS[1:],
        ]  # a bare enqueue: RTX captures and replays inside
    assert "cudaStreamBeginCapture" not in fake.log
    fake.engine.config = types.SimpleNamespace()
    with runners.TensorRTRunner(tmp_path / "m.engine", cuda_graph=False) as runner:
        assert fake.engine.config.cuda_graph_strategy == "disabled"
        prepared = runner.prepare(np.zeros((2, 3, 4, 4), dtype=np.float32))
        del fake.log[:]
        runner.time_ms(prepared)
        assert fake.log == [TIMING_EVENTS[0], ("infer on device", "images"), *TIMING_EVENTS[1:]]
        assert runner.description["cuda_graph"] is False


class FakeRuntimeCache:
    """TensorRT-RTX's runtime cache: accepts only what this 'GPU' serialized."""

    def deserialize(self, blob):
        return bytes(blob) == b"kernels compiled on this GPU"

    def serialize(self):
        return b"kernels compiled on this GPU"


def test_tensorrt_rtx_runtime_cache_is_read_checked_and_written_back(tmp_path, fake, caplog):
    fake.manifest["library"], fake.trt.name = "tensorrt_rtx", "tensorrt_rtx"
    fake.manifest["engine"]["sha256"] = "ab" * 32
    (tmp_path / "m.engine").write_bytes(b"engine")
    cache_dir = tmp_path / "caches"
    cache_file = cache_dir / ("ab" * 8 + runners.RUNTIME_CACHE_SUFFIX)

    def load():
        fake.engine.config = types.SimpleNamespace(
            create_runtime_cache=FakeRuntimeCache, set_runtime_cache=lambda cache: True
        )
        with runners.TensorRTRunner(tmp_path / "m.engine", runtime_cache=cache_dir) as runner:
            assert fake.engine.config.cuda_graph_strategy == "whole graph"
        return runner

    assert (
        load().runtime_cache_loaded is None and cache_file.read_bytes() == b"kernels compiled on this GPU"
    )  # none yet: written at the end
    assert load().runtime_cache_loaded is True  # read back and accepted
    cache_file.write_bytes(b"kernels of another GPU")
    caplog.clear()
    assert load().runtime_cache_loaded is False
    assert "was made for another GPU, driver or version: not used" in caplog.text
    assert cache_file.read_bytes() == b"kernels compiled on this GPU"  # replaced
    fake.manifest["library"] = "tensorrt"
    with pytest.raises(
        DeployError, match="was built by tensorrt, whose engines carry their kernels: drop --runtime-cache"
    ):
        runners.TensorRTRunner(tmp_path / "m.engine", runtime_cache=cache_dir)


def test_timing_a_batch_prepared_before_another_profile_was_chosen_switches_back(tmp_path, fake):
    (tmp_path / "m.engine").write_bytes(b"engine")
    with runners.TensorRTRunner(tmp_path / "m.engine") as runner:
        small = runner.prepare(np.zeros((2, 3, 4, 4), dtype=np.float32))  # profile 0
        runner.prepare(np.zeros((8, 3, 4, 4), dtype=np.float32))  # profile 1
        del fake.log[:]
        runner.time_ms(small)
        assert fake.log[:3] == [
            "cudaGraphExecDestroy",
            "cudaGraphDestroy",
            ("profile", 0),
        ]  # unbound, then back to the batch's profile
        assert ("shape", "images", (2, 3, 4, 4)) in fake.log and fake.log[-4] == "cudaGraphLaunch"
        runner.infer(np.zeros((2, 3, 4, 4), dtype=np.float32))
        with pytest.raises(DeployError, match="no batch is bound"):
            runner.bound_output()


def test_bench_checks_the_engine_once_and_refuses_an_out_of_profile_batch_first(tmp_path, fake, monkeypatch):
    """Checking an engine hashes all of it (seconds for a large one): bench checks it once and hands
    the manifest on (batches, input shape, precision, runner, export report)."""
    from vitslim.deploy.bench import BenchSettings

    from vitslim import artifacts, measure

    checked = []
    monkeypatch.setattr(artifacts, "check_engine", lambda path: checked.append(path) or fake.manifest)
    monkeypatch.setattr(
        tensorrt_runner, "check_engine", lambda path: pytest.fail("the runner checked the engine again")
    )
    fake.manifest.update(input={"shape": [-1, 3, 4, 4]}, onnx={"file": "m.onnx", "sha256": "y"})
    (tmp_path / "m.engine").write_bytes(b"engine")
    settings = BenchSettings(warmup_seconds=0, min_seconds=0, min_iterations=3, max_iterations=3, max_rounds=1)
    report = measure.run_bench(
        measure.BenchSpec(artifact=str(tmp_path / "m.engine"), backend="tensorrt", batches=(2, 8)), settings
    )
    assert len(checked) == 1 and [
        (r["batch"], r["fingerprint"]["precision"], r["fingerprint"]["artifact_sha256"]) for r in report["results"]
    ] == [(2, "fp16", "x"), (8, "fp16", "x")]
    work_logged = len(fake.log)  # CUDA and TensorRT calls
    with pytest.raises(DeployError, match="batch 5 is outside every optimisation profile"):
        measure.run_bench(
            measure.BenchSpec(artifact=str(tmp_path / "m.engine"), backend="tensorrt", batches=(2, 5)), settings
        )
    assert len(checked) == 2 and len(fake.log) == work_logged  # refused before batch 2 was run

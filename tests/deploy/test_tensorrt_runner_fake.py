"""The TensorRT runner's own logic against a FAKE of TensorRT's runtime and Polygraphy's runner
(no GPU here can run an engine): which optimisation profile each batch gets, refusal outside every
profile before any work, IO tensors found by mode and the input dtype taken from the engine, the
manifest and GPU checks. What only a GPU can show (that real engines load, compute the right
numbers and are timed correctly) is `vitslim selftest`'s job on the user's machine."""
from __future__ import annotations

import types

import numpy as np
import pytest

from vitslim.deploy import runners
from vitslim.deploy.errors import DeployError


class FakeEngine:
    """Tensors listed output first (a real engine need not list the input at index 0)."""

    names = ("logits", "images")

    def __init__(self, dtype):
        self.dtype = dtype
        self.num_io_tensors = 2

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_mode(self, name):
        return "INPUT" if name == "images" else "OUTPUT"

    def get_tensor_dtype(self, name):
        return self.dtype if name == "images" else "float32"

    def create_execution_context(self, *config):
        return "context"


class FakeTrtRunner:
    """Polygraphy's TrtRunner as the runner uses it: activate, set_profile, infer."""

    log: list

    def __init__(self, context):
        self.log, self.stream = [], types.SimpleNamespace(synchronize=lambda: None, ptr=0)

    def activate(self):
        self.log.append("activate")

    def deactivate(self):
        self.log.append("deactivate")

    def set_profile(self, index):
        self.log.append(("profile", index))

    def infer(self, feed, check_inputs=True, copy_outputs_to_host=True):
        (name, images), = feed.items()
        self.log.append(("infer", name, len(images), images.dtype))
        return {"logits": np.zeros((len(images), 10), dtype=np.float32)}


@pytest.fixture
def fake(monkeypatch):
    module = types.SimpleNamespace(
        Runtime=lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda blob: FakeEngine("float16")),
        TensorIOMode=types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"),
        nptype=lambda dtype: np.float16 if dtype == "float16" else np.float32,
    )
    trt = types.SimpleNamespace(module=module, name="tensorrt", version="10.13", logger=lambda: None)
    manifest = {"library": "tensorrt", "version": "10.13", "profiles": [{"min": 1, "opt": 2, "max": 4}, {"min": 8, "opt": 8, "max": 16}],
                "build_options": {"version_compatible": False}, "engine": {"sha256": "x"}, "onnx": {"sha256": "y"}, "precision": "fp16"}
    monkeypatch.setattr(runners, "check_engine", lambda path: manifest)
    monkeypatch.setattr(runners, "require_tensorrt", lambda library: trt)
    monkeypatch.setattr(runners, "import_polygraphy", lambda library: (types.SimpleNamespace(), FakeTrtRunner))
    monkeypatch.setattr("vitslim.deploy.gpu.gpu_info", lambda index=0: {"name": "Fake GPU", "compute_capability": "9.0"})
    return manifest


def test_each_batch_gets_the_profile_that_holds_it(tmp_path, fake):
    (tmp_path / "m.engine").write_bytes(b"engine")
    with runners.TensorRTRunner(tmp_path / "m.engine") as runner:
        assert runner.input_name == "images" and runner.output_name == "logits"  # by mode, not by index
        for batch in (2, 16, 3, 8):
            assert runner.infer(np.zeros((batch, 3, 4, 4), dtype=np.float32)).shape == (batch, 10)
        log = runner.runner.log
    # profile 0 is active after activation; switching only when the batch needs another profile
    assert log == ["activate", ("infer", "images", 2, np.float16), ("profile", 1), ("infer", "images", 16, np.float16),
                   ("profile", 0), ("infer", "images", 3, np.float16), ("profile", 1), ("infer", "images", 8, np.float16), "deactivate"]


def test_a_batch_outside_every_profile_is_refused_before_any_work(tmp_path, fake):
    (tmp_path / "m.engine").write_bytes(b"engine")
    with runners.TensorRTRunner(tmp_path / "m.engine") as runner:
        with pytest.raises(DeployError, match=r"batch 5 is outside every optimisation profile of m.engine \(1..4, 8..16\)"):
            runner.infer(np.zeros((5, 3, 4, 4), dtype=np.float32))
        assert runner.runner.log == ["activate"]


def test_no_gpu_is_a_one_line_error(tmp_path, fake, monkeypatch):
    monkeypatch.setattr("vitslim.deploy.gpu.gpu_info", lambda index=0: None)
    (tmp_path / "m.engine").write_bytes(b"engine")
    with pytest.raises(DeployError, match="needs an NVIDIA GPU"):
        runners.TensorRTRunner(tmp_path / "m.engine").activate()


def test_engine_targets_against_the_gpu_here():
    portable = {"kind": "portable (ahead of time)", "compute_capabilities": ["SM80", "SM86", "SM89", "SM120 and later"]}
    for capability in ("8.0", "8.9", "12.0", "12.1"):
        runners.check_target(portable, {"name": "g", "compute_capability": capability})
    for capability in ("7.5", "9.0"):  # Turing; Hopper is no TensorRT-RTX target
        with pytest.raises(DeployError, match=f"is SM{capability.replace('.', '')}"):
            runners.check_target(portable, {"name": "g", "compute_capability": capability})
    specific = {"kind": "device-specific", "gpu": {"name": "H100", "compute_capability": "9.0"}}
    runners.check_target(specific, {"name": "H100", "compute_capability": "9.0"})
    with pytest.raises(DeployError, match="rebuild it here"):
        runners.check_target(specific, {"name": "A10", "compute_capability": "8.6"})
    with pytest.raises(DeployError, match="does not say which GPU"):
        runners.check_target({"kind": "device-specific", "gpu": None}, {"name": "A10", "compute_capability": "8.6"})
    ampere = {"kind": "any Ampere or later GPU", "gpu": {"compute_capability": "8.6"}}
    runners.check_target(ampere, {"name": "L4", "compute_capability": "8.9"})
    with pytest.raises(DeployError, match="Ampere or later"):
        runners.check_target(ampere, {"name": "T4", "compute_capability": "7.5"})

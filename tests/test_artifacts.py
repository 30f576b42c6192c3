"""vitslim.artifacts: each kind (ONNX file, engine, run directory) knows its runner, input shape,
precision, digest and MAC fraction; the export report binds itself to the ONNX bytes it describes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_vit
from vitslim.deploy.errors import DeployError
from vitslim.export.errors import ExportError
from vitslim.export.onnx_export import export_plan
from vitslim.export.report import report_paths
from vitslim.pruning.plan import ModelSpec, dense_plan
from vitslim.pruning.run_dir import save_run

from vitslim.artifacts import (
    EngineArtifact,
    OnnxArtifact,
    RunArtifact,
    RunnerOptions,
    open_artifact,
)
from vitslim.core.files import sha256_of

SPEC = ModelSpec(
    "deit_tiny_patch16_224", dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5)
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A run directory and its export (dense plan of the tiny ViT)."""
    root = tmp_path_factory.mktemp("artifacts")
    model, plan = tiny_vit(), dense_plan(SPEC, 3)
    save_run(root / "run", plan, model)
    export_plan(model, plan, root / "m.onnx")
    return root


def test_each_kind_is_told_apart_by_what_the_path_is(exported):
    assert isinstance(open_artifact(exported / "run"), RunArtifact)
    assert isinstance(open_artifact(exported / "m.onnx"), OnnxArtifact)
    (exported / "x.engine").write_bytes(b"not checked until used")
    assert isinstance(open_artifact(exported / "x.engine"), EngineArtifact)
    with pytest.raises(
        DeployError, match="is an ONNX file \\(.onnx\\), not a run directory: give it with --backend onnxruntime"
    ):
        open_artifact(exported / "m.onnx", "torch")
    with pytest.raises(DeployError, match="does not exist: give an exported .onnx"):
        open_artifact(exported / "none.onnx")
    with pytest.raises(DeployError, match="unknown backend 'tflite'"):
        open_artifact(exported / "m.onnx", "tflite")


def test_onnx_and_run_agree_on_what_they_run(exported):
    onnx, run = OnnxArtifact(exported / "m.onnx"), RunArtifact(exported / "run")
    assert onnx.input_shape == run.input_shape == (3, 16, 16)
    assert onnx.precision() == run.precision(RunnerOptions()) == "fp32"
    assert run.precision(RunnerOptions(torch_dtype="bf16")) == "bf16"
    assert onnx.digest == sha256_of(exported / "m.onnx") and run.digest is None
    assert onnx.macs_fraction() == run.macs_fraction() == 1.0  # the dense plan, from the export report
    assert onnx.label == "onnxruntime:m.onnx" and run.label == "torch:run"
    images = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    with onnx.runner() as a, run.runner() as b:
        np.testing.assert_allclose(a.infer(images), b.infer(images), atol=1e-4)
    assert onnx.describe()["export_report"]["method"] == "dense" and run.describe()["macs_fraction"] == 1.0


def test_the_export_report_is_believed_only_for_the_bytes_it_describes(exported, tmp_path):
    onnx_path = tmp_path / "m.onnx"
    onnx_path.write_bytes((exported / "m.onnx").read_bytes())
    report_path = report_paths(onnx_path)[0]
    report = json.loads(report_paths(exported / "m.onnx")[0].read_text())
    assert report["report_version"] == 1
    report_path.write_text(json.dumps({**report, "onnx": {**report["onnx"], "sha256": "0" * 64}}))
    assert OnnxArtifact(onnx_path).macs_fraction() is None  # another export's report: not this file's MACs
    report_path.write_text(json.dumps({"source": {"file": "x.onnx"}, "onnx": {"file": "m.onnx"}}))
    assert OnnxArtifact(onnx_path).macs_fraction() is None  # an INT8 file's quantization report
    for broken in (
        {**report, "macs": float("nan")},
        {**report, "macs": report["macs_dense"] + 1},
        {**report, "macs_dense": True},
        {**report, "report_version": 2},
    ):
        report_path.write_text(json.dumps(broken))
        with pytest.raises(ExportError, match=f"export report {report_path}") as raised:
            OnnxArtifact(onnx_path).macs_fraction()
        assert "export m.onnx again" in str(raised.value)
    report_path.write_text("{")
    with pytest.raises(ExportError, match="is unreadable"):
        OnnxArtifact(onnx_path).macs_fraction()


def test_an_engine_finds_its_report_through_its_manifest_without_hashing_the_onnx(exported, monkeypatch):
    """The manifest's ONNX digest binds the report: no ONNX is hashed again (a large one takes seconds)."""
    engine = EngineArtifact(exported / "x.engine")
    digest = sha256_of(exported / "m.onnx")
    engine.__dict__["manifest"] = {"onnx": {"file": "m.onnx", "sha256": digest}}  # as check_engine returns it
    monkeypatch.setattr("vitslim.artifacts.sha256_of", lambda path: pytest.fail(f"hashed {path}"))
    assert engine.macs_fraction() == 1.0
    engine.__dict__["manifest"] = {"onnx": {"file": "m.onnx", "sha256": "f" * 64}}  # built from another export
    assert engine.macs_fraction() is None


def test_an_export_knows_the_run_it_was_made_from(exported, tmp_path):
    from vitslim.pruning.run_dir import load_run

    plan, model = load_run(exported / "run")
    onnx = OnnxArtifact(exported / "m.onnx")
    assert (
        onnx.made_from(plan, model)
        == "m.onnx: exported from this run (weights and plan digests match its export report)"
    )
    other = tiny_vit(seed=1)
    with pytest.raises(
        DeployError, match="was exported from another run \\(its export report's weights digest differs"
    ):
        onnx.made_from(plan, other)
    bare = tmp_path / "bare.onnx"
    bare.write_bytes((exported / "m.onnx").read_bytes())  # no report beside it
    assert "no export report records what it was made from" in OnnxArtifact(bare).made_from(plan, model)

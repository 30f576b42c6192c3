"""Engines built ahead of time with TensorRT-RTX on this CPU machine (full TensorRT where present)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_vit
from vitslim.deploy.build import BatchProfile, BuildSettings, engine_from_onnx, manifest_path_of
from vitslim.deploy.errors import DeployError
from vitslim.files import sha256_of
from vitslim.deploy.tensorrt_lib import find_tensorrt
from vitslim.export.onnx_export import export_plan
from vitslim.pruning.plan import BlockPlan, ModelSpec, dense_plan

TRT = find_tensorrt()
needs_builder = pytest.mark.skipif(TRT is None, reason="neither tensorrt nor tensorrt_rtx is installed")
SPEC = ModelSpec("deit_tiny_patch16_224")
IMAGES = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """Dense, channel-pruned (VTP-like), token-pruned (both layouts) and static/aggregated exports."""
    root = tmp_path_factory.mktemp("onnx")
    model = tiny_vit(depth=3)
    dense = dense_plan(SPEC, 3)
    channel = dense
    for block in range(3):
        channel = channel.with_block(block, BlockPlan(qkv_in=tuple(range(16)), proj_in=(0, 1, 2, 3, 16, 17, 18, 19), fc1_in=tuple(range(8, 32)), hidden=tuple(range(0, 128, 4))))
    tokens = dense.with_block(0, BlockPlan(kept_tokens=(0, 1, 2, 5, 6, 9))).with_block(1, BlockPlan(kept_tokens=(0, 2, 3))).with_block(2, BlockPlan(kept_tokens=(0,)))
    mixed = dense.with_block(0, BlockPlan(static_attention=torch.rand(2, 17, 17).softmax(-1))).with_block(1, BlockPlan(token_aggregation=torch.rand(4, 16)))
    files = {}
    for name, plan, layout in (("dense", dense, "gather"), ("channel", channel, "gather"), ("tokens", tokens, "gather"), ("tokens_slice", tokens, "slice"), ("mixed", mixed, "gather")):
        files[name] = export_plan(model, plan, root / f"{name}.onnx", images=IMAGES, token_layout=layout).onnx_path
    return files


@needs_builder
@pytest.mark.parametrize("name", ["dense", "channel", "tokens", "tokens_slice", "mixed"])
def test_every_exported_graph_builds_with_a_manifest(tmp_path, onnx_files, name):
    settings = BuildSettings(profiles=(BatchProfile(1, 4, 16), BatchProfile(32, 32, 64)), timing_cache=tmp_path / "timing.cache")
    result = engine_from_onnx(onnx_files[name], tmp_path / f"{name}.engine", settings)
    manifest = json.loads(manifest_path_of(result.engine_path).read_text())
    assert manifest == result.manifest
    assert manifest["library"] == TRT.name and manifest["version"] == TRT.version
    assert manifest["engine"]["sha256"] == sha256_of(result.engine_path) and manifest["engine"]["bytes"] == result.engine_path.stat().st_size
    assert manifest["onnx"]["sha256"] == sha256_of(onnx_files[name])
    assert manifest["profiles"] == [{"min": 1, "opt": 4, "max": 16}, {"min": 32, "opt": 32, "max": 64}]
    assert manifest["input"]["shape"] == [-1, 3, 16, 16]
    assert manifest["target"]["kind"] in ("portable (ahead of time)", "device-specific")


@needs_builder
def test_engine_shrinks_with_the_model(tmp_path):
    """A model whose weights (3.2 MB) outweigh the engine's kernels: halving the MLP and values shrinks it."""
    model = tiny_vit(embed_dim=256, num_heads=4, depth=3)
    dense = dense_plan(SPEC, 3)
    slim = dense
    for block in range(3):
        slim = slim.with_block(block, BlockPlan(proj_in=tuple(c for c in range(256) if c % 64 < 32), hidden=tuple(range(0, 1024, 2))))
    sizes, onnx_bytes = {}, {}
    for name, plan in (("dense", dense), ("slim", slim)):
        onnx_path = export_plan(model, plan, tmp_path / f"{name}.onnx", images=IMAGES).onnx_path
        onnx_bytes[name] = onnx_path.stat().st_size
        sizes[name] = engine_from_onnx(onnx_path, tmp_path / f"{name}.engine").manifest["engine"]["bytes"]
    # The engine carries the weights: at least half of the bytes the ONNX lost must leave the engine
    # too (kernel sizes vary with the library version, so no absolute byte counts).
    assert sizes["dense"] - sizes["slim"] >= 0.5 * (onnx_bytes["dense"] - onnx_bytes["slim"]) > 0


@needs_builder
def test_failed_build_leaves_no_engine(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(DeployError):
        engine_from_onnx(bad, tmp_path / "bad.engine")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


@needs_builder
def test_strongly_typed_library_refuses_fp16_flag_on_fp32_graph(tmp_path, onnx_files):
    if not TRT.strongly_typed:
        pytest.skip("TensorRT 10 builds fp16 from a builder flag")
    with pytest.raises(DeployError, match="strongly typed: the ONNX is fp32"):
        engine_from_onnx(onnx_files["dense"], tmp_path / "x.engine", BuildSettings(precision="fp16"))


@pytest.mark.parametrize("text", ["8:4:16", "a:b:c", "0:1:2", "1:2"])
def test_bad_profiles(text):
    with pytest.raises(DeployError, match="MIN:OPT:MAX"):
        BatchProfile.parse(text)
    assert BatchProfile.parse("4") == BatchProfile(4, 4, 4)


def test_missing_onnx(tmp_path):
    with pytest.raises(DeployError, match="does not exist"):
        engine_from_onnx(tmp_path / "none.onnx", tmp_path / "x.engine")


@needs_builder
def test_fp16_export_builds_a_smaller_engine(tmp_path):
    if not TRT.strongly_typed:
        pytest.skip("TensorRT 10 takes fp16 from a builder flag")
    model = tiny_vit(embed_dim=256, num_heads=4, depth=2)
    plan = dense_plan(SPEC, 2)
    sizes = {}
    for precision in ("fp32", "fp16"):
        onnx_path = export_plan(model, plan, tmp_path / f"{precision}.onnx", images=IMAGES, precision=precision).onnx_path
        sizes[precision] = engine_from_onnx(onnx_path, tmp_path / f"{precision}.engine", BuildSettings(precision=precision)).manifest
    assert sizes["fp16"]["precision"] == "fp16" and sizes["fp16"]["engine"]["bytes"] < sizes["fp32"]["engine"]["bytes"]


@needs_builder
def test_loading_checks_the_manifest_first(tmp_path, onnx_files):
    from vitslim.deploy.runners import TensorRTRunner, check_engine

    engine = engine_from_onnx(onnx_files["dense"], tmp_path / "m.engine").engine_path
    assert check_engine(engine)["engine"]["bytes"] == engine.stat().st_size
    manifest_path = manifest_path_of(engine)
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "version": "0.0.1"}))
    with pytest.raises(DeployError, match="built with .* 0.0.1 but .* is installed: rebuild it"):
        TensorRTRunner(engine)
    manifest_path.write_text(json.dumps(manifest))
    engine.write_bytes(engine.read_bytes()[:-1] + b"x")
    with pytest.raises(DeployError, match="changed since it was built"):
        check_engine(engine)
    manifest_path.unlink()
    with pytest.raises(DeployError, match="has no manifest"):
        check_engine(engine)

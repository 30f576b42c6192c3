"""Engines built ahead of time with TensorRT-RTX on this CPU machine (full TensorRT where present)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_vit
from vitslim.deploy.build import BatchProfile, BuildSettings, engine_from_onnx
from vitslim.deploy.errors import DeployError
from vitslim.deploy.manifest import manifest_path_of
from vitslim.deploy.tensorrt_lib import find_tensorrt
from vitslim.export.onnx_export import export_plan
from vitslim.pruning.plan import BlockPlan, ModelSpec, dense_plan

from vitslim.core.files import sha256_of

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
        channel = channel.with_block(
            block,
            BlockPlan(
                qkv_in=tuple(range(16)),
                proj_in=(0, 1, 2, 3, 16, 17, 18, 19),
                fc1_in=tuple(range(8, 32)),
                hidden=tuple(range(0, 128, 4)),
            ),
        )
    tokens = (
        dense.with_block(0, BlockPlan(kept_tokens=(0, 1, 2, 5, 6, 9)))
        .with_block(1, BlockPlan(kept_tokens=(0, 2, 3)))
        .with_block(2, BlockPlan(kept_tokens=(0,)))
    )
    mixed = dense.with_block(0, BlockPlan(static_attention=torch.rand(2, 17, 17).softmax(-1))).with_block(
        1, BlockPlan(token_aggregation=torch.rand(4, 16))
    )
    files = {}
    for name, plan, layout in (
        ("dense", dense, "gather"),
        ("channel", channel, "gather"),
        ("tokens", tokens, "gather"),
        ("tokens_slice", tokens, "slice"),
        ("mixed", mixed, "gather"),
    ):
        files[name] = export_plan(model, plan, root / f"{name}.onnx", images=IMAGES, token_layout=layout).onnx_path
    return files


@needs_builder
@pytest.mark.parametrize("name", ["dense", "channel", "tokens", "tokens_slice", "mixed"])
def test_every_exported_graph_builds_with_a_manifest(tmp_path, onnx_files, name):
    settings = BuildSettings(
        profiles=(BatchProfile(1, 4, 16), BatchProfile(32, 32, 64)), timing_cache=tmp_path / "timing.cache"
    )
    result = engine_from_onnx(onnx_files[name], tmp_path / f"{name}.engine", settings)
    manifest = json.loads(manifest_path_of(result.engine_path).read_text())
    assert manifest == result.manifest
    assert manifest["library"] == TRT.name and manifest["version"] == TRT.version
    assert (
        manifest["engine"]["sha256"] == sha256_of(result.engine_path)
        and manifest["engine"]["bytes"] == result.engine_path.stat().st_size
    )
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
        slim = slim.with_block(
            block, BlockPlan(proj_in=tuple(c for c in range(256) if c % 64 < 32), hidden=tuple(range(0, 1024, 2)))
        )
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
def test_the_onnx_decides_the_precision(tmp_path, onnx_files):
    """Strongly typed on every library: asking for another precision than the ONNX's is refused,
    TF32 only for fp32 graphs."""
    with pytest.raises(DeployError, match="the ONNX is fp32 and every build is strongly typed"):
        engine_from_onnx(onnx_files["dense"], tmp_path / "x.engine", BuildSettings(precision="fp16"))
    assert not list(tmp_path.iterdir())


@needs_builder
def test_build_options_land_in_the_manifest(tmp_path, onnx_files):
    full = TRT.name == "tensorrt"
    settings = BuildSettings(
        tf32=True,
        optimization_level=2,
        version_compatible=full,
        hardware_compatibility="ampere+" if full else "none",
        compute_capabilities=("SM86", "SM89") if TRT.name == "tensorrt_rtx" else (),
    )
    manifest = engine_from_onnx(onnx_files["channel"], tmp_path / "x.engine", settings).manifest
    assert manifest["manifest_version"] == 3 and manifest["precision"] == "fp32" and manifest["tolerance"] == "tf32"
    assert (
        manifest["build_options"] == settings.options()
        and manifest["build_options"]["tf32"]
        and manifest["build_options"]["optimization_level"] == 2
    )
    if not full:
        assert manifest["target"]["compute_capabilities"] == ["SM86", "SM89"]
        with pytest.raises(DeployError, match="--version-compatible is for full TensorRT"):
            engine_from_onnx(onnx_files["channel"], tmp_path / "z.engine", BuildSettings(version_compatible=True))
    default = engine_from_onnx(onnx_files["channel"], tmp_path / "y.engine").manifest
    assert default["tolerance"] == "fp32" and default["build_options"]["tf32"] is False


def test_bad_build_options_are_refused():
    for options, message in (
        (dict(optimization_level=7), "must be in 0..5"),
        (dict(hardware_compatibility="volta"), "is not one of"),
        (dict(dla_core=-1), "must be >= 0"),
        (dict(precision="int4"), "is not one of"),
        (dict(workspace_mb=0), "must be >= 1"),
    ):
        with pytest.raises(DeployError, match=message):
            BuildSettings(**options)


@needs_builder
def test_timing_cache_from_elsewhere_is_not_used_and_says_why(tmp_path, onnx_files, caplog):
    if TRT.name == "tensorrt_rtx" and not hasattr(
        TRT.module.Builder(TRT.logger()).create_builder_config(), "create_timing_cache"
    ):
        pytest.skip("no timing cache in this library")
    cache = tmp_path / "timing.cache"
    first = engine_from_onnx(onnx_files["dense"], tmp_path / "a.engine", BuildSettings(timing_cache=cache)).manifest
    assert (
        first["timing_cache"]["used"] is False and first["timing_cache"]["reason"] == "no cache yet" and cache.is_file()
    )
    second = engine_from_onnx(onnx_files["dense"], tmp_path / "b.engine", BuildSettings(timing_cache=cache)).manifest
    assert second["timing_cache"]["used"] is True
    key = json.loads((tmp_path / "timing.cache.json").read_text())
    (tmp_path / "timing.cache.json").write_text(
        json.dumps({**key, "gpu": {"name": "another GPU", "compute_capability": "7.5"}})
    )
    caplog.clear()
    third = engine_from_onnx(onnx_files["dense"], tmp_path / "c.engine", BuildSettings(timing_cache=cache)).manifest
    assert third["timing_cache"]["used"] is False and "another GPU" in third["timing_cache"]["reason"]
    assert "timing cache" in caplog.text and json.loads((tmp_path / "timing.cache.json").read_text()) == key


@needs_builder
def test_engine_cache_reuses_an_engine_built_for_the_same_inputs(tmp_path, onnx_files):
    from vitslim.deploy.build import cached_engine

    settings = BuildSettings(profiles=(BatchProfile(1, 2, 4),))
    first, reused = cached_engine(onnx_files["tokens"], tmp_path / "a.engine", settings, tmp_path / "cache")
    assert not reused and len(list((tmp_path / "cache").glob("*.engine"))) == 1
    second, reused = cached_engine(onnx_files["tokens"], tmp_path / "b.engine", settings, tmp_path / "cache")
    assert reused and (tmp_path / "b.engine").read_bytes() == (tmp_path / "a.engine").read_bytes()
    assert second.manifest["engine"]["file"] == "b.engine"
    other, reused = cached_engine(
        onnx_files["tokens"],
        tmp_path / "c.engine",
        BuildSettings(profiles=(BatchProfile(1, 4, 8),)),
        tmp_path / "cache",
    )
    assert not reused and len(list((tmp_path / "cache").glob("*.engine"))) == 2
    # another engine and its manifest copied over an entry: rebuilt, not trusted by its own word (issue 23)
    entries = sorted((tmp_path / "cache").glob("*.engine"))
    victim, intruder = entries[0], entries[1]
    victim.write_bytes(intruder.read_bytes())
    manifest_path_of(victim).write_text(manifest_path_of(intruder).read_text())
    again, reused = cached_engine(onnx_files["tokens"], tmp_path / "d.engine", settings, tmp_path / "cache")
    assert not reused and [str(BatchProfile(**p)) for p in again.manifest["profiles"]] == ["1:2:4"]


@needs_builder
def test_a_renamed_engine_and_manifest_pair_is_refused(tmp_path, onnx_files):
    """A manifest names its engine file: a pair renamed together no longer describes itself."""
    from vitslim.deploy.manifest import read_manifest

    built = engine_from_onnx(
        onnx_files["dense"], tmp_path / "a.engine", BuildSettings(profiles=(BatchProfile(1, 2, 4),))
    )
    assert read_manifest(built.engine_path)["engine"]["file"] == "a.engine"
    (tmp_path / "a.engine").rename(tmp_path / "b.engine")
    manifest_path_of(tmp_path / "a.engine").rename(manifest_path_of(tmp_path / "b.engine"))
    with pytest.raises(DeployError, match="describes 'a.engine', not b.engine"):
        read_manifest(tmp_path / "b.engine")
    manifest = json.loads(manifest_path_of(tmp_path / "b.engine").read_text())
    manifest["engine"]["file"], manifest["target"]["kind"] = "b.engine", "any GPU you like"
    manifest_path_of(tmp_path / "b.engine").write_text(json.dumps(manifest))
    with pytest.raises(DeployError, match="unknown target kind"):
        read_manifest(tmp_path / "b.engine")


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
    model = tiny_vit(embed_dim=256, num_heads=4, depth=2)
    plan = dense_plan(SPEC, 2)
    sizes = {}
    for precision in ("fp32", "fp16"):
        onnx_path = export_plan(
            model, plan, tmp_path / f"{precision}.onnx", images=IMAGES, precision=precision
        ).onnx_path
        sizes[precision] = engine_from_onnx(onnx_path, tmp_path / f"{precision}.engine").manifest
    assert sizes["fp16"]["precision"] == "fp16" and sizes["fp16"]["engine"]["bytes"] < sizes["fp32"]["engine"]["bytes"]


@needs_builder
def test_loading_checks_the_manifest_first(tmp_path, onnx_files):
    from vitslim.deploy.manifest import check_engine
    from vitslim.deploy.runners import TensorRTRunner

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
    for broken, message in (
        ('{"engine": {', "is unreadable"),
        (json.dumps({"library": "tensorrt_rtx"}), "lacks manifest_version"),
        (json.dumps({**manifest, "manifest_version": 1}), "has version 1, this vitslim reads 3"),
    ):
        manifest_path.write_text(broken)
        with pytest.raises(DeployError, match=message):
            check_engine(engine)
    manifest_path.unlink()
    with pytest.raises(DeployError, match="has no manifest"):
        check_engine(engine)


@needs_builder
def test_attention_forms_build_and_the_manifest_records_them(tmp_path):
    """The Attention op builds for rectangular queries and narrower value heads, in fp32 and fp16
    (attention layers marked decomposable); the manifest says how the network was typed and
    written; an onnxruntime-only form is refused in one line that names the form to use."""
    model = tiny_vit(depth=3)
    plan = dense_plan(SPEC, 3)
    for block in range(3):
        plan = plan.with_block(
            block,
            BlockPlan(kept_tokens=(0, 1, 2, 5, 6, 9) if block == 0 else None, proj_in=(0, 1, 2, 3, 16, 17, 18, 19)),
        )
    has_attention_layer = TRT.has_attention_layer
    for form, precision in (("attention-op", "fp32"), ("attention-op", "fp16"), ("matmul-softmax", "fp16")):
        onnx_path = export_plan(
            model, plan, tmp_path / f"{form}-{precision}.onnx", images=IMAGES, attention=form, precision=precision
        ).onnx_path
        manifest = engine_from_onnx(onnx_path, tmp_path / f"{form}-{precision}.engine").manifest
        layers = 3 if form == "attention-op" and has_attention_layer else 0
        assert manifest["network"] == {"typing": "strongly typed", "attention_form": form, "attention_layers": layers}
    mha = export_plan(model, plan, tmp_path / "mha.onnx", images=IMAGES, attention="ort-mha").onnx_path
    with pytest.raises(
        DeployError,
        match="com.microsoft.MultiHeadAttention, which TensorRT cannot parse: export with --attention attention-op",
    ):
        engine_from_onnx(mha, tmp_path / "mha.engine")
    assert not (tmp_path / "mha.engine").exists()


@pytest.mark.parametrize("where", ["symlink", "parent", "absolute"])
def test_external_weights_outside_the_onnx_folder_are_refused(tmp_path, onnx_files, where):
    """An ONNX from elsewhere must not read any file into an engine through its external data."""
    import onnx
    from vitslim.deploy.build import read_onnx

    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(
        onnx.load(str(onnx_files["dense"])),
        str(folder / "m.onnx"),
        save_as_external_data=True,
        location="w.bin",
        size_threshold=0,
    )
    assert read_onnx(folder / "m.onnx").graph.initializer  # its own weights file beside it: fine
    (folder / "w.bin").rename(tmp_path / "w.bin")
    if where == "symlink":
        (folder / "w.bin").symlink_to(tmp_path / "w.bin")
    else:
        model = onnx.load(str(folder / "m.onnx"), load_external_data=False)
        for tensor in model.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = "../w.bin" if where == "parent" else str(tmp_path / "w.bin")
        onnx.save(model, str(folder / "m.onnx"))
    with pytest.raises(DeployError, match="absolute paths, '..' and links are refused"):
        read_onnx(folder / "m.onnx")

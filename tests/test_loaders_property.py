"""Every loader of a file format against hostile edits of a valid file: one value, anywhere in
the document, replaced by something malformed, non-finite, huge or path-like (or removed). A
loader either accepts the document or refuses it with a VitslimError (one line, exit 3); any
other exception is a bug this test exists to find. Few examples by default, many with
--hypothesis-profile nightly."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vitslim.cli import main
from vitslim.core.errors import VitslimError

HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["../../outside", "/etc/passwd", "a\nb", "", "1:8:32", "fp16", "tensorrt_rtx"]),
    st.lists(st.one_of(st.integers(-3, 3), st.floats(allow_nan=True)), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
    st.just([[[[[[[[]]]]]]]]),
)
SHARED = settings(
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.large_base_example],
    deadline=None,
)


def mutate(document, data):
    """`document` with one value (found by walking a random path) replaced by a hostile one, or
    a mapping's key removed."""
    document = copy.deepcopy(document)
    node = document
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
        if not keys:
            return data.draw(HOSTILE)
        key = data.draw(st.sampled_from(keys))
        child = node[key]
        if not isinstance(child, (dict, list)) or not child or data.draw(st.booleans()):
            if isinstance(node, dict) and data.draw(st.booleans()):
                del node[key]
            else:
                node[key] = data.draw(HOSTILE)
            return document


def loads_or_refuses(load) -> None:
    """`load()` returns, or refuses with a VitslimError, which the CLI prints as one line (a
    message may quote what the file says, line breaks included: the CLI escapes them)."""
    from vitslim.cli import one_line

    try:
        load()
    except VitslimError as error:
        assert "\n" not in one_line(error)


@pytest.fixture(scope="module")
def originals(tmp_path_factory, tiny_run):
    """Valid files to start from: a run, its export (and report), results, a kit, an engine."""
    root = tmp_path_factory.mktemp("originals")
    shutil.copytree(tiny_run, root / "run")
    assert main(["export", str(root / "run"), "--out", str(root / "model.onnx")]) == 0
    quick = ["--warmup-seconds", "0", "--min-seconds", "0.05", "--min-iterations", "3", "--max-rounds", "1"]
    argv = ["bench", str(root / "model.onnx"), "--backend", "onnxruntime", "--batch", "1", *quick]
    assert main([*argv, "--json", str(root / "results.json")]) == 0
    assert main(["kit", str(root / "model.onnx"), "--out", str(root / "kit")]) == 0
    from vitslim.deploy.tensorrt_lib import find_tensorrt

    if find_tensorrt() is not None:
        assert main(["build", str(root / "model.onnx"), "--batch", "1:2:4", "--out", str(root / "model.engine")]) == 0
    return root


def _edited(original, name: str, data, tmp_path):
    """A copy of `original`'s folder entry `name` (a JSON file) with one hostile edit, under tmp_path."""
    document = json.loads(original.read_text())
    edited = tmp_path / name
    edited.parent.mkdir(parents=True, exist_ok=True)
    edited.write_text(json.dumps(mutate(document, data)))
    return edited


@SHARED
@given(data=st.data())
def test_plan_json(originals, tmp_path_factory, data):
    from vitslim.pruning.run_dir import load_run

    run = tmp_path_factory.mktemp("plan") / "run"
    shutil.copytree(originals / "run", run)
    _edited(originals / "run" / "plan.json", "run/plan.json", data, run.parent)
    loads_or_refuses(lambda: load_run(run))


@SHARED
@given(data=st.data())
def test_run_info(originals, tmp_path_factory, data):
    from vitslim.pruning.run_dir import read_info

    folder = tmp_path_factory.mktemp("info")
    _edited(originals / "run" / "info.json", "info.json", data, folder)
    loads_or_refuses(lambda: read_info(folder))


@SHARED
@given(data=st.data())
def test_export_report(originals, tmp_path_factory, data):
    from vitslim.artifacts import OnnxArtifact

    folder = tmp_path_factory.mktemp("report")
    shutil.copy(originals / "model.onnx", folder / "model.onnx")
    _edited(originals / "model.report.json", "model.report.json", data, folder)
    onnx = OnnxArtifact(folder / "model.onnx")
    loads_or_refuses(lambda: (onnx.macs_fraction(), onnx.describe()))


@SHARED
@given(data=st.data())
def test_benchmark_results(originals, tmp_path_factory, data):
    from vitslim.deploy.results import load_results

    folder = tmp_path_factory.mktemp("results")
    loads_or_refuses(lambda: load_results(_edited(originals / "results.json", "results.json", data, folder)))


@SHARED
@given(data=st.data())
def test_kit(originals, tmp_path_factory, data):
    from vitslim.selftest import read_kit

    folder = tmp_path_factory.mktemp("kit") / "kit"
    shutil.copytree(originals / "kit", folder)
    _edited(originals / "kit" / "kit.json", "kit/kit.json", data, folder.parent)
    loads_or_refuses(lambda: read_kit(folder))


@SHARED
@given(data=st.data())
def test_engine_manifest(originals, tmp_path_factory, data):
    from vitslim.deploy.manifest import check_engine

    if not (originals / "model.engine").is_file():
        pytest.skip("no TensorRT here to build an engine (pip install tensorrt-rtx)")
    folder = tmp_path_factory.mktemp("engine")
    shutil.copy(originals / "model.engine", folder / "model.engine")
    _edited(originals / "model.engine.json", "model.engine.json", data, folder)
    from vitslim.artifacts import EngineArtifact

    def use():  # what bench, compare, eval and inspect read of a checked manifest
        engine = EngineArtifact(folder / "model.engine")
        engine.__dict__["manifest"] = check_engine(folder / "model.engine")
        engine.check_batches([engine.manifest["profiles"][0]["opt"]])
        return engine.input_shape, engine.precision(), engine.tolerance, engine.macs_fraction(), engine.describe(False)

    loads_or_refuses(use)


@SHARED
@given(data=st.data())
def test_recipe(data):
    import yaml

    from vitslim.recipe import DEFAULT_RECIPE_YAML, recipe_from_dict

    loads_or_refuses(lambda: recipe_from_dict(mutate(yaml.safe_load(DEFAULT_RECIPE_YAML), data)))


def test_the_reference_arrays_of_a_kit_are_checked_too(originals, tmp_path):
    from vitslim.selftest import read_kit

    shutil.copytree(originals / "kit", tmp_path / "kit")
    reference = next((tmp_path / "kit").glob("*.npz"))
    np.savez(reference, nothing=np.zeros(1))
    loads_or_refuses(lambda: read_kit(tmp_path / "kit"))

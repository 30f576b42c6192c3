"""`vitslim selftest` where no GPU is present (builds checked, exit 2), its verdict rules, and
`vitslim inspect` with the preprocessing that travels in the ONNX metadata and engine manifest."""

from __future__ import annotations

import json

import pytest
from vitslim.deploy.errors import DeployError

from vitslim import selftest
from vitslim.cli import main


def test_verdicts():
    gpu, no_gpu = selftest.Check("GPU present", "-", True, "H100"), selftest.Check("GPU present", "-", None, "none")
    ok, bad, skipped = (selftest.Check("x", "lib", value, "") for value in (True, False, None))
    assert selftest.exit_code([gpu, ok]) == selftest.PASS
    assert selftest.exit_code([gpu, ok, bad]) == selftest.FAIL
    assert selftest.exit_code([no_gpu, ok, skipped]) == selftest.NO_GPU
    assert selftest.exit_code([no_gpu, bad]) == selftest.FAIL
    assert "| x | lib | skipped |" in selftest.table([no_gpu, skipped])


def test_the_tiny_plan_is_valid_and_uses_every_selection():
    from vitslim.pruning.plan import validate

    model, plan = selftest.tiny_model_and_plan()
    validate(plan, model)
    used = {
        field
        for block in plan.blocks
        for field in ("kept_tokens", "qkv_in", "proj_in", "fc1_in", "hidden")
        if getattr(block, field) is not None
    }
    assert used == {"kept_tokens", "qkv_in", "proj_in", "fc1_in", "hidden"}


def test_selftest_without_a_gpu_checks_the_builds_and_exits_2(tmp_path, capsys):
    from vitslim.deploy.gpu import gpu_info
    from vitslim.deploy.tensorrt_lib import find_tensorrt

    if gpu_info() is not None or find_tensorrt() is None:
        pytest.skip("for a machine with TensorRT(-RTX) installed and no GPU")
    code = main(["selftest", "--work", str(tmp_path / "work"), "--json", str(tmp_path / "checks.json")])
    out = capsys.readouterr().out
    assert code == 2 and "no NVIDIA GPU here" in out
    checks = json.loads((tmp_path / "checks.json").read_text())["checks"]
    builds = [c for c in checks if "builds strongly typed" in c["check"]]
    assert len(builds) == 4 and all(
        c["passed"] for c in builds
    )  # fp32 and fp16, in both attention forms TensorRT parses
    assert all(c["passed"] is None for c in checks if c["check"].endswith("runs"))


def test_prepared_selftest_needs_its_reference(tmp_path):
    from vitslim.deploy.tensorrt_lib import find_tensorrt

    if find_tensorrt() is None:
        pytest.skip("no TensorRT installed")
    with pytest.raises(DeployError, match="holds no kit.json"):
        selftest.run_checks(tmp_path)


def test_inspect_shows_preprocessing_and_compare_refuses_other_data(tmp_path, capsys, tiny_run):
    run = tiny_run
    assert (
        main(["export", str(run), "--out", str(tmp_path / "m.onnx")]) == 0
    )  # the run's data (digits) from its info.json
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "m.onnx"), "--json"]) == 0
    description = json.loads(capsys.readouterr().out)
    assert description["preprocessing"]["source"] == "digits" and description["preprocessing"]["mean"] == [
        0.5,
        0.5,
        0.5,
    ]
    assert description["inputs"][0]["shape"] == ["batch", 3, 16, 16] and description["export_report"]["macs"] > 0
    assert main(["inspect", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["macs_fraction"] == 1.0
    # an ImageFolder of 16x16 images is prepared with ImageNet statistics: not what this model was exported for
    from PIL import Image

    for label in ("a", "b", "c", "d", "e", "f", "g", "h", "i", "j"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for index in range(2):
            Image.new("RGB", (16, 16), (index * 90, 20, 0)).save(tmp_path / "data" / label / f"{index}.png")
    assert main(["compare", str(run), "--onnx", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "data")]) == 3
    assert "was made for" in capsys.readouterr().err
    assert main(["compare", str(run), "--onnx", str(tmp_path / "m.onnx"), "--data", "digits", "--batch", "2"]) == 0
    assert "| onnxruntime | fp32 | 2 |" in capsys.readouterr().out


def test_a_kit_for_another_device_builds_and_is_checked_like_the_selftest(tmp_path, capsys, tiny_run):
    from vitslim.deploy.tensorrt_lib import find_tensorrt

    assert main(["export", str(tiny_run), "--out", str(tmp_path / "m.onnx")]) == 0
    assert (
        main(["kit", str(tmp_path / "m.onnx"), "--batch", "1:2:4", "--dla-core", "0", "--out", str(tmp_path / "kit")])
        == 0
    )
    kit = json.loads((tmp_path / "kit" / "kit.json").read_text())
    assert kit["build"] == {"dla_core": 0}  # what was asked; the rest are BuildSettings defaults
    assert (
        kit["models"][0]["profiles"] == ["1:2:4"]
        and kit["models"][0]["inside"] == [2]
        and kit["models"][0]["outside"] == 5
    )
    script = (tmp_path / "kit" / "run_on_device.sh").read_text()
    assert "vitslim selftest --prepared ." in script and (tmp_path / "kit" / "m.onnx").is_file()
    if find_tensorrt() is None:
        return
    assert main(["kit", str(tmp_path / "m.onnx"), "--batch", "1:2:4", "--out", str(tmp_path / "kit-gpu")]) == 0
    capsys.readouterr()
    code = main(["selftest", "--prepared", str(tmp_path / "kit-gpu")])
    out = capsys.readouterr().out
    assert code == 2 and "| m: builds strongly typed, manifest right | tensorrt_rtx" in out and "FAIL" not in out


@pytest.fixture(scope="module")
def prepared_kit(tmp_path_factory):
    return selftest.prepare(tmp_path_factory.mktemp("kit"), progress=lambda message: None)


def test_onnxruntime_checks_say_what_is_missing_without_onnxruntime_gpu(prepared_kit):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    kit, reference = selftest.read_kit(prepared_kit)
    [check] = selftest.onnxruntime_checks(prepared_kit, kit, reference)
    assert check.passed is None and "pip install onnxruntime-gpu" in check.detail


@pytest.mark.gpu
def test_onnxruntime_checks_pass_on_the_cuda_provider(prepared_kit):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime here has no CUDA provider (install onnxruntime-gpu)")
    kit, reference = selftest.read_kit(prepared_kit)
    checks = selftest.onnxruntime_checks(prepared_kit, kit, reference)
    # per model (fp32, fp16; two attention forms): two batches and a timing, with and without CUDA graphs
    assert len(checks) == 4 * 2 * 3 and all(check.passed for check in checks), selftest.table(checks)


def test_a_tensorrt_without_an_attention_layer_skips_the_attention_op_models_and_says_why(prepared_kit, monkeypatch):
    """TensorRT before 10.14 (JetPack 6, older NGC images) cannot parse the ONNX Attention op:
    the selftest skips those models with the fix instead of failing, and still checks the chain."""
    import dataclasses
    import types

    from vitslim.deploy.gpu import gpu_info
    from vitslim.deploy.tensorrt_lib import find_tensorrt

    real = find_tensorrt()
    if real is None or gpu_info() is not None:
        pytest.skip("for a machine with TensorRT(-RTX) installed and no GPU")
    kinds = types.SimpleNamespace(
        **{k: v for k, v in vars(real.module.LayerType).items() if not k.startswith("ATTENTION")}
    )
    older = dataclasses.replace(real, module=types.SimpleNamespace(LayerType=kinds))
    monkeypatch.setattr(selftest, "find_tensorrt", lambda name=None: older)
    checks = selftest.run_checks(prepared_kit, library=real.name, progress=lambda message: None)
    skipped = [c for c in checks if c.passed is None and "no attention layer" in c.detail]
    built = [c for c in checks if "builds strongly typed" in c.check]
    assert len(skipped) == 2 and "--attention matmul-softmax" in skipped[0].detail
    assert [c.check.split(":")[0] for c in built] == ["tiny-fp32-matmul-softmax", "tiny-fp16-matmul-softmax"] and all(
        c.passed for c in built
    )


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(name="../../outside"), "is not a plain name"),
        (lambda m: m.update(name="/tmp/x"), "is not a plain name"),
        (lambda m: m.update(onnx="/etc/hostname"), "is not a file in"),
        (lambda m: m.update(onnx="../m.onnx"), "is not a file in"),
        (lambda m: m.update(inside=[2.5]), "batches must be integers"),
        (lambda m: m.update(outside=10**9), "batches must be integers"),
    ],
    ids=["name-escapes", "name-absolute", "onnx-absolute", "onnx-escapes", "float-batch", "huge-batch"],
)
def test_a_kit_names_only_files_inside_itself(tmp_path, prepared_kit, edit, message):
    """A kit comes from another machine: its names never become paths outside it (issue 23)."""
    import shutil

    kit_dir = tmp_path / "kit"
    shutil.copytree(prepared_kit, kit_dir)
    kit = json.loads((kit_dir / "kit.json").read_text())
    edit(kit["models"][0])
    (kit_dir / "kit.json").write_text(json.dumps(kit))
    with pytest.raises(DeployError, match=message):
        selftest.read_kit(kit_dir)


def test_a_kit_onnx_that_is_a_link_is_refused(tmp_path, prepared_kit):
    import shutil

    kit_dir = tmp_path / "kit"
    shutil.copytree(prepared_kit, kit_dir)
    kit = json.loads((kit_dir / "kit.json").read_text())
    onnx = kit_dir / kit["models"][0]["onnx"]
    onnx.rename(tmp_path / "real.onnx")
    onnx.symlink_to(tmp_path / "real.onnx")
    with pytest.raises(DeployError, match="links are refused"):
        selftest.read_kit(kit_dir)

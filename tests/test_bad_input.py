"""Every command answers bad input with one line that names the problem and the fix, exit code 3
(vitslim.core.errors.EXIT_BAD_INPUT), no traceback, and no change to any file that existed before.

Each case is (id, setup, argv, expected text). `setup(tmp, artifacts)` makes the bad file in the
case's own directory; `{tmp}` and `{art}` in argv are that directory and the shared, valid
artifacts (a tiny dense run, its ONNX, an engine where TensorRT-RTX is installed, a bench result).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny import TINY_MODEL

from vitslim.cli import main
from vitslim.core.errors import EXIT_BAD_INPUT

QUICK_BENCH = ["--warmup-seconds", "0", "--min-seconds", "0", "--min-iterations", "2", "--max-rounds", "1"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_run):
    """Valid inputs the cases start from: run/, model.onnx, results.json, and model.engine if
    TensorRT-RTX can build here."""
    art = tmp_path_factory.mktemp("artifacts")
    shutil.copytree(tiny_run, art / "run")
    assert main(["export", str(art / "run"), "--out", str(art / "model.onnx")]) == 0
    assert (
        main(
            [
                "bench",
                str(art / "model.onnx"),
                "--backend",
                "onnxruntime",
                "--batch",
                "1",
                *QUICK_BENCH,
                "--json",
                str(art / "results.json"),
            ]
        )
        == 0
    )
    from vitslim.deploy.tensorrt_lib import find_tensorrt

    if find_tensorrt() is not None:
        assert main(["build", str(art / "model.onnx"), "--batch", "1:2:4", "--out", str(art / "model.engine")]) == 0
    return art


# ------------------------------------------------------------------ setups: each makes one bad file


def random_bytes(name: str, size: int = 4096):
    def make(tmp: Path, art: Path) -> None:
        (tmp / name).write_bytes(bytes(range(256)) * (size // 256))

    return make


def truncated(source: str, name: str):
    def make(tmp: Path, art: Path) -> None:
        data = (art / source).read_bytes()
        (tmp / name).write_bytes(data[: len(data) // 2])

    return make


def text(name: str, content: str):
    def make(tmp: Path, art: Path) -> None:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(content)

    return make


def run_copy(edit=None, plan_edit=None):
    """A copy of the tiny run in tmp/run, with `edit(run_dir)` or `plan_edit(plan dict)` applied."""

    def make(tmp: Path, art: Path) -> None:
        shutil.copytree(art / "run", tmp / "run")
        if plan_edit is not None:
            plan = json.loads((tmp / "run" / "plan.json").read_text())
            plan_edit(plan)
            (tmp / "run" / "plan.json").write_text(json.dumps(plan))
        if edit is not None:
            edit(tmp / "run")

    return make


def block0(**fields):
    def edit(plan: dict) -> None:
        plan["blocks"][0].update(fields)

    return edit


def other_architecture(tmp: Path, art: Path) -> None:
    """Weights of a 3-block model."""
    from conftest import tiny_vit
    from safetensors.torch import save_file

    save_file(tiny_vit(depth=3, num_classes=10).state_dict(), str(tmp / "deeper.safetensors"))


def image_folder(with_images: bool, corrupt: bool = False):
    def make(tmp: Path, art: Path) -> None:
        for label in ("a", "b"):
            folder = tmp / "data" / label
            folder.mkdir(parents=True)
            if with_images:
                from PIL import Image

                for index in range(3):
                    Image.new("RGB", (20, 20), (index * 40, 0, 0)).save(folder / f"{index}.png")
            else:
                (folder / "notes.txt").write_text("not an image")
        if corrupt:
            (tmp / "data" / "a" / "9.png").write_bytes(b"\x89PNG broken")

    return make


def linked_image_folder(tmp: Path, art: Path) -> None:
    """An ImageFolder whose class folder links back to the data folder (a loop)."""
    image_folder(with_images=True)(tmp, art)
    (tmp / "data" / "a" / "loop").symlink_to(tmp / "data", target_is_directory=True)


def empty_dir(name: str):
    def make(tmp: Path, art: Path) -> None:
        (tmp / name).mkdir()

    return make


def engine_copy(edit):
    def make(tmp: Path, art: Path) -> None:
        if not (art / "model.engine").is_file():
            pytest.skip("no TensorRT here to build an engine (pip install tensorrt-rtx)")
        shutil.copy(art / "model.engine", tmp / "model.engine")
        shutil.copy(art / "model.engine.json", tmp / "model.engine.json")
        edit(tmp)

    return make


def results_edit(edit):
    def make(tmp: Path, art: Path) -> None:
        data = json.loads((art / "results.json").read_text())
        edit(data)
        (tmp / "results.json").write_text(json.dumps(data))

    return make


def onnx_of_other_size(tmp: Path, art: Path) -> None:
    other = [
        "--model",
        "deit_tiny_patch16_224",
        "--model-kwargs",
        "img_size=32",
        "patch_size=8",
        "embed_dim=32",
        "depth=1",
        "num_heads=2",
        "num_classes=10",
    ]
    assert main(["export", *other, "--out", str(tmp / "other.onnx")]) == 0


def small_static_attention(run: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"blocks.0.static_attention": torch.zeros(2, 3, 3)}, str(run / "plan.safetensors"))


def fresh_vtp_run(tmp: Path, art: Path) -> None:
    """A copy of the run whose plan narrows channels, as VTP's does (VTP cannot start from it)."""
    run_copy(plan_edit=block0(hidden=list(range(64))))(tmp, art)


def quantized_copy(tmp: Path, art: Path) -> None:
    import numpy as np
    from vitslim.export.quantize import quantize_int8

    quantize_int8(
        art / "model.onnx", tmp / "q.onnx", np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    )


def plain_onnx(tmp: Path, art: Path) -> None:
    import onnx

    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])],
    )
    onnx.save(onnx.helper.make_model(graph), str(tmp / "plain.onnx"))


CASES = [
    # train
    ("train-no-data", None, ["train", *TINY_MODEL, "--out", "{tmp}/r"], "the following arguments are required: --data"),
    (
        "train-missing-data",
        None,
        ["train", *TINY_MODEL, "--data", "{tmp}/nowhere", "--out", "{tmp}/r"],
        "neither 'digits' nor a readable directory",
    ),
    (
        "train-data-is-file",
        text("d.txt", "x"),
        ["train", *TINY_MODEL, "--data", "{tmp}/d.txt", "--out", "{tmp}/r"],
        "neither 'digits' nor a readable directory",
    ),
    (
        "train-empty-data",
        empty_dir("data"),
        ["train", *TINY_MODEL, "--data", "{tmp}/data", "--out", "{tmp}/r"],
        "is not an ImageFolder",
    ),
    (
        "train-imageless-data",
        image_folder(False),
        ["train", *TINY_MODEL, "--data", "{tmp}/data", "--out", "{tmp}/r"],
        "is not an ImageFolder",
    ),
    (
        "train-unreadable-image",
        image_folder(True, corrupt=True),
        [
            "train",
            *TINY_MODEL[:-1],
            "num_classes=2",
            "--data",
            "{tmp}/data",
            "--epochs",
            "1",
            "--num-workers",
            "0",
            "--out",
            "{tmp}/r",
        ],
        "cannot be read",
    ),
    (
        "train-class-count",
        None,
        ["train", *TINY_MODEL[:-1], "num_classes=5", "--data", "digits", "--out", "{tmp}/r"],
        "model has 5 classes but data 'digits' has 10",
    ),
    (
        "train-missing-checkpoint",
        None,
        ["train", *TINY_MODEL, "--data", "digits", "--checkpoint", "{tmp}/no.safetensors", "--out", "{tmp}/r"],
        "does not exist",
    ),
    (
        "train-random-checkpoint",
        random_bytes("w.safetensors"),
        ["train", *TINY_MODEL, "--data", "digits", "--checkpoint", "{tmp}/w.safetensors", "--out", "{tmp}/r"],
        "unreadable or corrupt",
    ),
    (
        "train-random-pth",
        random_bytes("w.pth"),
        ["train", *TINY_MODEL, "--data", "digits", "--checkpoint", "{tmp}/w.pth", "--out", "{tmp}/r"],
        "unreadable or corrupt",
    ),
    (
        "train-truncated-checkpoint",
        truncated("run/weights.safetensors", "w.safetensors"),
        ["train", *TINY_MODEL, "--data", "digits", "--checkpoint", "{tmp}/w.safetensors", "--out", "{tmp}/r"],
        "unreadable or corrupt",
    ),
    (
        "train-checkpoint-other-architecture",
        other_architecture,
        ["train", *TINY_MODEL, "--data", "digits", "--checkpoint", "{tmp}/deeper.safetensors", "--out", "{tmp}/r"],
        "unexpected blocks.2",
    ),
    (
        "train-checkpoint-is-directory",
        empty_dir("ckpt"),
        ["train", *TINY_MODEL, "--data", "digits", "--checkpoint", "{tmp}/ckpt", "--out", "{tmp}/r"],
        "is a directory",
    ),
    (
        "train-negative-epochs",
        None,
        ["train", *TINY_MODEL, "--data", "digits", "--epochs", "-1", "--out", "{tmp}/r"],
        "training needs epochs >= 0",
    ),
    (
        "train-zero-batch",
        None,
        ["train", *TINY_MODEL, "--data", "digits", "--batch-size", "0", "--out", "{tmp}/r"],
        "batch_size >= 1",
    ),
    ("train-zero-lr", None, ["train", *TINY_MODEL, "--data", "digits", "--lr", "0", "--out", "{tmp}/r"], "lr > 0"),
    (
        "train-epochs-not-int",
        None,
        ["train", *TINY_MODEL, "--data", "digits", "--epochs", "two", "--out", "{tmp}/r"],
        "invalid int value: 'two'",
    ),
    (
        "train-unknown-model",
        None,
        ["train", "--model", "deit_nano", "--data", "digits", "--out", "{tmp}/r"],
        "unknown timm model 'deit_nano'",
    ),
    (
        "train-python-tag-in-model-kwargs",
        None,
        ["train", "--model", "deit_tiny_patch16_224", "--model-kwargs", "img_size=!!python/object/apply:os.getcwd []"]
        + ["--data", "digits", "--out", "{tmp}/r"],
        "its value is not plain YAML",
    ),
    (
        "train-symlink-loop-in-data",
        linked_image_folder,
        ["train", "--model", "deit_tiny_patch16_224", "--data", "{tmp}/data", "--out", "{tmp}/r"],
        "holds a symlinked folder",
    ),
    (
        "train-huge-image",
        None,
        ["train", "--model", "deit_tiny_patch16_224", "--model-kwargs", "img_size=100000", "--data", "digits"]
        + ["--out", "{tmp}/r"],
        "larger than 4096 pixels a side",
    ),
    (
        "train-bad-model-kwargs",
        None,
        [
            "train",
            "--model",
            "deit_tiny_patch16_224",
            "--model-kwargs",
            "depth",
            "--data",
            "digits",
            "--out",
            "{tmp}/r",
        ],
        "KEY=VALUE",
    ),
    (
        "train-negative-workers",
        None,
        ["train", *TINY_MODEL, "--data", "digits", "--num-workers", "-1", "--out", "{tmp}/r"],
        "--num-workers -1 must be >= 0",
    ),
    (
        "train-negative-mixup",
        None,
        ["train", *TINY_MODEL, "--data", "digits", "--mixup", "-1", "--out", "{tmp}/r"],
        "--mixup and --cutmix must be >= 0",
    ),
    (
        "train-randaugment-on-digits",
        None,
        ["train", *TINY_MODEL, "--data", "digits", "--augment", "rand-m9", "--out", "{tmp}/r"],
        "RandAugment needs image files",
    ),
    (
        "train-out-is-file",
        text("r", "x"),
        ["train", *TINY_MODEL, "--data", "digits", "--epochs", "0", "--out", "{tmp}/r"],
        "is a file",
    ),
    (
        "train-unknown-flag",
        None,
        ["train", *TINY_MODEL, "--data", "digits", "--epoch", "3", "--out", "{tmp}/r"],
        "unrecognized arguments",
    ),
    # prune
    (
        "prune-no-method",
        None,
        ["prune", "{art}/run", "--data", "digits", "--out", "{tmp}/p"],
        "the following arguments are required: --method",
    ),
    (
        "prune-no-data",
        None,
        ["prune", "{art}/run", "--method", "vtp", "--out", "{tmp}/p"],
        "the following arguments are required: --data",
    ),
    (
        "prune-unknown-method",
        None,
        ["prune", "{art}/run", "--method", "magic", "--data", "digits", "--out", "{tmp}/p"],
        "unknown method 'magic'",
    ),
    (
        "prune-missing-run",
        None,
        ["prune", "{tmp}/nowhere", "--method", "vtp", "--data", "digits", "--out", "{tmp}/p"],
        "is not a run directory",
    ),
    (
        "prune-run-and-model",
        None,
        ["prune", "{art}/run", *TINY_MODEL, "--method", "vtp", "--data", "digits", "--out", "{tmp}/p"],
        "not both",
    ),
    (
        "prune-same-axis",
        fresh_vtp_run,
        ["prune", "{tmp}/run", "--method", "vtp", "--data", "digits", "--out", "{tmp}/p"],
        "VTP cannot start from a plan that already sets hidden (block 0",
    ),
    (
        "prune-ratio-range",
        None,
        ["prune", "{art}/run", "--method", "vtp", "--prune-ratio", "1.5", "--data", "digits", "--out", "{tmp}/p"],
        "--prune-ratio 1.5 must be in (0, 1)",
    ),
    (
        "prune-foreign-flag",
        None,
        [
            "prune",
            "{art}/run",
            "--method",
            "patch-slim",
            "--prune-ratio",
            "0.4",
            "--data",
            "digits",
            "--out",
            "{tmp}/p",
        ],
        "does not apply to method 'patch-slim'",
    ),
    (
        "prune-epsilon-zero",
        None,
        ["prune", "{art}/run", "--method", "patch-slim", "--epsilon", "0", "--data", "digits", "--out", "{tmp}/p"],
        "--epsilon 0.0 must be > 0",
    ),
    (
        "prune-target-macs",
        None,
        ["prune", "{art}/run", "--method", "patch-slim", "--target-macs", "2", "--data", "digits", "--out", "{tmp}/p"],
        "--target-macs 2.0 must be in (0, 1]",
    ),
    (
        "prune-pyramid-order",
        None,
        [
            "prune",
            "{art}/run",
            "--method",
            "dgssa-glad",
            "--pyramid",
            "1:8,1:4",
            "--data",
            "digits",
            "--out",
            "{tmp}/p",
        ],
        "increasing blocks",
    ),
    (
        "prune-static-blocks",
        None,
        [
            "prune",
            "{art}/run",
            "--method",
            "dgssa-glad",
            "--static-blocks",
            "5",
            "--data",
            "digits",
            "--out",
            "{tmp}/p",
        ],
        "larger than the model's depth 2",
    ),
    (
        "prune-searched-static-blocks-without-a-target",
        None,
        [
            "prune",
            "{art}/run",
            "--method",
            "dgssa-glad",
            "--max-static-blocks",
            "2",
            "--data",
            "digits",
            "--out",
            "{tmp}/p",
        ],
        "add --pyramid auto and a target",
    ),
    (
        "prune-missing-data",
        None,
        ["prune", "{art}/run", "--method", "vtp", "--data", "{tmp}/nowhere", "--out", "{tmp}/p"],
        "neither 'digits' nor a readable directory",
    ),
    (
        "prune-corrupt-resume-checkpoint",
        text("p/checkpoints/sparsity.pt", "garbage"),
        ["prune", "{art}/run", "--method", "vtp", "--data", "digits", "--out", "{tmp}/p"],
        "checkpoint",
    ),
    # plans (read by export; the same loader serves prune, compare and bench)
    (
        "plan-index-out-of-range",
        run_copy(plan_edit=block0(kept_tokens=[0, 99])),
        ["export", "{tmp}/run", "--out", "{tmp}/x.onnx"],
        "block 0 field kept_tokens: index 99 out of range",
    ),
    (
        "plan-duplicate-index",
        run_copy(plan_edit=block0(hidden=[0, 1, 1])),
        ["export", "{tmp}/run", "--out", "{tmp}/x.onnx"],
        "duplicate index 1",
    ),
    (
        "plan-unsorted-index",
        run_copy(plan_edit=block0(fc1_in=[3, 1, 2])),
        ["export", "{tmp}/run", "--out", "{tmp}/x.onnx"],
        "increasing order",
    ),
    (
        "plan-pruned-class-token",
        run_copy(plan_edit=block0(kept_tokens=[1, 2, 3])),
        ["export", "{tmp}/run", "--out", "{tmp}/x.onnx"],
        "prefix tokens 0..0",
    ),
    (
        "plan-empty-set",
        run_copy(plan_edit=block0(qkv_in=[])),
        ["export", "{tmp}/run", "--out", "{tmp}/x.onnx"],
        "keeps nothing",
    ),
    (
        "plan-uneven-heads",
        run_copy(plan_edit=block0(proj_in=[0, 1, 2])),
        ["export", "{tmp}/run", "--out", "{tmp}/x.onnx"],
        "the same count in every head",
    ),
    (
        "plan-not-nested",
        run_copy(
            plan_edit=lambda p: (
                p["blocks"][0].update(kept_tokens=[0, 1, 2]),
                p["blocks"][1].update(kept_tokens=[0, 1, 2, 3, 4]),
            )
        ),
        ["export", "{tmp}/run", "--out", "{tmp}/x.onnx"],
        "block 1 field kept_tokens: index 3 out of range [0, 3)",
    ),
    (
        "plan-wrong-depth",
        run_copy(plan_edit=lambda p: p["blocks"].pop()),
        ["export", "{tmp}/run", "--out", "{tmp}/x.onnx"],
        "plan has 1 blocks but the model has 2",
    ),
    (
        "plan-unknown-schema",
        run_copy(plan_edit=lambda p: p.update(schema_version=99)),
        ["export", "{tmp}/run", "--out", "{tmp}/x.onnx"],
        "schema version 99",
    ),
    (
        "plan-missing-tensor",
        run_copy(plan_edit=block0(static_attention=True)),
        ["export", "{tmp}/run", "--out", "{tmp}/x.onnx"],
        "plan tensor blocks.0.static_attention is missing",
    ),
    (
        "plan-wrong-tensor-shape",
        run_copy(edit=small_static_attention, plan_edit=block0(static_attention=True)),
        ["export", "{tmp}/run", "--out", "{tmp}/x.onnx"],
        "does not match expected (2, 17, 17)",
    ),
    (
        "plan-float-indices",
        run_copy(plan_edit=block0(hidden=[0.0, 1.7])),
        ["export", "{tmp}/run", "--out", "{tmp}/x.onnx"],
        "block 0 hidden: indices must be a list of integers",
    ),
    (
        "plan-infinite-indices",
        run_copy(
            edit=lambda run: (run / "plan.json").write_text(
                (run / "plan.json").read_text().replace('"hidden": null', '"hidden": [1e999]', 1)
            )
        ),
        ["export", "{tmp}/run", "--out", "{tmp}/x.onnx"],
        "indices must be a list of integers",
    ),
    (
        "plan-truncated-json",
        run_copy(edit=lambda run: (run / "plan.json").write_text('{"schema_version": 1, "blo')),
        ["export", "{tmp}/run", "--out", "{tmp}/x.onnx"],
        "is unreadable",
    ),
    (
        "plan-random-tensors",
        run_copy(edit=lambda run: (run / "plan.safetensors").write_bytes(b"\x00" * 64)),
        ["export", "{tmp}/run", "--out", "{tmp}/x.onnx"],
        "are unreadable",
    ),
    (
        "plan-json-list",
        run_copy(edit=lambda run: (run / "plan.json").write_text("[1, 2]")),
        ["export", "{tmp}/run", "--out", "{tmp}/x.onnx"],
        "malformed",
    ),
    (
        "run-truncated-weights",
        run_copy(
            edit=lambda run: (run / "weights.safetensors").write_bytes((run / "weights.safetensors").read_bytes()[:100])
        ),
        ["export", "{tmp}/run", "--out", "{tmp}/x.onnx"],
        "unreadable or corrupt",
    ),
    # export
    ("export-missing-run", None, ["export", "{tmp}/nowhere", "--out", "{tmp}/x.onnx"], "is not a run directory"),
    ("export-nothing", None, ["export", "--out", "{tmp}/x.onnx"], "give either a RUN_DIR or --model NAME"),
    (
        "export-precision",
        None,
        ["export", "{art}/run", "--precision", "fp8", "--out", "{tmp}/x.onnx"],
        "invalid choice: 'fp8'",
    ),
    ("export-out-parent-is-file", text("f", "x"), ["export", "{art}/run", "--out", "{tmp}/f/x.onnx"], "cannot write"),
    # build
    ("build-missing-onnx", None, ["build", "{tmp}/no.onnx", "--out", "{tmp}/x.engine"], "does not exist"),
    (
        "build-random-onnx",
        random_bytes("m.onnx"),
        ["build", "{tmp}/m.onnx", "--out", "{tmp}/x.engine"],
        "is not a valid ONNX file",
    ),
    (
        "build-truncated-onnx",
        truncated("model.onnx", "m.onnx"),
        ["build", "{tmp}/m.onnx", "--out", "{tmp}/x.engine"],
        "is not a valid ONNX file",
    ),
    (
        "build-profile-text",
        None,
        ["build", "{art}/model.onnx", "--batch", "abc", "--out", "{tmp}/x.engine"],
        "is not MIN:OPT:MAX",
    ),
    (
        "build-profile-order",
        None,
        ["build", "{art}/model.onnx", "--batch", "8:2:4", "--out", "{tmp}/x.engine"],
        "1 <= MIN <= OPT <= MAX",
    ),
    (
        "build-profile-zero",
        None,
        ["build", "{art}/model.onnx", "--batch", "0:1:2", "--out", "{tmp}/x.engine"],
        "1 <= MIN <= OPT <= MAX",
    ),
    (
        "build-profile-huge",
        None,
        ["build", "{art}/model.onnx", "--batch", "1:8:1000000000", "--out", "{tmp}/x.engine"],
        "MAX <= 65536",
    ),
    (
        "build-workspace-huge",
        None,
        ["build", "{art}/model.onnx", "--workspace", "99999999999", "--out", "{tmp}/x.engine"],
        "at most 1048576 (MB)",
    ),
    (
        "bench-batch-huge",
        None,
        ["bench", "{art}/model.onnx", "--backend", "onnxruntime", "--batch", "1000000"],
        "at most 65536",
    ),
    (
        "bench-newline-in-path",
        None,
        ["bench", "{tmp}/a\nvitslim: all checks passed.onnx", "--backend", "onnxruntime"],
        "a\\nvitslim: all checks passed.onnx does not exist",
    ),
    # bench
    ("bench-missing-artifact", None, ["bench", "{tmp}/no.onnx", "--backend", "onnxruntime"], "does not exist"),
    (
        "bench-engine-to-onnxruntime",
        random_bytes("m.engine"),
        ["bench", "{tmp}/m.engine", "--backend", "onnxruntime"],
        "give it with --backend tensorrt",
    ),
    (
        "bench-onnx-to-tensorrt",
        None,
        ["bench", "{art}/model.onnx", "--backend", "tensorrt"],
        "give it with --backend onnxruntime",
    ),
    (
        "bench-run-to-onnxruntime",
        None,
        ["bench", "{art}/run", "--backend", "onnxruntime"],
        "give it with --backend torch",
    ),
    (
        "bench-random-onnx",
        random_bytes("m.onnx"),
        ["bench", "{tmp}/m.onnx", "--backend", "onnxruntime"],
        "is not a valid ONNX file",
    ),
    (
        "bench-zero-batch",
        None,
        ["bench", "{art}/model.onnx", "--backend", "onnxruntime", "--batch", "0"],
        "--batch 0 must be >= 1",
    ),
    (
        "bench-timing-settings",
        None,
        ["bench", "{art}/model.onnx", "--backend", "onnxruntime", "--min-iterations", "0"],
        "--min-iterations",
    ),
    ("bench-cuda-without-gpu", None, ["bench", "{art}/run", "--backend", "torch", "--device", "cuda"], "no CUDA GPU"),
    # latency tables and targets
    (
        "prune-latency-target-without-table",
        None,
        ["prune", "{art}/run", "--method", "vtp", "--target-ms", "1", "--data", "digits", "--out", "{tmp}/p"],
        "needs the table it is read on: add --latency-table",
    ),
    (
        "prune-latency-table-missing",
        None,
        [
            "prune",
            "{art}/run",
            "--method",
            "vtp",
            "--latency-table",
            "{tmp}/no.json",
            "--target-ms",
            "1",
            "--data",
            "digits",
            "--out",
            "{tmp}/p",
        ],
        "does not exist: measure it again with 'vitslim latency-table'",
    ),
    (
        "prune-latency-table-damaged",
        text(
            "t.json",
            '{"table_version": 3, "model": {"name": "x"}, "geometry": {}, "where": {}, "blocks": [], "aggregations": []}',
        ),
        [
            "prune",
            "{art}/run",
            "--method",
            "vtp",
            "--latency-table",
            "{tmp}/t.json",
            "--target-ms",
            "1",
            "--data",
            "digits",
            "--out",
            "{tmp}/p",
        ],
        "geometry.depth must be an integer",
    ),
    (
        "prune-latency-table-older-version",
        text("t.json", '{"table_version": 1, "model": {"name": "x"}}'),
        [
            "prune",
            "{art}/run",
            "--method",
            "vtp",
            "--latency-table",
            "{tmp}/t.json",
            "--data",
            "digits",
            "--out",
            "{tmp}/p",
        ],
        "has table_version 1, not 3: measure it again with 'vitslim latency-table'",
    ),
    (
        "latency-table-tensorrt-on-cpu",
        None,
        ["latency-table", *TINY_MODEL, "--backend", "tensorrt", "--out", "{tmp}/t.json"],
        "--backend tensorrt runs engines on a GPU: add --device cuda",
    ),
    ("latency-table-not-json", None, ["latency-table", *TINY_MODEL, "--out", "{tmp}/t.txt"], "a table is a .json file"),
    (
        "bench-latency-table-missing",
        None,
        ["bench", "{art}/model.onnx", "--backend", "onnxruntime", "--latency-table", "{tmp}/no.json"],
        "no.json does not exist: measure it again with 'vitslim latency-table'",
    ),
    (
        "bench-engine-changed",
        engine_copy(lambda tmp: (tmp / "model.engine").write_bytes(b"0" + (tmp / "model.engine").read_bytes())),
        ["bench", "{tmp}/model.engine", "--backend", "tensorrt"],
        "changed since it was built",
    ),
    (
        "bench-engine-no-manifest",
        engine_copy(lambda tmp: (tmp / "model.engine.json").unlink()),
        ["bench", "{tmp}/model.engine", "--backend", "tensorrt"],
        "has no manifest",
    ),
    (
        "bench-engine-truncated-manifest",
        engine_copy(lambda tmp: (tmp / "model.engine.json").write_text('{"engine": {')),
        ["bench", "{tmp}/model.engine", "--backend", "tensorrt"],
        "manifest",
    ),
    (
        "bench-engine-batch-outside-profiles",
        engine_copy(lambda tmp: None),
        ["bench", "{tmp}/model.engine", "--backend", "tensorrt", "--batch", "16"],
        "batch 16 is outside every optimisation profile of",
    ),
    # compare
    ("compare-no-data", None, ["compare", "{art}/run"], "compare RUN_DIR needs --data"),
    ("compare-missing-run", None, ["compare", "{tmp}/nowhere", "--data", "digits"], "is not a run directory"),
    (
        "compare-random-onnx",
        random_bytes("m.onnx"),
        ["compare", "{art}/run", "--data", "digits", "--onnx", "{tmp}/m.onnx"],
        "is not a valid ONNX file",
    ),
    (
        "compare-onnx-of-other-model",
        onnx_of_other_size,
        ["compare", "{art}/run", "--data", "digits", "--onnx", "{tmp}/other.onnx"],
        "takes inputs of shape",
    ),
    (
        "compare-engine-no-manifest",
        random_bytes("m.engine"),
        ["compare", "{art}/run", "--data", "digits", "--engine", "{tmp}/m.engine"],
        "has no manifest",
    ),
    (
        "compare-zero-batch",
        None,
        ["compare", "{art}/run", "--data", "digits", "--batch", "0"],
        "--batch 0 must be >= 1",
    ),
    # gate
    ("gate-nothing", None, ["gate"], "give CURRENT.json and one of --baseline"),
    ("gate-missing-baseline", None, ["gate", "{art}/results.json", "--baseline", "{tmp}/typo.json"], "no baseline at"),
    ("gate-missing-current", None, ["gate", "{tmp}/none.json", "--baseline", "{art}/results.json"], "does not exist"),
    (
        "gate-random-current",
        random_bytes("c.json"),
        ["gate", "{tmp}/c.json", "--baseline", "{art}/results.json"],
        "is unreadable",
    ),
    (
        "gate-truncated-baseline",
        truncated("results.json", "b.json"),
        ["gate", "{art}/results.json", "--baseline", "{tmp}/b.json"],
        "is unreadable",
    ),
    (
        "gate-wrong-version",
        results_edit(lambda d: d.update(version=99)),
        ["gate", "{tmp}/results.json", "--baseline", "{art}/results.json"],
        "is not a vitslim benchmark result",
    ),
    (
        "gate-result-without-median",
        results_edit(lambda d: d["results"][0].pop("median_ms")),
        ["gate", "{tmp}/results.json", "--baseline", "{art}/results.json"],
        "holds a result without",
    ),
    (
        "gate-baseline-is-directory",
        empty_dir("b"),
        ["gate", "{art}/results.json", "--baseline", "{tmp}/b"],
        "use --baseline-dir",
    ),
    (
        "gate-baseline-dir-is-file",
        text("b.json", "{}"),
        ["gate", "{art}/results.json", "--baseline-dir", "{tmp}/b.json"],
        "use --baseline",
    ),
    (
        "gate-corrupt-baseline-in-dir",
        text("b/x.json", "[1"),
        ["gate", "{art}/results.json", "--baseline-dir", "{tmp}/b"],
        "is unreadable",
    ),
    # what a results file says cannot switch the gate off (issue 23)
    (
        "gate-nan-median",
        results_edit(lambda d: d["results"][0].update(median_ms=float("nan"))),
        ["gate", "{tmp}/results.json", "--baseline", "{art}/results.json"],
        "finite, positive numbers",
    ),
    (
        "gate-infinite-cov-in-baseline",
        results_edit(lambda d: d["results"][0].update(cov=float("inf"))),
        ["gate", "{art}/results.json", "--baseline", "{tmp}/results.json"],
        "finite, positive numbers",
    ),
    (
        "gate-float-batch",
        results_edit(lambda d: d["results"][0].update(batch=8.5)),
        ["gate", "{tmp}/results.json", "--baseline", "{art}/results.json"],
        "an integer batch",
    ),
    (
        "gate-path-as-fingerprint-id",
        results_edit(lambda d: d["results"][0].update(fingerprint_id="../../elsewhere/x")),
        ["gate", "{tmp}/results.json", "--baseline-dir", "{tmp}/b", "--accept"],
        "does not match its fingerprint",
    ),
    (
        "gate-deeply-nested-current",
        text("c.json", "[" * 100000 + "]" * 100000),
        ["gate", "{tmp}/c.json", "--baseline", "{art}/results.json"],
        "is unreadable",
    ),
    (
        "gate-fail-nan",
        None,
        ["gate", "{art}/results.json", "--baseline", "{art}/results.json", "--fail", "nan"],
        "--fail nan must be a finite",
    ),
    (
        "gate-fail-inf",
        None,
        ["gate", "{art}/results.json", "--baseline", "{art}/results.json", "--fail", "inf"],
        "--fail inf must be a finite",
    ),
    (
        "gate-max-cov-nan",
        None,
        ["gate", "{art}/results.json", "--baseline", "{art}/results.json", "--max-cov", "nan"],
        "--max-cov nan must be a finite",
    ),
    (
        "gate-ab-max-seconds-nan",
        None,
        ["gate", "--ab", "{art}/model.onnx", "{art}/model.onnx", "--max-seconds", "nan"],
        "--max-seconds must be a finite",
    ),
    (
        "bench-warmup-inf",
        None,
        ["bench", "{art}/model.onnx", "--backend", "onnxruntime", "--warmup-seconds", "inf"],
        "--warmup-seconds must be a finite",
    ),
    (
        "train-lr-inf",
        None,
        ["train", *TINY_MODEL, "--data", "digits", "--lr", "inf", "--out", "{tmp}/r"],
        "--lr must be a finite",
    ),
    (
        "train-warmup-epochs-nan",
        None,
        ["train", *TINY_MODEL, "--data", "digits", "--warmup-epochs", "nan", "--out", "{tmp}/r"],
        "--warmup-epochs must be a finite",
    ),
    ("gate-ab-missing", None, ["gate", "--ab", "{art}/model.onnx", "{tmp}/no.onnx"], "does not exist"),
    (
        "gate-ab-other-inputs",
        onnx_of_other_size,
        ["gate", "--ab", "{art}/model.onnx", "{tmp}/other.onnx"],
        "take different inputs",
    ),
    (
        "gate-ab-with-baseline",
        None,
        ["gate", "--ab", "{art}/model.onnx", "{art}/model.onnx", "--baseline", "{art}/results.json"],
        "measures both artifacts itself",
    ),
    (
        "gate-ab-confidence",
        None,
        ["gate", "--ab", "{art}/model.onnx", "{art}/model.onnx", "--confidence", "2"],
        "--confidence",
    ),
    (
        "gate-ab-random-onnx",
        random_bytes("m.onnx"),
        ["gate", "--ab", "{art}/model.onnx", "{tmp}/m.onnx"],
        "is not a valid ONNX file",
    ),
    (
        "gate-ab-engine-batch-outside-profiles",
        engine_copy(lambda tmp: None),
        ["gate", "--ab", "{tmp}/model.engine", "{tmp}/model.engine", "--batch", "16"],
        "batch 16 is outside every optimisation profile of",
    ),
    # quantize
    (
        "quantize-no-data",
        None,
        ["quantize", "{art}/model.onnx", "--out", "{tmp}/q.onnx"],
        "the following arguments are required: --data",
    ),
    (
        "quantize-no-calibration-images",
        None,
        ["quantize", "{art}/model.onnx", "--data", "digits", "--calibration-images", "0", "--out", "{tmp}/q.onnx"],
        "needs at least one calibration image",
    ),
    (
        "quantize-already-quantized",
        quantized_copy,
        ["quantize", "{tmp}/q.onnx", "--data", "digits", "--out", "{tmp}/q2.onnx"],
        "is already quantized",
    ),
    (
        "quantize-not-a-vitslim-onnx",
        plain_onnx,
        ["quantize", "{tmp}/plain.onnx", "--data", "digits", "--out", "{tmp}/q.onnx"],
        "not a ViT exported by vitslim",
    ),
    (
        "quantize-random-onnx",
        random_bytes("m.onnx"),
        ["quantize", "{tmp}/m.onnx", "--data", "digits", "--out", "{tmp}/q.onnx"],
        "is not a valid ONNX file",
    ),
    (
        "quantize-other-data",
        None,
        ["quantize", "{art}/model.onnx", "--data", "{tmp}/nowhere", "--out", "{tmp}/q.onnx"],
        "neither 'digits' nor a readable directory",
    ),
    # run (recipes)
    ("run-missing-recipe", None, ["run", "{tmp}/none.yaml"], "cannot read recipe"),
    ("run-binary-recipe", random_bytes("r.yaml"), ["run", "{tmp}/r.yaml"], "recipe"),
    ("run-invalid-yaml", text("r.yaml", "model: [unclosed\n"), ["run", "{tmp}/r.yaml"], "is not valid YAML"),
    ("run-recipe-list", text("r.yaml", "- 1\n- 2\n"), ["run", "{tmp}/r.yaml"], "must be a YAML mapping"),
    (
        "run-unknown-key",
        text("r.yaml", "model: {name: deit_tiny_patch16_224}\ntrain: {epochz: 3}\n"),
        ["run", "{tmp}/r.yaml"],
        "recipe train: unknown key(s) ['epochz']",
    ),
    (
        "run-wrong-type",
        text("r.yaml", "model: {name: deit_tiny_patch16_224}\ntrain: {epochs: ten}\n"),
        ["run", "{tmp}/r.yaml"],
        "recipe train.epochs: 'ten' is not an integer",
    ),
    (
        "run-unknown-method",
        text("r.yaml", "model: {name: deit_tiny_patch16_224}\nmethods: {magic: {}}\n"),
        ["run", "{tmp}/r.yaml"],
        "unknown method 'magic'",
    ),
    (
        "run-composed-start-not-listed",
        text("r.yaml", "model: {name: deit_tiny_patch16_224}\nmethods: {vtp+patch-slim: {}, vtp: {}}\n"),
        ["run", "{tmp}/r.yaml"],
        "recipe methods.vtp+patch-slim: starts from the entry 'vtp', which is not listed above it",
    ),
    (
        "run-composed-same-axis",
        text(
            "r.yaml",
            "model: {name: deit_tiny_patch16_224}\nmethods: {patch-slim: {epsilon: 0.02}, patch-slim+dgssa-glad: {}}\n",
        ),
        ["run", "{tmp}/r.yaml"],
        "DGSSA + GLAD cannot start from Patch Slimming's result",
    ),
    (
        "run-method-wrong-type",
        None,
        ["run", "--set", "methods.vtp.prune_ratio=high"],
        "recipe methods.vtp.prune_ratio: 'high' is not a number",
    ),
    ("run-set-not-key-value", None, ["run", "--set", "train.epochs"], "is not KEY=VALUE"),
    ("run-set-unknown-key", None, ["run", "--set", "train.nope=1"], "unknown key"),
    (
        "run-missing-data",
        None,
        ["run", "--data", "{tmp}/nowhere", "--out-dir", "{tmp}/runs"],
        "neither 'digits' nor a readable directory",
    ),
    (
        "run-deploy-unquoted-profile",
        text("r.yaml", "model: {name: deit_tiny_patch16_224}\ndeploy: {profiles: 1:8:32}\n"),
        ["run", "{tmp}/r.yaml"],
        "quote it",
    ),
    (
        "run-deploy-precision",
        None,
        ["run", "--set", "deploy.precision=int8"],
        "recipe deploy.precision 'int8' is not one of",
    ),
    (
        "run-no-model-name",
        text("r.yaml", "model: {kwargs: {depth: 2}}\n"),
        ["run", "{tmp}/r.yaml"],
        "'name' (a timm model name) is required",
    ),
    (
        "run-deep-yaml",
        text("r.yaml", "name: x\nmodel: " + "[" * 20000 + "]" * 20000 + "\n"),
        ["run", "{tmp}/r.yaml"],
        "nests deeper than Python can read",
    ),
    (
        "run-yaml-alias",
        text("r.yaml", "name: &n x\nmodel: {name: *n}\n"),
        ["run", "{tmp}/r.yaml"],
        "uses a YAML alias (*n)",
    ),
    (
        "train-deep-model-kwargs",
        None,
        ["train", "--model", "deit_tiny_patch16_224", "--model-kwargs", "img_size=" + "[" * 5000 + "]" * 5000]
        + ["--data", "digits", "--out", "{tmp}/r"],
        "model kwarg 'img_size': its value is not plain YAML (nested too deep)",
    ),
    ("unknown-command", None, ["shrink"], "invalid choice: 'shrink'"),
]


def _snapshot(*roots: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("setup, argv, message", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_3_and_changes_nothing(artifacts, tmp_path, capsys, setup, argv, message):
    if setup is not None:
        setup(tmp_path, artifacts)
    before = _snapshot(artifacts, tmp_path)
    capsys.readouterr()
    try:
        code = main([a.format(tmp=tmp_path, art=artifacts) for a in argv])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == EXIT_BAD_INPUT, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert message in lines[0], lines[0]
    assert _snapshot(artifacts, tmp_path) == before  # no file changed, none written


def test_there_are_at_least_60_cases():
    assert len(CASES) >= 60 and len({case[0] for case in CASES}) == len(CASES)


def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path, capsys):
    """--debug (before or after the command) adds the traceback; the exit code stays 3, never a verdict."""
    for argv in (["--debug", "export"], ["export", "--debug"]):
        assert main([*argv, str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.onnx")]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert "Traceback" in err and last.startswith("vitslim export: error:") and "is not a run directory" in last

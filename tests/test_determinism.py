"""The same recipe and seed on the same machine give byte-identical plans, weights and ONNX files
(fp32, fp16 and the INT8 quantization);
a rerun skips the stages that finished with the same settings, and reruns a composed entry whose
start changed."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from vitslim.cli import main

RECIPE = """\
name: tiny
model:
  name: deit_tiny_patch16_224
  kwargs: {img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2, num_classes: 10}
data: digits
train: {epochs: 1, batch_size: 64}
methods:
  vtp: {prune_ratio: 0.4, sparsity_epochs: 1, finetune_epochs: 1, round_to: 1}
  patch-slim: {epsilon: 0.05, finetune_epochs: 1, calibration_images: 32, block_tuning_images: 32}
  dgssa-glad: {static_blocks: 1, pyramid: "1:8", finetune_epochs: 1}
  vtp+patch-slim: {epsilon: 0.05, finetune_epochs: 1, calibration_images: 32, block_tuning_images: 32}
deploy: {engines: false, latency: false}  # bytes, not timings: the summary's latency columns are left out
"""


def _artifacts(root: Path) -> dict[str, bytes]:
    names = ("plan.json", "plan.safetensors", "weights.safetensors")
    files = [p for p in root.rglob("*") if p.name in names or p.suffix == ".onnx"]
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(files)}


@pytest.mark.e2e  # four tiny recipe runs (about 2 min): `make test-e2e`, which CI runs too
def test_same_recipe_and_seed_give_identical_bytes_and_reruns_skip_finished_stages(tmp_path, caplog):
    (tmp_path / "tiny.yaml").write_text(RECIPE)
    for out in ("a", "b"):
        assert main(["run", str(tmp_path / "tiny.yaml"), "--out-dir", str(tmp_path / out), "--seed", "3"]) == 0
    first, second = _artifacts(tmp_path / "a" / "tiny"), _artifacts(tmp_path / "b" / "tiny")
    assert len(first) == 5 * 3 + 5 * 3  # 5 run directories with 3 files each; fp32, fp16 and int8 ONNX of each variant
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []
    summary = json.loads((tmp_path / "a" / "tiny" / "summary.json").read_text())
    assert [row for row in summary["rows"] if "torch_ms" in row or "int8_ms" in row] == []  # deploy.latency: false
    assert "Latency: not measured" in (tmp_path / "a" / "tiny" / "summary.md").read_text()
    # rerun with one method's setting changed: only that stage runs again
    before = (tmp_path / "a" / "tiny" / "patch-slim" / "weights.safetensors").stat().st_mtime_ns
    caplog.clear()
    assert (
        main(
            [
                "run",
                str(tmp_path / "tiny.yaml"),
                "--out-dir",
                str(tmp_path / "a"),
                "--seed",
                "3",
                "--set",
                "methods.vtp.prune_ratio=0.3",
                "--set",
                "deploy.int8=false",  # the deploy step is redone anyway; INT8 adds nothing to what this checks
            ]
        )
        == 0
    )
    out = caplog.text
    # the composed entry reruns with its start: its stage record holds the start's
    assert set(re.findall(r"(\S+): finished earlier with the same settings", out)) == {
        "dense",
        "patch-slim",
        "dgssa-glad",
    }
    composed = json.loads((tmp_path / "a" / "tiny" / "vtp+patch-slim" / "info.json").read_text())
    vtp = json.loads((tmp_path / "a" / "tiny" / "vtp" / "info.json").read_text())
    assert composed["plan_method"] == "vtp+patch-slim" and composed["start"]["macs"] == vtp["macs"]
    # a start that runs again with the same settings (its run directory gone): the entry starting from it reruns
    shutil.rmtree(tmp_path / "a" / "tiny" / "vtp")
    caplog.clear()
    rerun = ["run", str(tmp_path / "tiny.yaml"), "--out-dir", str(tmp_path / "a"), "--seed", "3"]
    assert main([*rerun, "--set", "methods.vtp.prune_ratio=0.3", "--set", "deploy.int8=false"]) == 0
    assert set(re.findall(r"(\S+): finished earlier", caplog.text)) == {"dense", "patch-slim", "dgssa-glad"}
    assert (tmp_path / "a" / "tiny" / "patch-slim" / "weights.safetensors").stat().st_mtime_ns == before

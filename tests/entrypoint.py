"""docker/entrypoint.sh (the runtime image's entry point) run on the host, with TensorRT-RTX
standing in for the image's TensorRT: used by tests/test_docker.py and by the default-run test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"


def run_entrypoint(work: Path, build_args: str, *command: str) -> subprocess.CompletedProcess:
    """The entry point with the image's volumes as work/models (ONNX in), work/engines (engines
    out) and work/cache (the engine cache), `build_args` for every build, then `vitslim command`."""
    env = {
        **os.environ,
        "VITSLIM_PYTHON": sys.executable,
        "VITSLIM_MODELS": str(work / "models"),
        "VITSLIM_ENGINES": str(work / "engines"),
        "VITSLIM_ENGINE_CACHE": str(work / "cache"),
        "VITSLIM_BUILD_ARGS": build_args,
    }
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *command], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900
    )

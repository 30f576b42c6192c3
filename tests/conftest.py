"""Shared fixtures: tiny timm ViTs built in code (no downloads), and random valid plans."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property tests: few examples by default (the suite's time budget), many in nightly runs:
#   pytest --hypothesis-profile nightly
settings.register_profile("fast", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("nightly", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("fast")

# Under pytest-xdist each worker gets one thread, so that the workers do not fight for the cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5)


def tiny_vit(name: str = "deit_tiny_patch16_224", seed: int = 0, **overrides) -> torch.nn.Module:
    """A 3-block, 32-wide ViT on 16x16 images (16 patches), random weights, eval mode."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, **{**TINY, **overrides}).eval()


@pytest.fixture
def tiny_model():
    return tiny_vit()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The tiny model (tests/tiny.py) trained 2 epochs on digits by the `train` command in a
    subprocess, as a user runs it: one per test process, shared by every test that needs a trained
    run directory. Read-only: copy it before changing it."""
    from tiny import TINY_MODEL

    run = tmp_path_factory.mktemp("tiny-run") / "run"
    command = [
        sys.executable,
        "-m",
        "vitslim",
        "train",
        *TINY_MODEL,
        "--data",
        "digits",
        "--epochs",
        "2",
        "--out",
        str(run),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return run


def pytest_collection_modifyitems(config, items):
    # The default recipe end to end (marker e2e, about 7 minutes) runs only when a -m expression
    # names it (make test-e2e: -m e2e), whatever else -m selects: `make test` stays fast.
    if "e2e" not in (config.option.markexpr or ""):
        deselected = [item for item in items if "e2e" in item.keywords]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if "e2e" not in item.keywords]
    # Long end-to-end tests first, so that under pytest-xdist they start at once on their own
    # worker while the many short tests share the other.
    items.sort(key=lambda item: "slow" not in item.keywords)
    has_cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="no CUDA GPU on this machine"))

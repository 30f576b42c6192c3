"""The paired A/B gate: its interval, its three verdicts on runners of known speed, and the CLI."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from vitslim.deploy.gate import PASS, REGRESSION, UNDECIDED, ABSettings, median_interval, paired_ab
from vitslim.deploy.runners import Runner

from benchmarks.gate_ab import SlowedRunner
from vitslim.cli import main


class SpinRunner(Runner):
    """Inference that keeps the CPU busy for `milliseconds` (times `noise` drawn per call)."""

    backend = "spin"

    def __init__(self, milliseconds: float, noise: float = 0.0, seed: int = 0) -> None:
        self.seconds, self.noise, self.rng = milliseconds / 1000, noise, np.random.default_rng(seed)

    def infer_impl(self, images):
        factor = 1.0 + (self.rng.uniform(-self.noise, 3 * self.noise) if self.noise else 0.0)
        deadline = time.perf_counter() + self.seconds * factor
        while time.perf_counter() < deadline:
            pass
        return np.zeros((len(images), 2), dtype=np.float32)


IMAGES = np.zeros((1, 3, 4, 4), dtype=np.float32)
QUICK = ABSettings(warmup_seconds=0.05, max_seconds=30)


def test_median_interval_is_the_binomial_order_statistics():
    values = np.arange(20, dtype=float)[::-1]  # order does not matter
    assert median_interval(values, 0.95) == (5.0, 14.0)  # x(6), x(15): the textbook 95 % interval for n = 20
    assert median_interval(np.arange(5.0), 0.95) == (-np.inf, np.inf)  # too few rounds for any 95 % interval
    low, high = median_interval(np.arange(100.0), 0.95)
    assert (low, high) == (39.0, 60.0)


def test_a_runner_against_itself_passes_and_a_30_percent_slower_one_fails():
    with SpinRunner(2.0) as a, SpinRunner(2.0) as b:
        same = paired_ab(a, b, IMAGES, QUICK)
    assert same.exit_code == PASS and same.interval[1] < 1.1 and "pass" in same.message
    with SpinRunner(2.0) as a, SlowedRunner(SpinRunner(2.0), 0.3) as b:
        slower = paired_ab(a, b, IMAGES, QUICK)
    assert slower.exit_code == REGRESSION and slower.interval[0] > 1.1 and slower.ratio == pytest.approx(1.3, abs=0.1)
    assert slower.rounds >= QUICK.min_rounds and len(slower.round_ratios) == slower.rounds


def test_a_ratio_at_the_threshold_stays_undecided_until_the_time_limit():
    settings = ABSettings(warmup_seconds=0.0, max_seconds=1.0, fail=0.1)
    with SpinRunner(1.0, noise=1.0, seed=1) as a, SlowedRunner(SpinRunner(1.0, noise=1.0, seed=2), 0.1) as b:
        result = paired_ab(a, b, IMAGES, settings)
    assert (
        result.exit_code == UNDECIDED
        and "undecided" in result.message
        and result.interval[0] <= 1.1 <= result.interval[1]
    )


def test_ab_cli_writes_json_and_markdown(tmp_path, capsys):
    from conftest import tiny_vit
    from vitslim.export.onnx_export import export_plan
    from vitslim.pruning.plan import ModelSpec, dense_plan

    model = tiny_vit()
    export_plan(model, dense_plan(ModelSpec("deit_tiny_patch16_224", {}), 3), tmp_path / "m.onnx")
    (tmp_path / "n.onnx").write_bytes((tmp_path / "m.onnx").read_bytes())
    code = main(
        [
            "gate",
            "--ab",
            str(tmp_path / "m.onnx"),
            str(tmp_path / "n.onnx"),
            "--threads",
            "1",
            "--warmup-seconds",
            "0.1",
            "--fail",
            "0.5",
            "--json",
            str(tmp_path / "ab.json"),
        ]
    )
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "ab.json").read_text())
    assert code == report["exit_code"] == PASS, out
    assert report["kind"] == "ab" and report["rounds"] >= 20 and report["interval"][1] < 1.5 and "gate: pass" in out
    # the title follows the command line: BASELINE first
    assert (
        (tmp_path / "ab.md")
        .read_text()
        .startswith("# Paired A/B latency gate: m.onnx (baseline) vs n.onnx (candidate)")
    )

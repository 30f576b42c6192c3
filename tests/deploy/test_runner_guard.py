"""The runner base class's active-state guard (Polygraphy's runner shape): the public calls refuse
in one line outside 'with', a runner is active in one 'with' at a time, and leaving frees it."""

from __future__ import annotations

import numpy as np
import pytest
from vitslim.deploy.errors import DeployError
from vitslim.deploy.runners import Runner, TorchRunner

IMAGES = np.zeros((2, 3, 16, 16), dtype=np.float32)


class CountingRunner(Runner):
    backend = "counting"

    def __init__(self) -> None:
        self.activations = self.deactivations = 0

    def activate_impl(self) -> None:
        self.activations += 1

    def deactivate_impl(self) -> None:
        self.deactivations += 1

    def infer_impl(self, images):
        return np.zeros((len(images), 3), dtype=np.float32)


def test_calls_outside_with_are_refused():
    runner = CountingRunner()
    for call in (lambda: runner.infer(IMAGES), lambda: runner.prepare(IMAGES), lambda: runner.run_prepared(IMAGES)):
        with pytest.raises(DeployError, match="use the counting runner inside 'with'"):
            call()
    with runner:
        assert runner.infer(IMAGES).shape == (2, 3)
        runner.run_prepared(runner.prepare(IMAGES))
    with pytest.raises(DeployError, match="inside 'with'"):
        runner.infer(IMAGES)


def test_one_with_at_a_time_and_deactivation_once():
    runner = CountingRunner()
    with runner:
        with pytest.raises(DeployError, match="already active"):
            runner.activate()
        assert runner.is_active
    runner.deactivate()  # a second deactivation frees nothing twice
    assert (runner.activations, runner.deactivations, runner.is_active) == (1, 1, False)
    with runner:  # and it can be used again
        pass
    assert (runner.activations, runner.deactivations) == (2, 2)


def test_a_real_runner_is_guarded_too(tiny_model):
    runner = TorchRunner(tiny_model)
    with pytest.raises(DeployError, match="use the torch runner inside 'with'"):
        runner.infer(IMAGES)
    with runner:
        assert runner.infer(IMAGES).shape == (2, 5)

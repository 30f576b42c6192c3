"""The runner interface every backend implements (Polygraphy's BaseRunner shape).

A runner is a context manager: `activate` loads what it runs (a session, an engine, a compiled
module), `deactivate` frees it, and the public calls (`infer`, `prepare`, `run_prepared`) refuse
in one line outside an active runner instead of failing deep inside a library. Subclasses
implement the `*_impl` methods; the guard lives here once.
"""

from __future__ import annotations

import numpy as np

from ..errors import DeployError


class Runner:
    """Base: subclasses implement `infer_impl` and, where they have them, `activate_impl`,
    `deactivate_impl` and the device-resident pair `prepare_impl` / `run_prepared_impl`."""

    backend = "base"
    device = "cpu"
    is_active = False

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate(self) -> None:
        if self.is_active:
            raise DeployError(
                f"the {self.backend} runner is already active: use it in one 'with' at a time "
                "(activating it again would free what the first one uses)"
            )
        self.activate_impl()
        self.is_active = True

    def deactivate(self) -> None:
        if not self.is_active:
            return
        try:
            self.deactivate_impl()
        finally:
            self.is_active = False

    def require_active(self) -> None:
        if not self.is_active:
            raise DeployError(f"use the {self.backend} runner inside 'with' (it is not active)")

    def infer(self, images: np.ndarray) -> np.ndarray:
        """Logits (float32, on the host) of a batch of images."""
        self.require_active()
        return self.infer_impl(images)

    def prepare(self, images: np.ndarray):
        """Put `images` where `run_prepared` reads them (the device); returns a handle."""
        self.require_active()
        return self.prepare_impl(images)

    def run_prepared(self, prepared) -> None:
        """One inference on prepared inputs, without copying results back (for timing)."""
        self.require_active()
        self.run_prepared_impl(prepared)

    def activate_impl(self) -> None:
        pass

    def deactivate_impl(self) -> None:
        pass

    def infer_impl(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def prepare_impl(self, images: np.ndarray):
        return images

    def run_prepared_impl(self, prepared) -> None:
        self.infer_impl(prepared)

    def synchronize(self) -> None:
        pass

    @property
    def description(self) -> dict:
        return {"backend": self.backend, "device": self.device}

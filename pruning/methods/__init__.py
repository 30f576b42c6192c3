"""The compression methods, registered by name: `list_methods()`, `get_method(name)`.

Each method module registers itself in `base.METHODS` when imported; this package imports all of
them explicitly, so the registry is complete as soon as the package is imported.
"""

from __future__ import annotations

from ..errors import PruningError
from . import dgssa_glad, patch_slimming, vtp  # noqa: F401  (importing a method registers it)
from .base import METHODS, Method, MethodResult


def list_methods() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise PruningError(f"unknown method {name!r}: choose one of {list_methods()}")
    return METHODS[name]


__all__ = ["Method", "MethodResult", "get_method", "list_methods"]

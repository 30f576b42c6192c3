"""Settings are declared once: a frozen dataclass field carries its default and its help text.

The CLI flags, the recipe keys and the reports are generated from these dataclasses
(`vitslim.cli` reads `help_of`), so a default or a description lives in one place.
"""
from __future__ import annotations

import dataclasses
from typing import Any


def setting(default: Any, help: str) -> Any:  # noqa: A002 (argparse's name for it)
    """A dataclass field with `default` and the one-line `help` the CLI shows."""
    return dataclasses.field(default=default, metadata={"help": help})


def help_of(field: dataclasses.Field) -> str:
    return field.metadata.get("help", "")

"""Settings are declared once: a frozen dataclass field carries its default and its help text.

The CLI flags, the recipe keys and the reports are generated from these dataclasses
(`vitslim.cli` reads `help_of`), so a default or a description lives in one place.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional


def setting(default: Any, help: str, **spelling: Any) -> Any:  # noqa: A002 (argparse's name for it)
    """A dataclass field with `default` and the one-line `help` the CLI shows. `spelling` says
    how the field reads from text where its name and type do not: `flag` (the CLI flag, default
    --field-name), `choices`, `metavar`, and `item` (turns one text value into the field's value,
    or into one element of a tuple field, e.g. BatchProfile.parse)."""
    return dataclasses.field(default=default, metadata={"help": help, **spelling})


def help_of(field: dataclasses.Field) -> str:
    return field.metadata.get("help", "")


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def value_type(field: dataclasses.Field) -> tuple[type, bool]:
    """(the type of a settings field's values, whether None is allowed), from its annotation
    ('Optional[float]' -> (float, True))."""
    name = str(field.type)
    optional = name.startswith("Optional[")
    return _TYPES[name.removeprefix("Optional[").removesuffix("]")], optional


def check_value(field: dataclasses.Field, value: Any) -> Optional[str]:
    """None if `value` suits the field, else what was expected ('an integer', ...)."""
    kind, optional = value_type(field)
    if value is None and optional:
        return None
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        return None
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[kind] + (
        " or null" if optional else ""
    )


def non_finite_fields(settings: Any) -> list[str]:
    """The fields of a settings dataclass whose number is NaN or infinite. Every comparison with
    NaN is false, so a NaN threshold or duration would silently switch a check or a limit off;
    settings refuse them by name in __post_init__."""
    import math

    return [
        field.name
        for field in dataclasses.fields(settings)
        if isinstance(getattr(settings, field.name), float) and not math.isfinite(getattr(settings, field.name))
    ]


def refuse_non_finite(settings: Any, error_type: type[Exception]) -> None:
    """Raise `error_type` naming the flags of every NaN or infinite field of `settings` (call it
    first in a settings dataclass's __post_init__)."""
    names = non_finite_fields(settings)
    if names:
        flags = ", ".join("--" + name.replace("_", "-") for name in names)
        raise error_type(f"{flags} must be a finite number (not NaN or infinity)")

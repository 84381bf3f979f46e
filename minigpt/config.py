"""Settings declared once: each dataclass field carries its default, help text and valid range.

From that one declaration come validation (`check_fields`, called by a config's __post_init__),
the command line (`add_arguments`), TOML files (`read_toml`) and what a checkpoint stores. Types
are strict, as in the declaration: a bool is not an int, a float setting must be finite, and an
int is accepted for a float setting (``learning_rate = 1``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from typing import Any, NoReturn

import numpy as np

from minigpt.errors import UserError


class InvalidSetting(ValueError):
    """A setting's value has the wrong type or is out of its range. `name` is the field's name."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name} {problem}")
        self.name, self.problem = name, problem


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: tuple[str, ...] | None = None,
    cli: bool = True,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with its help text and range: [low, high], ends left out with low_open/high_open.

    `cli=False` keeps a field off the command line and out of config files (it is derived, e.g. the
    model's vocabulary size comes from the tokenizer).
    """
    metadata = dict(help=help, low=low, high=high, low_open=low_open, high_open=high_open, choices=choices, cli=cli)
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_types(cls: type) -> dict[str, tuple[type, bool]]:
    """{field name: (base type, None allowed)} from a dataclass's annotations."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next(a for a in args if a is not type(None)) if args else hint
        out[name] = (base, optional)
    return out


def coerce(name: str, value: Any, kind: type, optional: bool = False) -> Any:
    """`value` as a `kind` setting, strictly: raises InvalidSetting for a wrong type or a non-finite float."""
    if value is None and optional:
        return None
    if kind is bool:
        ok = isinstance(value, (bool, np.bool_))
    elif kind is int:
        ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    elif kind is float:
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise InvalidSetting(name, f"must be {_type_name(kind)}, got {value!r}")
    if kind in (bool, int, float):
        value = kind(value)
    if kind is float and not math.isfinite(value):
        raise InvalidSetting(name, f"must be a finite number, got {value!r}")
    return value


def check_fields(obj: Any) -> None:
    """Type-check (converting ints to floats where declared) and range-check every field of `obj`."""
    types = field_types(type(obj))
    for f in dataclasses.fields(obj):
        kind, optional = types[f.name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(getattr(obj, f.name), kind):
                raise InvalidSetting(f.name, f"must be a {kind.__name__}, got {getattr(obj, f.name)!r}")
            continue
        value = coerce(f.name, getattr(obj, f.name), kind, optional)
        setattr(obj, f.name, value)
        if value is not None and (problem := _range_problem(f.metadata, value)):
            raise InvalidSetting(f.name, f"must be {problem}, got {value!r}")


def _type_name(kind: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, kind.__name__)


def _range_problem(meta: Any, value: Any) -> str | None:
    """What `value` must be if it is outside the field's declared range/choices, else None."""
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        return "one of " + ", ".join(choices)
    low, high = meta.get("low"), meta.get("high")
    too_low = low is not None and (value <= low if meta.get("low_open") else value < low)
    too_high = high is not None and (value >= high if meta.get("high_open") else value > high)
    if not (too_low or too_high):
        return None
    if high is None:
        return "positive" if low == 0 and meta.get("low_open") else "non-negative" if low == 0 else f">= {low}"
    left = "(" if meta.get("low_open") else "["
    right = ")" if meta.get("high_open") else "]"
    return f"in {left}{low}, {high}{right}"


# ----------------------------------------------------------------------------- flat namespaces


def flat_fields(cls: type) -> dict[str, tuple[dataclasses.Field, type, bool]]:
    """The settings of `cls` as one flat namespace {name: (field, type, optional)}.

    A field whose type is itself a dataclass (RunConfig.model: GPTConfig) contributes its own
    fields instead of itself, so the command line says `--n-layer`, not `--model.n-layer`. Fields
    declared with cli=False are left out. Names must be unique across the levels.
    """
    out: dict[str, tuple[dataclasses.Field, type, bool]] = {}
    types = field_types(cls)
    for f in dataclasses.fields(cls):
        kind, optional = types[f.name]
        if dataclasses.is_dataclass(kind):
            for name, entry in flat_fields(kind).items():
                assert name not in out, f"setting {name} is declared twice"
                out[name] = entry
        elif f.metadata.get("cli", True):
            assert f.name not in out, f"setting {f.name} is declared twice"
            out[f.name] = (f, kind, optional)
    return out


def from_flat(cls: type, settings: dict[str, Any]) -> Any:
    """Build `cls` from a flat {name: value} dict (see `flat_fields`); nested configs are built too."""
    unknown = sorted(set(settings) - set(flat_fields(cls)))
    if unknown:
        raise InvalidSetting(unknown[0], "is not a setting")
    kwargs: dict[str, Any] = {}
    types = field_types(cls)
    for f in dataclasses.fields(cls):
        kind = types[f.name][0]
        if dataclasses.is_dataclass(kind):
            kwargs[f.name] = from_flat(kind, {k: v for k, v in settings.items() if k in flat_fields(kind)})
        elif f.name in settings:
            kwargs[f.name] = settings[f.name]
    return cls(**kwargs)


def to_flat(obj: Any) -> dict[str, Any]:
    """The inverse of `from_flat`: every setting of `obj` by its flat name."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(to_flat(value))
        elif f.metadata.get("cli", True):
            out[f.name] = value
    return out


# ----------------------------------------------------------------------------- command line and files


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line and exit 2 (a UserError for `cli_main`), not usage + message."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message}; see --help")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per setting of `cls`; values are left unset unless given (argument_default=SUPPRESS),
    so the caller sees exactly which settings the user chose."""
    defaults = to_flat(cls())
    for name, (f, kind, _) in flat_fields(cls).items():
        text = f.metadata.get("help") or name.replace("_", " ")
        default = defaults[name]
        if default is not None:
            text += f" (default: {default!r})" if isinstance(default, str) else f" (default: {default})"
        if kind is bool:
            parser.add_argument(flag(name), action=argparse.BooleanOptionalAction, help=text, default=argparse.SUPPRESS)
        else:
            parser.add_argument(flag(name), type=kind, metavar=name.upper(), help=text, default=argparse.SUPPRESS)


def read_toml(path: str, cls: type) -> dict[str, Any]:
    """The settings in a TOML file, keyed as the dataclass fields are (underscores, one spelling),
    each strictly of its declared type. Raises InvalidSetting/OSError/ValueError; the CLI reports them."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    known = flat_fields(cls)
    settings = {}
    for key, value in raw.items():
        if key not in known:
            hint = f"; write it {key.replace('-', '_')}" if key.replace("-", "_") in known else ""
            raise InvalidSetting(key, f"is not a setting{hint}")
        _, kind, optional = known[key]
        settings[key] = coerce(key, value, kind, optional)
    return settings


__all__ = [
    "ArgumentParser",
    "InvalidSetting",
    "add_arguments",
    "check_fields",
    "flat_fields",
    "from_flat",
    "read_toml",
    "setting",
    "to_flat",
]

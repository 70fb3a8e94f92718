"""Mappings (parsed YAML) -> typed config dataclasses, failing on the first thing wrong.

`build(schema, mapping, path)` checks every key and type against the dataclass `schema` and
raises a `RecipeError` that names the key's full path: an unknown key with the nearest valid
one ("did you mean"), a wrong type with the expected and the given type, a missing required
key. Every layer raises `RecipeError` for a setting the user must fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union


class RecipeError(ValueError):
    """A recipe problem the user must fix; the CLI prints it and exits with code 2."""


def build(schema: type, data: Any, path: str):
    """Construct dataclass `schema` from `data`, checking every key and type."""
    if not isinstance(data, dict):
        raise RecipeError(f"{path or 'recipe'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = (
                f"; did you mean {join(path, close[0])!r}?"
                if close
                else f"; valid keys: {', '.join(sorted(fields))}"
            )
            raise RecipeError(f"unknown key {join(path, key)!r}{hint}")
    values = {}
    for name, field in fields.items():
        if name in data:
            values[name] = convert(hints[name], data[name], join(path, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise RecipeError(f"missing required key {join(path, name)!r}")
    try:
        return schema(**values)
    except RecipeError:
        raise  # a section's own check, which names its key path
    except (TypeError, ValueError) as error:
        raise RecipeError(f"{path or 'recipe'}: {error}") from None


def convert(hint, value, path: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return convert(option, value, path)
            except RecipeError as error:
                errors.append(error)
        shaped = [error for option, error in zip(options, errors) if same_shape(option, value)]
        raise (
            shaped[0]
            if len(shaped) == 1
            else RecipeError(
                f"{path}: expected {describe(hint)}, got {type(value).__name__} {value!r}"
            )
        )
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"{path}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise RecipeError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        items = [convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        key_type, value_type = args or (Any, Any)
        return {
            convert(key_type, k, f"{path}.{k}"): convert(value_type, v, f"{path}.{k}")
            for k, v in value.items()
        }
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # PyYAML (YAML 1.1) reads 3e-3, without a dot, as a string
        except ValueError:
            pass
    if hint is int and isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)  # mapping keys in YAML overrides arrive as strings
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise RecipeError(
            f"{path}: expected {describe(hint)}, got {type(value).__name__} {value!r}"
        )
    return value


def same_shape(hint, value) -> bool:
    """Whether `value` is the kind of YAML node `hint` is built from (a list for a list, a
    mapping for a dataclass or dict, else a scalar): the one option of a union worth naming."""
    origin = typing.get_origin(hint) or hint
    if isinstance(value, list):
        return origin in (list, tuple)
    if isinstance(value, dict):
        return origin is dict or dataclasses.is_dataclass(hint)
    return origin not in (list, tuple, dict) and not dataclasses.is_dataclass(hint)


def describe(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)

"""Recipe files -> typed dataclasses, failing before any work on the first thing wrong.

`load_recipe(path, overrides, schema)` reads YAML, applies `key.sub=value` overrides (values
parsed as YAML), and builds the dataclass `schema` (moetune.config.build, whose
`RecipeError`s name the key's full path); `save_recipe` writes a built recipe back (a run's
`recipe.yaml`, which `load_recipe` reads into the same dataclasses).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import yaml

from moetune.config.build import RecipeError, build
from moetune.config.schema import SCHEMAS


def load_recipe(path: str | Path, overrides: list[str], schema: type | None = None):
    """The recipe at `path` with `overrides` applied, as the dataclass `schema`, or, when
    schema is None, as the schema its `recipe:` key names (moetune.config.schema.SCHEMAS)."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"recipe {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path}: the top level must be a mapping of sections")
    for override in overrides:
        apply_override(raw, override)
    if schema is None:
        kind = raw.get("recipe")
        if kind not in SCHEMAS:
            raise RecipeError(f"recipe: expected one of {sorted(SCHEMAS)}, got {kind!r}")
        schema = SCHEMAS[kind]
    return build(schema, raw, "")


RUN_RECIPE = "recipe.yaml"  # the resolved recipe a run leaves beside its checkpoint


def save_recipe(recipe, folder: str | Path) -> Path:
    """Write the resolved `recipe` (every default filled in) to folder/recipe.yaml,
    atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path, partial = folder / RUN_RECIPE, folder / f".{RUN_RECIPE}.partial"
    partial.write_text(yaml.safe_dump(dataclasses.asdict(recipe), sort_keys=False))
    os.replace(partial, path)
    return path


def apply_override(raw: dict, override: str) -> None:
    """`a.b.c=value` sets raw["a"]["b"]["c"] = yaml(value)."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise RecipeError(f"override {override!r}: expected key.sub=value")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {override!r}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(value)

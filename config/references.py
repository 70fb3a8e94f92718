"""Functions a recipe names by reference, `package.module:function` or `path/to/file.py:function`
(a reward, an answer extraction). A file is imported once per path."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path


class UnresolvedReference(LookupError):
    """The module, file or function a reference names is not there."""


def is_reference(name: str) -> bool:
    return ":" in name


def load_reference(reference: str, what: str) -> Callable:
    """The function `reference` names; errors say `what` it was for (e.g. "reward")."""
    module_ref, _, attribute = reference.rpartition(":")
    if module_ref.endswith(".py"):
        module = _load_file(Path(module_ref), what)
    else:
        try:
            module = importlib.import_module(module_ref)
        except ImportError as error:
            raise UnresolvedReference(
                f"{what} {reference!r}: cannot import {module_ref!r}: {error}"
            )
    fn = getattr(module, attribute, None)
    if not callable(fn):
        raise UnresolvedReference(
            f"{what} {reference!r}: {module_ref!r} has no function {attribute!r}"
        )
    return fn


def _load_file(path: Path, what: str):
    """Import a .py file once per path, under a name derived from that path."""
    path = path.resolve()
    if not path.is_file():
        raise UnresolvedReference(f"{what} file {str(path)!r} does not exist")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    module_name = f"moetune_{what.replace(' ', '_')}_file_{path.stem}_{digest}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
    return sys.modules[module_name]

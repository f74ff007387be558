"""Old import paths of modules that moved, kept working with a ``DeprecationWarning`` (``import edropout.cli``
gives ``edropout.app.cli``)."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {f"edropout.{name}": f"edropout.app.{name}"
         for name in ("cli", "data", "models", "training", "report", "checkpoint")}
MOVED["edropout.compact_training"] = "edropout.exported_training"


class _AliasLoader(importlib.abc.Loader):
    """Loads an old name as the module at its new place (the same module object, so state is shared)."""

    def __init__(self, new_name: str):
        self.new_name = new_name

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {self.new_name}; import it from there", DeprecationWarning,
                      stacklevel=3)
        return importlib.import_module(self.new_name)

    def exec_module(self, module):
        """The module was executed under its new name already."""


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old names listed in ``MOVED``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(MOVED[fullname]))


def install() -> None:
    """Register the finder once, first: an old name resolves to the new module even where a stale file of the
    old name is still on a path (an older editable install)."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())

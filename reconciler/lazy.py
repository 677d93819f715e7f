"""Modules loaded on first use, so that `reconciler --help` and light commands start fast.

`cli.py` names `run` and `render` through `lazy_module`: the pydantic models, the providers (httpx, JWT and its
cryptography), the templates (jinja2) and the YAML parsers behind them are imported when a command first
touches them, not when the command line is parsed. `tests/test_startup.py` checks which modules load.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_module(name: str) -> ModuleType:
    """The module `name`, executed on first attribute access (the standard library's `LazyLoader`)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module

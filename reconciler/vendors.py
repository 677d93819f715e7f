"""The vendor registry: every vendor is one provider class, registered in one place.

A vendor is registered under the entry-point group `reconciler.vendors` (`pyproject.toml` for the built-in
five; a vendor in its own package declares the same group): the entry's name is the vendor's name as a
policy's `vendor:` says it, its value the provider class, `module:Class`. The class carries the whole
declaration (`reconciler.providers.base.Provider`):

- `vendor`: its name (must be the entry's name), and `default_url`, its production base URL;
- `capabilities`: what it can express, as data (`reconciler.resources.Capabilities`);
- `settings_model`: its system settings (`lock_holder_id`, ...) as a pydantic model; `validate` checks a
  system entry's settings with it, at `file:line:col`. The entry is a union discriminated on `vendor`: the
  keys every system has, plus the settings model of the vendor it names;
- `simulator`: its sandbox, `module:Class`, imported only when a system says `url: sandbox` or
  `reconciler sandbox serve` runs;
- `credential_variables`: the environment variables the documentation names for its credentials.

Nothing here imports a provider statically (the policy checks read this module, and `policy` may not import
`providers`): the names come from the installed metadata, and a vendor's provider module is imported when that
vendor is first asked for, so validating a policy loads the providers of the vendors it names and no other. The core reads `Vendor`s and `Capabilities`; it never names a vendor.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from pydantic import BaseModel

from reconciler.errors import ReconcilerError
from reconciler.resources import Capabilities

GROUP = "reconciler.vendors"


class RegistryError(ReconcilerError):
    """A registered vendor whose declaration cannot be used (a packaging mistake, not a policy one)."""


@dataclass(frozen=True)
class Vendor:
    """One registered vendor, as the core sees it."""

    name: str
    provider: Any                                  # the provider class (a `Provider` subclass)
    capabilities: Capabilities                     # completed: name, production URL, settings from the model
    settings_model: type[BaseModel] | None = None  # a pydantic model of the system settings, or None: no settings
    simulator: str | None = None                   # "module:Class" of its sandbox, or None: no sandbox
    credential_variables: Mapping[str, str] = field(default_factory=dict)   # credential key → documented variable

    def load_simulator(self) -> Callable[..., Any]:
        """The simulator class; imported here, on first use, never at start-up."""
        if not self.simulator:
            raise RegistryError(f"vendor {self.name} has no sandbox: give its system a url")
        return load_object(self.simulator)

    def credential_variable(self, key: str) -> str:
        """The variable a credential is conventionally read from: the documented one, else VENDOR_KEY."""
        return self.credential_variables.get(key) or f"{self.name}_{key}".upper().replace("-", "_")


def load_object(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


_lock = threading.Lock()
_entries: dict[str, EntryPoint] | None = None
_loaded: dict[str, Vendor] = {}


def _registered() -> dict[str, EntryPoint]:
    """name → entry point, from the installed metadata only."""
    global _entries
    if _entries is None:
        found: dict[str, EntryPoint] = {}
        for entry in sorted(entry_points(group=GROUP), key=lambda e: (e.name, e.value)):
            if entry.name in found and found[entry.name].value != entry.value:
                raise RegistryError(f"vendor {entry.name} is registered twice ({found[entry.name].value} and "
                                    f"{entry.value}); uninstall one of the packages")
            found[entry.name] = entry
        if not found:
            raise RegistryError(f"no vendor is registered (entry-point group {GROUP}): reinstall reconciler, "
                                "e.g. `pip install -e .` in a checkout")
        _entries = found
    return _entries


def names() -> tuple[str, ...]:
    """The registered vendor names, sorted; reads only the metadata (no provider is imported)."""
    return tuple(_registered())


def get(name: str) -> Vendor | None:
    """One vendor's declaration; its provider module is imported on first use, and only its own."""
    entry = _registered().get(name)
    if entry is None:
        return None
    with _lock:
        if name not in _loaded:
            _loaded[name] = declaration(name, entry.load())
        return _loaded[name]


def vendors() -> dict[str, Vendor]:
    """Every registered vendor by name (imports every provider module: `sandbox serve`, the JSON Schema)."""
    return {name: vendor for name in names() if (vendor := get(name)) is not None}


class _Capabilities(Mapping[str, Capabilities]):
    """vendor name → `Capabilities`, loading a vendor only when the policy names it."""

    def __getitem__(self, name: str) -> Capabilities:
        vendor = get(name)
        if vendor is None:
            raise KeyError(name)
        return vendor.capabilities

    def __iter__(self) -> Iterator[str]:
        return iter(names())

    def __len__(self) -> int:
        return len(names())


def capabilities() -> Mapping[str, Capabilities]:
    """vendor name → `Capabilities`, what the policy checks read."""
    return _Capabilities()


def settings_model(name: str) -> type[BaseModel] | None:
    vendor = get(name)
    return vendor.settings_model if vendor is not None else None


def declaration(name: str, cls: Any) -> Vendor:
    """A provider class's declaration, checked and completed: the registry is the one place a name is bound."""
    declared = getattr(cls, "vendor", None)
    if declared != name:
        raise RegistryError(f"{cls.__module__}.{cls.__qualname__} is registered as vendor {name} but declares "
                            f"vendor = {declared!r}")
    caps = getattr(cls, "capabilities", None)
    if not isinstance(caps, Capabilities):
        raise RegistryError(f"vendor {name}: {cls.__qualname__}.capabilities is not a Capabilities")
    model = getattr(cls, "settings_model", None)
    if model is not None and not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise RegistryError(f"vendor {name}: {cls.__qualname__}.settings_model is not a pydantic model")
    settings, required = frozenset(caps.settings), frozenset(caps.required_settings)
    if model is not None:
        fields = model.model_fields
        settings = frozenset(info.alias or key for key, info in fields.items())
        required = frozenset(info.alias or key for key, info in fields.items() if info.is_required())
    simulator = getattr(cls, "simulator", None)
    if simulator is not None and not re.fullmatch(r"[\w.]+:\w+", simulator):
        raise RegistryError(f"vendor {name}: simulator must be 'module:Class', not {simulator!r}")
    completed = dataclasses.replace(caps, vendor=name, production_url=getattr(cls, "default_url", "") or "",
                                    settings=settings, required_settings=required)
    return Vendor(name=name, provider=cls, capabilities=completed, settings_model=model, simulator=simulator,
                  credential_variables=dict(getattr(cls, "credential_variables", None) or {}))


def reset() -> None:
    """Forget what was read (tests that install a vendor at run time)."""
    global _entries
    with _lock:
        _entries = None
        _loaded.clear()

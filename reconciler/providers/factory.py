"""Build providers for policy systems; the one place that wires `url: sandbox` to a simulator.

Called by `reconciler.run`. Which class serves a vendor comes from the registry (`reconciler.vendors`, the
entry-point group `reconciler.vendors`); nothing here names a vendor. A system with `url: sandbox` gets its
vendor's simulator (imported then, not at start-up) as its httpx transport, its state persisted under
`<state dir>/sandbox/<system>.json` so that separate CLI runs see the same vendor, and the simulator's own
credentials.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from reconciler import vendors
from reconciler.errors import StateError
from reconciler.providers.base import Provider
from reconciler.providers.settings import VendorSettings
from reconciler.resources import Capabilities
from reconciler.secret import Secret
from reconciler.state import StateStore

SANDBOX_BASE = "https://sandbox.invalid"


def capabilities() -> Mapping[str, Capabilities]:
    """vendor → what it can express (with its production URL), for the policy checks."""
    return vendors.capabilities()


def build_provider(system: Any, state: StateStore, *, sandbox_dir: Path, clock: Callable[[], datetime],
                   transport: httpx.BaseTransport | None = None, **options: Any) -> Provider:
    """`system` is a policy `SystemConfig` (name, vendor, url, credentials, settings). `clock` is the
    session's: the provider and an embedded simulator both run on it, so `--now` moves the vendor too."""
    vendor = vendors.get(system.vendor)
    if vendor is None:
        raise vendors.RegistryError(f"vendor {system.vendor} is not registered")   # validate says so first
    cls: type[Provider] = vendor.provider
    url, credentials = system.url, dict(system.credentials)
    if system.is_sandbox:
        store = sandbox_dir / f"{system.name}.json"
        try:
            simulator = vendor.load_simulator()(store_path=store, clock=clock)
        except ValueError as exc:   # the store of another vendor's system of the same name (a shared --state)
            raise StateError(f"the sandbox store {store} is not this system's ({exc}): another policy with a "
                             f"system named '{system.name}' shares this state; give each policy directory its own "
                             "--state (the default does), or delete the store to start over") from None
        transport = transport or httpx.MockTransport(simulator.handle)
        credentials = {k: Secret(v) for k, v in simulator.credentials.items()}
        url = SANDBOX_BASE
    options.setdefault("deadline", system.deadline)
    options.setdefault("concurrency", system.concurrency)
    return cls(system.name, url=url, credentials=credentials, settings=settings_of(cls, system.settings), state=state,
               clock=clock, transport=transport, **options)


def settings_of(cls: type[Provider], settings: Mapping[str, Any]) -> VendorSettings:
    """The system's settings as the vendor's model instance, from the keys `validate` checked with that model
    (`policy.checks`): a policy that validated cannot fail here."""
    model = cls.settings_model
    return model.model_validate({k: v for k, v in settings.items() if k in model.model_fields})


def sandbox_mounts(directory: Path, *, rate_limit: int | None = None, clock: Callable[[], datetime] | None = None,
                   ) -> tuple[dict[str, Any], dict[str, Mapping[str, str]]]:
    """Simulators to serve over sockets, one per vendor under `/<vendor>`, and their credentials. Without
    `clock`, each runs on its own vendor clock (the machine's), as a real vendor does."""
    mounts: dict[str, Any] = {}
    credentials: dict[str, Mapping[str, str]] = {}
    options: dict[str, Any] = {"clock": clock} if clock is not None else {}
    for name, vendor in vendors.vendors().items():
        if vendor.simulator is None:
            continue
        simulator = vendor.load_simulator()(store_path=directory / f"{name}.json", rate_limit=rate_limit, **options)
        mounts[f"/{name}"] = simulator.handle
        credentials[name] = simulator.credentials
    return mounts, credentials


def serve(host: str, port: int, mounts: dict[str, Any], ready: Any = None, on_bound: Any = None) -> None:
    from reconciler.sandbox.server import serve as serve_http

    serve_http(host, port, mounts, ready=ready, on_bound=on_bound)

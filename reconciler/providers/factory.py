"""Build providers for policy systems; the one place that wires `url: sandbox` to a simulator.

Called by `reconciler.run`. A system with `url: sandbox` gets the embedded vendor simulator as its httpx
transport, its state persisted under `<state dir>/sandbox/<system>.json` so that separate CLI runs see
the same vendor, and the simulator's own credentials.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import httpx

from reconciler.providers.abloy import AbloyProvider
from reconciler.providers.base import Provider, StateStore
from reconciler.resources import Capabilities
from reconciler.secret import Secret
from reconciler.sandbox.abloy import AbloySimulator

PROVIDERS: dict[str, type[Provider]] = {AbloyProvider.vendor: AbloyProvider}
SIMULATORS: dict[str, Callable[..., Any]] = {AbloyProvider.vendor: AbloySimulator}
SANDBOX_BASE = "https://sandbox.invalid"


def capabilities() -> dict[str, Capabilities]:
    return {vendor: cls.capabilities for vendor, cls in PROVIDERS.items()}


def build_provider(system: Any, state: StateStore, *, sandbox_dir: Path,
                   transport: httpx.BaseTransport | None = None, **options: Any) -> Provider:
    """`system` is a policy `SystemConfig` (name, vendor, url, credentials, settings)."""
    cls = PROVIDERS[system.vendor]
    url, credentials = system.url, dict(system.credentials)
    if url == "sandbox":
        simulator = SIMULATORS[system.vendor](store_path=sandbox_dir / f"{system.name}.json")
        transport = transport or httpx.MockTransport(simulator.handle)
        credentials = {k: Secret(v) for k, v in simulator.credentials.items()}
        url = SANDBOX_BASE
    return cls(system.name, url=url, credentials=credentials, settings=system.settings, state=state,
               transport=transport, **options)


def sandbox_mounts(directory: Path, *, rate_limit: int | None = None) -> tuple[dict[str, Any], dict[str, Mapping[str, str]]]:
    """Simulators to serve over sockets, one per vendor under `/<vendor>`, and their credentials."""
    mounts: dict[str, Any] = {}
    credentials: dict[str, Mapping[str, str]] = {}
    for vendor, factory in SIMULATORS.items():
        simulator = factory(store_path=directory / f"{vendor}.json", rate_limit=rate_limit)
        mounts[f"/{vendor}"] = simulator.handle
        credentials[vendor] = simulator.credentials
    return mounts, credentials


def serve(host: str, port: int, mounts: dict[str, Any], ready: Any = None) -> None:
    from reconciler.sandbox.server import serve as serve_http

    serve_http(host, port, mounts, ready=ready)

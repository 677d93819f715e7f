"""Vendor simulators ("sandboxes"): one per vendor, each an httpx transport handler with a store.

The provider factory wires `url: sandbox` to `SIMULATORS[vendor](store_path)` through
`httpx.MockTransport(sim.handle)`; `reconciler sandbox serve` mounts the same handlers over sockets with
`reconciler.sandbox.server`. The core (planner, policy, applier, …) never imports this package.
"""

from __future__ import annotations

from reconciler.sandbox.abloy import AbloySimulator
from reconciler.sandbox.common import Simulator, SimulatorError
from reconciler.sandbox.sentry import SentrySimulator
from reconciler.sandbox.spkey import SpkeySimulator
from reconciler.sandbox.unloc import UnlocSimulator
from reconciler.sandbox.unloc_partner import UnlocPartnerSimulator

# vendor name (as in a policy's `vendor:`) → simulator class; the mount prefix when served is `/<vendor>`.
SIMULATORS: dict[str, type[Simulator]] = {
    "abloy-keyless": AbloySimulator,
    "sentry": SentrySimulator,
    "spkey": SpkeySimulator,
    "unloc": UnlocSimulator,
    "unloc-partner": UnlocPartnerSimulator,
}

__all__ = ["SIMULATORS", "AbloySimulator", "Simulator", "SimulatorError"]

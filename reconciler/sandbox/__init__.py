"""Vendor simulators ("sandboxes"): one per vendor, each an httpx transport handler with a store.

The provider factory wires `url: sandbox` to `SIMULATORS[vendor](store_path)` through
`httpx.MockTransport(sim.handle)`; `reconciler sandbox serve` mounts the same handlers over sockets with
`reconciler.sandbox.server`. The core (planner, policy, applier, …) never imports this package.
"""

from __future__ import annotations

from reconciler.sandbox.abloy import AbloySimulator
from reconciler.sandbox.common import Simulator, SimulatorError

# vendor name (as in a policy's `vendor:`) → simulator class; the mount prefix when served is `/<vendor>`.
SIMULATORS: dict[str, type[Simulator]] = {
    "abloy-keyless": AbloySimulator,
}

__all__ = ["SIMULATORS", "AbloySimulator", "Simulator", "SimulatorError"]

"""Vendor simulators ("sandboxes"): one per vendor, each an httpx transport handler with a store.

A provider names its simulator in its declaration (`simulator = "module:Class"`, see `reconciler.vendors`);
the provider factory imports it only when a system says `url: sandbox` (wired through
`httpx.MockTransport(sim.handle)`) or `reconciler sandbox serve` runs (the same handlers over sockets, with
`reconciler.sandbox.server`). Importing this package imports no simulator, and the core (planner, policy,
applier, …) never imports it.
"""

"""What a system's `url:` may name, stated once: the word for the embedded simulator, and loopback hosts.

Imported by the policy checks (which URLs a policy may send credentials to), the provider factory (which
system gets a simulator) and the sandbox server (which addresses it binds without `--allow-remote`). It
imports nothing of reconciler, so any layer may use it.
"""

from __future__ import annotations

import ipaddress

SANDBOX = "sandbox"     # `url: sandbox`: the vendor's simulator, embedded; its own credentials, no network


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback IP address (127.0.0.0/8, ::1); a name is never resolved."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

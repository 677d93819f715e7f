"""The one vendor test harness: a policy directory, one simulated system behind the httpx transport seam, and
plan/apply through `reconciler.run` exactly as the CLI does.

What differs per vendor is data, one `Vendor` row each (`ABLOY`, `UNLOC`, `UNLOC_PARTNER`, `SPKEY`, `SENTRY`
below): the system's name, vendor, URL and settings, the simulator, the credentials in the environment, the
allowed host. `VendorHarness(tmp_path, UNLOC)` is the harness for one. Every exchange through the transport is kept (`exchanges`), for the tests
that look at what was sent and answered. A test may replace `sim`, `sim.handle`, `env` or `session`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from reconciler import run
from reconciler.sandbox import sentry, unloc, unloc_partner
from reconciler.sandbox.abloy import AbloySimulator
from reconciler.sandbox.sentry import SentrySimulator
from reconciler.sandbox.spkey import SpkeySimulator
from reconciler.sandbox.unloc import UnlocSimulator
from reconciler.sandbox.unloc_partner import UnlocPartnerSimulator

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Vendor:
    """What a vendor's tests set up: system `system` of `vendor` at `url` (on the allowed `host`).

    `simulator(clock=..., **options)` builds the simulator; `env(sim)` gives the credentials the policy's
    `${...}` read. `settings` is the system entry's YAML after `url`; `unmanaged`, when set, is written into it
    too. `policy_file` is the policy's file name and `files` further policy files written beside it.
    `provider_clock`: the provider reads the harness's clock (`provider_options["clock"]`).
    """

    system: str
    vendor: str
    url: str
    host: str
    simulator: Callable[..., Any]
    env: Callable[[Any], dict[str, str]]
    settings: str = ""
    unmanaged: str | None = None
    policy_file: str = "policy.yaml"
    files: Mapping[str, str] = field(default_factory=dict)
    provider_clock: bool = False


class VendorHarness:
    """A policy directory plus one simulated system of `vendor`, on the harness's clock (`now`, which a test
    may move); `sim_options` go to the simulator."""

    def __init__(self, tmp_path: Path, vendor: Vendor, **sim_options: Any):
        self.tmp_path = tmp_path
        self.vendor = vendor
        self.policy_dir = tmp_path / "policies"
        self.policy_dir.mkdir()
        self.state_path = tmp_path / "state" / "state.json"
        self.now = NOW
        self.sim = vendor.simulator(**{"clock": lambda: self.now, **sim_options})
        self.env = vendor.env(self.sim)
        self.sleeps: list[float] = []
        self.sleep: Callable[[float], Any] = self.sleeps.append
        self.allowed_hosts = [vendor.host]      # as an operator's --allow-host would
        self.exchanges: list[tuple[httpx.Request, httpx.Response | None]] = []   # None: the transport failed
        self.provider_options: dict[str, Any] = {"clock": lambda: self.now} if vendor.provider_clock else {}

    # --- the policy
    def write(self, text: str, name: str | None = None, system_extra: str = "", *, unmanaged: str | None = None,
              **files: str) -> None:
        """The systems file, the policy `text` (as `name`, default the vendor's `policy_file`) and the further
        files (a test may give other contents by stem: `write(text, people=...)` for `people.yaml`)."""
        v = self.vendor
        entry = f"vendor: {v.vendor}\nurl: {v.url}\n" + textwrap.dedent(v.settings)
        if unmanaged or v.unmanaged:
            entry += f"unmanaged: {unmanaged or v.unmanaged}\n"
        entry += textwrap.dedent(system_extra)
        (self.policy_dir / "systems.yaml").write_text(f"systems:\n  {v.system}:\n" + textwrap.indent(entry, "    "))
        for path, content in {**v.files, **{f"{stem}.yaml": content for stem, content in files.items()}}.items():
            (self.policy_dir / path).write_text(textwrap.dedent(content))
        (self.policy_dir / (name or v.policy_file)).write_text(textwrap.dedent(text))

    # --- the vendor, through the transport seam
    def handle(self, request: httpx.Request) -> httpx.Response:
        request.read()
        try:
            response = self.sim.handle(request)
        except httpx.TransportError:
            self.exchanges.append((request, None))
            raise
        self.exchanges.append((request, response))
        return response

    def raw(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request to the simulator by the test itself (not the provider under test), not recorded."""
        with httpx.Client(transport=httpx.MockTransport(self.sim.handle), base_url=self.vendor.url) as client:
            return client.request(method, path, **kwargs)

    # --- plan and apply as the CLI does
    def session(self) -> run.Session:
        return run.Session(directory=self.policy_dir, state_path=self.state_path, env=self.env, now=self.now,
                           transports={self.vendor.system: httpx.MockTransport(self.handle)},
                           provider_options={"sleep": self.sleep, **self.provider_options},
                           allowed_hosts=tuple(self.allowed_hosts))

    def plan(self) -> Any:
        return run.plan(self.session())

    def apply(self, *, saved: Any = None, **kwargs: Any) -> Any:
        return run.apply(self.session(), saved=saved, approve=lambda plan: True, **kwargs)

    def converge(self, attempts: int = 6) -> None:
        """Apply until a run reports success, as an operator re-running apply would."""
        for _ in range(attempts):
            _, report = self.apply()
            if report is None or report.ok:
                return
        raise AssertionError(f"did not converge: {report.lines()}")


# --- the five built-in vendors, one row each ------------------------------------------------------------

def _abloy_env(sim: Any) -> dict[str, str]:
    creds = sim.credentials
    return {"ABLOY_USER_ID": creds["user_id"], "ABLOY_ACCESS_KEY": creds["access_key"], "ABLOY_API_KEY": creds["api_key"]}


ABLOY = Vendor("hq", "abloy-keyless", "https://abloy.test/administration", "abloy.test", AbloySimulator, _abloy_env,
               settings='credentials:\n  user_id: "${ABLOY_USER_ID}"\n  access_key: "${ABLOY_ACCESS_KEY}"\n'
                        '  api_key: "${ABLOY_API_KEY}"\n')
UNLOC = Vendor("cabins", "unloc", "https://unloc.test", "unloc.test", UnlocSimulator,
               lambda sim: {"UNLOC_CLIENT_ID": unloc.CLIENT_ID, "UNLOC_CLIENT_SECRET": unloc.CLIENT_SECRET},
               settings=f"lock_holder_id: {unloc.LOCK_HOLDER_ID}\ncredentials:\n"
                        '  client_id: "${UNLOC_CLIENT_ID}"\n  client_secret: "${UNLOC_CLIENT_SECRET}"\n')
UNLOC_PARTNER = Vendor("rentals", "unloc-partner", "https://api.unloc.test", "api.unloc.test", UnlocPartnerSimulator,
                       lambda sim: {"UNLOC_PARTNER_KEY": sim.credentials["api_key"]},
                       settings=f"partner_id: {unloc_partner.PARTNER_ID}\n"
                                'credentials: {api_key: "${UNLOC_PARTNER_KEY}"}\n',
                       unmanaged="revoke", policy_file="access.yaml", provider_clock=True)
SPKEY = Vendor("guests", "spkey", "https://spkey.test", "spkey.test", SpkeySimulator,
               lambda sim: {"SPKEY_API_KEY": sim.credentials["api_key"]},
               settings='credentials: {api_key: "${SPKEY_API_KEY}"}\n', unmanaged="revoke", policy_file="keys.yaml")
SENTRY = Vendor("office", "sentry", "https://api.sentry.test", "api.sentry.test", SentrySimulator,
                lambda sim: {"SENTRY_EMAIL": sentry.OPERATOR_EMAIL, "SENTRY_PASSWORD": sentry.OPERATOR_PASSWORD},
                settings='credentials:\n  email: "${SENTRY_EMAIL}"\n  password: "${SENTRY_PASSWORD}"\n')

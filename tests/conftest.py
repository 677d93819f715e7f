"""Shared fixtures: a policy directory, an Abloy simulator behind the httpx transport, and a runner
that plans and applies through `reconciler.run` exactly as the CLI does."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from reconciler import run
from reconciler.sandbox.abloy import AbloySimulator

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Only loopback is a target here: any other connection attempt fails the test."""
    real = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "localhost", "::1"):
            raise AssertionError(f"network access to {host} attempted")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def later(seconds: float, action) -> None:
    """Run `action` after `seconds` in a daemon thread. Not `threading.Timer`: its timed event wait never
    returns under faketime, which moves the monotonic clock too."""
    def run() -> None:
        time.sleep(seconds)
        action()
    threading.Thread(target=run, daemon=True).start()


class Harness:
    """A policy directory plus one simulated Abloy system named `hq` at https://abloy.test."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.policy_dir = tmp_path / "policies"
        self.policy_dir.mkdir()
        self.sim = AbloySimulator(clock=lambda: self.now)
        self.now = NOW
        self.sleeps: list[float] = []
        self.allowed_hosts = ["abloy.test"]   # as an operator's --allow-host would
        creds = self.sim.credentials
        self.env = {"ABLOY_USER_ID": creds["user_id"], "ABLOY_ACCESS_KEY": creds["access_key"],
                    "ABLOY_API_KEY": creds["api_key"]}

    def write(self, text: str, name: str = "policy.yaml", system_extra: str = "") -> None:
        systems = textwrap.dedent("""\
            systems:
              hq:
                vendor: abloy-keyless
                url: https://abloy.test/administration
                credentials:
                  user_id: "${ABLOY_USER_ID}"
                  access_key: "${ABLOY_ACCESS_KEY}"
                  api_key: "${ABLOY_API_KEY}"
            """) + textwrap.indent(textwrap.dedent(system_extra), "    ")
        (self.policy_dir / "systems.yaml").write_text(systems)
        (self.policy_dir / name).write_text(textwrap.dedent(text))

    def session(self) -> run.Session:
        return run.Session(directory=self.policy_dir, state_path=self.tmp_path / "state" / "state.json",
                           env=self.env, now=self.now, transports={"hq": httpx.MockTransport(self.sim.handle)},
                           provider_options={"sleep": self.sleeps.append}, allowed_hosts=tuple(self.allowed_hosts))

    def plan(self):
        return run.plan(self.session())

    def apply(self, *, allow_mass_revoke: bool = False, saved=None):
        return run.apply(self.session(), saved=saved, approve=lambda plan: True,
                         allow_mass_revoke=allow_mass_revoke)

    def converge(self, attempts: int = 6):
        """Apply until a run reports success, as an operator re-running apply would."""
        for _ in range(attempts):
            _, report = self.apply()
            if report is None or report.ok:
                return
        raise AssertionError(f"did not converge: {report.lines()}")


@pytest.fixture
def harness(tmp_path) -> Harness:
    return Harness(tmp_path)


# -- `reconciler sandbox serve` in its own process, for end-to-end tests over real sockets ---------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def reconciler_command() -> list[str]:
    exe = shutil.which("reconciler", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "reconciler.cli"]


@contextmanager
def serve_sandboxes(tmp_path: Path, *options: str) -> Iterator[tuple[str, dict[str, str]]]:
    """Start `reconciler sandbox serve` on a free 127.0.0.1 port, its vendor clock starting at NOW; yield its root
    URL (each vendor is at `/<vendor>`) and the credentials it printed (`ABLOY_API_KEY`, `SPKEY_API_KEY`, ...)."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([*reconciler_command(), "sandbox", "serve", "--port", str(port),
                               "--dir", str(tmp_path / "vendor"), "--now", NOW.strftime("%Y-%m-%dT%H:%M:%SZ"),
                               *options],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        credentials: dict[str, str] = {}
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line or line.strip() == "Ready.":
                break
            match = re.match(r"\s*export (\w+)=(\S+)", line)
            if match:
                credentials[match[1]] = match[2]
        assert credentials, "sandbox serve did not print its credentials"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", credentials
    finally:
        server.terminate()
        server.wait()                     # a timed Popen.wait polls with time.sleep
        server.stdout.close()

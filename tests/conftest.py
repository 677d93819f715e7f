"""Shared fixtures: no network but loopback, the vendor harness for Abloy (see tests/harness.py, which every
vendor's tests use), and `reconciler sandbox serve` in its own process."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from harness import ABLOY, NOW, VendorHarness


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


@pytest.fixture
def harness(tmp_path) -> VendorHarness:
    """The shared vendor harness (tests/harness.py) for one simulated Abloy system named `hq`."""
    return VendorHarness(tmp_path, ABLOY)


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

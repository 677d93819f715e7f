"""#21 finding 3, the last part: one Ctrl-C stops a plan at once, even while a read is blocked on a vendor that
accepted the connection and never answers (before, the process stayed until the read's timeout). At CLI
level: `reconciler plan` (and an apply still reading, before anything is sent) as a subprocess against a
silent loopback server, then SIGINT.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import reconciler_command

NOW = "2026-11-22T10:00:00Z"
LIVENESS = 10.0     # seconds: a generous bound for "at once" on a loaded machine; not a speed target


class SilentVendor:
    """A loopback listener that accepts every connection, reads the request and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)          # kept open, never answered
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except OSError:
            return
        if data:
            self.requests.append(data)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def silent(tmp_path: Path):
    vendor = SilentVendor()
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "policy.yaml").write_text(f"""\
systems:
  guests:
    vendor: spkey
    url: http://127.0.0.1:{vendor.port}
    credentials: {{api_key: "${{SPKEY_API_KEY}}"}}
users:
  maria: {{email: maria@example.com}}
devices:
  flat: {{system: guests, id: 123}}
temp_keys:
  delivery:
    device: flat
    access: users
    users: [maria]
    start: 2026-11-24T09:00:00Z
    end: 2026-11-24T17:00:00Z
""")
    try:
        yield vendor, tmp_path
    finally:
        vendor.close()


def _interrupted(vendor: SilentVendor, cwd: Path, *args: str) -> tuple[int, str, float]:
    """Run the command until the vendor holds one of its requests, send one SIGINT; its exit code, its
    output and how long it took to exit after the signal."""
    env = {k: v for k, v in os.environ.items() if k != "RECONCILER_STATE"}
    env.update({"SPKEY_API_KEY": "sbx-test-key-0123456789", "PYTHONUNBUFFERED": "1"})
    restore = signal.getsignal(signal.SIGINT) == signal.SIG_IGN     # an inherited "ignore" would hide Ctrl-C
    process = subprocess.Popen([*reconciler_command(), *args, "--now", NOW], cwd=cwd, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if restore else None)
    try:
        started = time.monotonic()
        while not vendor.requests and process.poll() is None and time.monotonic() - started < 60:
            time.sleep(0.05)
        assert vendor.requests, "the command never reached the vendor"
        time.sleep(0.3)        # blocked in the read now
        assert process.poll() is None, process.communicate()[0]
        process.send_signal(signal.SIGINT)
        sent = time.monotonic()
        while process.poll() is None and time.monotonic() - sent < LIVENESS:
            time.sleep(0.05)
        took = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate()[0]
    return process.returncode, output, took


def test_one_ctrl_c_stops_a_plan_blocked_on_a_silent_vendor_at_once(silent):
    vendor, cwd = silent
    code, output, took = _interrupted(vendor, cwd, "plan")
    assert took < LIVENESS, f"plan still running {took:.1f} s after Ctrl-C: {output}"
    assert code == 1, output
    assert "interrupted; nothing was sent" in output
    assert "Traceback" not in output and "internal error" not in output


def test_one_ctrl_c_stops_an_apply_still_reading_before_anything_is_sent(silent):
    vendor, cwd = silent
    code, output, took = _interrupted(vendor, cwd, "apply", "--auto-approve")
    assert took < LIVENESS, f"apply still running {took:.1f} s after Ctrl-C: {output}"
    assert code == 1, output
    assert "interrupted; nothing was sent" in output and "Traceback" not in output
    assert all(request.startswith(b"GET ") for request in vendor.requests), vendor.requests

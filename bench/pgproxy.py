"""A loopback TCP proxy that delays what it forwards: PostgreSQL "over a network" for bench/fleet.py.

    with ProxyProcess("127.0.0.1", 5432, round_trip=0.005) as proxy:     # in a process of its own
        url = f"postgresql://root@127.0.0.1:{proxy.port}/test"
    python bench/pgproxy.py 127.0.0.1 5432 5ms      # prints the port it listens on, serves until killed

Listens on 127.0.0.1 (an ephemeral port) and forwards each connection to the target. Every chunk read from
either side is sent on half the round trip after it arrived, so a request and its answer take `round_trip`
longer than on loopback, and chunks in flight overlap as they would on a link (a pipelined batch pays the
delay once, not once per statement). The proxy runs in a process of its own: in the measured process its threads would wait for the
interpreter lock behind the apply's workers and add delays of their own. Bench only: the test suite never
times anything.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import subprocess
import sys
import threading
import time
from typing import Self


class DelayProxy:
    def __init__(self, host: str, port: int, *, round_trip: float):
        self.target = (host, port)
        self.delay = round_trip / 2
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.closing = False
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="pgproxy-accept", daemon=True).start()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.closing = True
        with contextlib.suppress(OSError):
            self.listener.close()
        for sock in list(self.sockets):
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.sockets.append(sock)
            self._pipe(client, server)
            self._pipe(server, client)

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        """One direction: a reader stamps each chunk as it arrives, a writer sends it `delay` later."""
        queue: collections.deque[tuple[float, bytes]] = collections.deque()
        ready = threading.Semaphore(0)

        def read() -> None:
            while True:
                try:
                    chunk = source.recv(65536)
                except OSError:
                    chunk = b""
                queue.append((time.monotonic() + self.delay, chunk))
                ready.release()
                if not chunk:
                    return

        def write() -> None:
            while True:
                ready.acquire()
                due, chunk = queue.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not chunk:
                    with contextlib.suppress(OSError):
                        sink.shutdown(socket.SHUT_WR)
                    return
                try:
                    sink.sendall(chunk)
                except OSError:
                    return

        threading.Thread(target=read, daemon=True).start()
        threading.Thread(target=write, daemon=True).start()


def parse_latency(text: str) -> float:
    """'5ms', '0.005s' or '0.005' → seconds."""
    text = text.strip().lower()
    if text.endswith("ms"):
        return float(text[:-2]) / 1000
    return float(text.removesuffix("s"))


class ProxyProcess:
    """`DelayProxy` in a child process; `port` is where it listens."""

    def __init__(self, host: str, port: int, *, round_trip: float):
        self.process = subprocess.Popen([sys.executable, __file__, host, str(port), f"{round_trip}s"],
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def main() -> None:
    host, port, latency = sys.argv[1], int(sys.argv[2]), parse_latency(sys.argv[3])
    proxy = DelayProxy(host, port, round_trip=latency)
    print(proxy.port, flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()

"""Serve vendor simulators over real sockets on the loopback interface.

`reconciler sandbox serve` calls `serve()`; tests call `start_in_thread()`. Each simulator handler
(`sim.handle`, any `httpx.Request -> httpx.Response` callable) is mounted under a path prefix such as
`/abloy-keyless`; the request reaches it with its full path, and the simulators find their own base.
A handler that raises an httpx transport error (an injected lost response) makes the server close the
connection without answering, which is what a client sees when a response is lost on the way.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from reconciler.sandbox.common import problem_response
from reconciler.urls import is_loopback

logger = logging.getLogger(__name__)

Handler = Callable[[httpx.Request], httpx.Response]

# Hop-by-hop headers describe one connection, not the message; the server sets its own.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "trailer",
                         "proxy-connection", "content-length"})


def _normalise_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    return f"/{prefix}" if prefix else ""


class SandboxHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that routes by mount prefix; `stop()` (or leaving `with`) shuts it down."""

    daemon_threads = True
    # Reusing the address lets a restarted `sandbox serve` bind at once instead of waiting out TIME_WAIT.
    allow_reuse_address = True

    def __init__(self, host: str, port: int, mounts: Mapping[str, Handler]):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.mounts = {_normalise_prefix(prefix): handler for prefix, handler in mounts.items()}
        self._thread: threading.Thread | None = None
        super().__init__((host, port), _RequestHandler)

    @property
    def base_url(self) -> str:
        host, port = str(self.server_address[0]), self.server_address[1]
        host_text = f"[{host}]" if ":" in host else host
        return f"http://{host_text}:{port}"

    def urls(self) -> dict[str, str]:
        """Mount prefix → the URL a client uses as its base URL."""
        return {prefix: self.base_url + prefix for prefix in self.mounts}

    def resolve(self, path: str) -> Handler | None:
        """The handler of the longest mount prefix that `path` is under (segment-wise)."""
        for prefix in sorted(self.mounts, key=len, reverse=True):
            if not prefix or path == prefix or path.startswith((prefix + "/", prefix + "?")):
                return self.mounts[prefix]
        return None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="sandbox-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __exit__(self, *args: object) -> None:
        self.stop()


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, as real clients expect; every response has a length
    server: SandboxHTTPServer
    timeout = 30                    # a stalled client must not hold a server thread forever
    # An answer's head and body go out as two writes: with Nagle on, the body waits for the client's delayed ACK
    # (about 40 ms an answer on Linux), which a vendor's server does not add.
    disable_nagle_algorithm = True

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        body = self._read_body()
        path = self.path.split("?", 1)[0]
        handler = self.server.resolve(path)
        if handler is None:
            self._write(problem_response(404, f"No sandbox is mounted at {path}"))
            return
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP]
        request = httpx.Request(self.command, self.server.base_url + self.path, headers=headers, content=body)
        try:
            response = handler(request)
        except httpx.TransportError as error:
            # An injected lost response: hang up without a status line.
            logger.info("sandbox server dropping response method=%s path=%s reason=%s", self.command, path, error)
            self.close_connection = True
            return
        except Exception:
            logger.exception("sandbox handler failed method=%s path=%s", self.command, path)
            response = problem_response(500, "Sandbox internal error")
        self._write(response)

    def date_time_string(self, timestamp: float | None = None) -> str:
        # The simulator's `Date` is its vendor clock (which `--now` may set); the socket server's own
        # would be this machine's.
        return getattr(self, "_vendor_date", None) or super().date_time_string(timestamp)

    def _write(self, response: httpx.Response) -> None:
        content = response.read()
        self._vendor_date = response.headers.get("Date")
        self.send_response(response.status_code)
        for name, value in response.headers.multi_items():
            if name.lower() not in _HOP_BY_HOP and name.lower() != "date":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if self.command != "HEAD" and content:
            self.wfile.write(content)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _serve

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("sandbox server %s %s", self.address_string(), format % args)


def make_server(host: str, port: int, mounts: Mapping[str, Handler], *,
                allow_remote: bool = False) -> SandboxHTTPServer:
    """A bound, not yet serving server. Non-loopback hosts are refused unless `allow_remote`: the
    sandboxes accept well-known credentials and must not be reachable from the network."""
    if not allow_remote and not is_loopback(host):
        raise ValueError(f"refusing to serve sandboxes on {host!r}: only loopback addresses (127.0.0.1, "
                         "localhost, ::1) unless explicitly allowed")
    if host == "localhost":
        host = "127.0.0.1"
    return SandboxHTTPServer(host, port, mounts)


def serve(host: str, port: int, mounts: Mapping[str, Handler], ready: threading.Event | None = None, *,
          allow_remote: bool = False, on_bound: Callable[[str], None] | None = None) -> None:
    """Serve until interrupted (blocking). `ready` is set once the socket is bound; `on_bound` is then given the
    base URL with the port actually bound (port 0 asks for any free one)."""
    server = make_server(host, port, mounts, allow_remote=allow_remote)
    for prefix, url in server.urls().items():
        logger.info("sandbox serving mount=%s url=%s", prefix or "/", url)
    if on_bound is not None:
        on_bound(server.base_url)
    if ready is not None:
        ready.set()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        logger.info("sandbox server interrupted")
    finally:
        server.server_close()


def start_in_thread(host: str, port: int, mounts: Mapping[str, Handler], *,
                    allow_remote: bool = False) -> tuple[SandboxHTTPServer, str]:
    """Serve in a daemon thread (port 0 = any free port); returns the server and its base URL.

    Use the server as a context manager, or call `server.stop()`, to shut it down.
    """
    server = make_server(host, port, mounts, allow_remote=allow_remote)
    server.start()
    return server, server.base_url

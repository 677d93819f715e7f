"""Endpoints are pinned outside the policy, credential variables are declared, and transport failures
(redirect, bad certificate, unknown host) end in one line and exit 1 without retrying or following."""

from __future__ import annotations

import datetime as dt
import http.server
import re
import socket
import ssl
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from click.testing import CliRunner

from reconciler.cli import main
from reconciler.errors import PolicyError, VendorError
from reconciler.providers.http import HttpClient

CREDENTIALS = '{user_id: "${ABLOY_USER_ID}", access_key: "${ABLOY_ACCESS_KEY}", api_key: "${ABLOY_API_KEY}"}'
ENV = {"ABLOY_USER_ID": "u-1", "ABLOY_ACCESS_KEY": "access-secret", "ABLOY_API_KEY": "api-secret"}


def write_policy(tmp_path: Path, url: str | None, credentials: str = CREDENTIALS) -> None:
    (tmp_path / "policies").mkdir(exist_ok=True)
    line = f"    url: {url}\n" if url else ""
    (tmp_path / "policies" / "systems.yaml").write_text(
        f"systems:\n  hq:\n    vendor: abloy-keyless\n{line}    credentials: {credentials}\n")


def cli(tmp_path, monkeypatch, *args: str, env: dict[str, str] | None = None):
    monkeypatch.chdir(tmp_path)
    for name in ("RECONCILER_ALLOW_HOSTS", "RECONCILER_ALLOW_CREDENTIALS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {**ENV, **(env or {})}.items():
        monkeypatch.setenv(name, value)
    return CliRunner().invoke(main, [*args, "--state", str(tmp_path / "state.json")]
                              if args[0] != "validate" else list(args))


@pytest.fixture
def connections(monkeypatch) -> list[object]:
    """Every name lookup and connection attempt of this process (the suite allows only loopback anyway)."""
    seen: list[object] = []
    real_lookup, real_connect = socket.getaddrinfo, socket.socket.connect

    def lookup(host, *args, **kwargs):
        seen.append(host)
        return real_lookup(host, *args, **kwargs)

    def connect(self, address):
        seen.append(address)
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return seen


# -- endpoints pinned outside the policy -------------------------------------------------------------------

@pytest.mark.parametrize("command", ["validate", "plan", "apply"])
def test_unallowed_host_fails_and_no_byte_reaches_it(tmp_path, monkeypatch, connections, command):
    write_policy(tmp_path, "https://door-api.evil.example.com/administration")
    extra = ["--auto-approve"] if command == "apply" else []
    result = cli(tmp_path, monkeypatch, command, "policies", *extra)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "policies/systems.yaml:4:10: host door-api.evil.example.com is not allowed: use sandbox, a loopback "
        "address, abloy-keyless's production host eu-api.keyless.assaabloy.com (omit `url:`), or have the "
        "operator allow it (--allow-host door-api.evil.example.com or RECONCILER_ALLOW_HOSTS)"]
    assert connections == []


def test_plain_http_goes_only_to_loopback_even_when_the_host_is_allowed(tmp_path, monkeypatch, connections):
    write_policy(tmp_path, "http://door-api.example.com")
    result = cli(tmp_path, monkeypatch, "plan", "policies", "--allow-host", "door-api.example.com")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "policies/systems.yaml:4:10: plain http is only allowed to loopback; use https://door-api.example.com"]
    assert connections == []


@pytest.mark.parametrize("url", [None, "https://eu-api.keyless.assaabloy.com/administration",
                                 "http://127.0.0.1:8700/abloy-keyless", "http://localhost:1", "https://[::1]:8443",
                                 "sandbox"])
def test_sandbox_loopback_and_the_production_url_need_no_allowing(tmp_path, monkeypatch, url):
    write_policy(tmp_path, url)
    result = cli(tmp_path, monkeypatch, "validate", "policies")
    assert result.exit_code == 0, result.output


def test_production_host_on_another_port_is_not_production(tmp_path, monkeypatch):
    write_policy(tmp_path, "https://eu-api.keyless.assaabloy.com:8443/administration")
    result = cli(tmp_path, monkeypatch, "validate", "policies")
    assert result.exit_code == 1
    assert "host eu-api.keyless.assaabloy.com:8443 is not allowed" in result.stderr


def test_operator_allows_a_host_by_option_or_environment(tmp_path, monkeypatch):
    write_policy(tmp_path, "https://doors.internal.example.com:8443/api")
    assert cli(tmp_path, monkeypatch, "validate", "policies").exit_code == 1
    assert cli(tmp_path, monkeypatch, "validate", "policies", "--allow-host", "doors.internal.example.com")\
        .exit_code == 0
    assert cli(tmp_path, monkeypatch, "validate", "policies", "--allow-host", "doors.internal.example.com:8443")\
        .exit_code == 0
    assert cli(tmp_path, monkeypatch, "validate", "policies", "--allow-host", "doors.internal.example.com:9999")\
        .exit_code == 1
    allowed = cli(tmp_path, monkeypatch, "validate", "policies",
                  env={"RECONCILER_ALLOW_HOSTS": "other.example.com doors.internal.example.com"})
    assert allowed.exit_code == 0, allowed.output


def test_a_policy_file_cannot_allow_a_host_itself(tmp_path, monkeypatch):
    write_policy(tmp_path, "https://evil.example.com")
    (tmp_path / "policies" / "allow.yaml").write_text("allow_hosts: [evil.example.com]\n")
    result = cli(tmp_path, monkeypatch, "validate", "policies")
    assert result.exit_code == 1
    assert "host evil.example.com is not allowed" in result.stderr


# -- credential variable names ------------------------------------------------------------------------------

def test_credentials_read_only_prefixed_or_listed_variables(tmp_path, monkeypatch, connections):
    write_policy(tmp_path, None, '{user_id: "${HOME}", access_key: "${ABLOY_ACCESS_KEY}", api_key: "${OPS_KEY}"}')
    refused = cli(tmp_path, monkeypatch, "plan", "policies", env={"OPS_KEY": "k"})
    assert refused.exit_code == 1
    assert refused.stderr.splitlines() == [
        "policies/systems.yaml:4:28: abloy-keyless credentials are read from variables named ABLOY_*; HOME is not "
        "one (an operator may allow it with RECONCILER_ALLOW_CREDENTIALS)",
        "policies/systems.yaml:4:83: abloy-keyless credentials are read from variables named ABLOY_*; OPS_KEY is "
        "not one (an operator may allow it with RECONCILER_ALLOW_CREDENTIALS)"]
    assert connections == []
    listed = cli(tmp_path, monkeypatch, "validate", "policies",
                 env={"OPS_KEY": "k", "RECONCILER_ALLOW_CREDENTIALS": "HOME,OPS_KEY"})
    assert listed.exit_code == 0, listed.output


def test_a_vendor_cannot_read_another_vendors_variables(tmp_path, monkeypatch):
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "s.yaml").write_text(
        "systems:\n  office:\n    vendor: sentry\n    credentials: {token: \"${ABLOY_API_KEY}\"}\n")
    result = cli(tmp_path, monkeypatch, "validate", "policies")
    assert result.exit_code == 1
    assert "sentry credentials are read from variables named SENTRY_*; ABLOY_API_KEY is not one" in result.stderr


# -- the HTTP client: pinned host, no redirect, no retry of TLS or DNS failures -------------------------------

def test_client_refuses_a_url_on_another_host():
    sent: list[httpx.Request] = []
    client = HttpClient("https://abloy.test/administration", system="hq",
                        transport=httpx.MockTransport(lambda r: sent.append(r) or httpx.Response(200)),
                        headers={"X-Api-Key": "api-secret"})
    with pytest.raises(VendorError, match=r"refused: not on https://abloy.test"):
        client.request("GET", "https://evil.example.com/steal")
    assert sent == []


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: list[str]
    location: str

    def do_POST(self) -> None:
        self.hits.append(self.path)
        self.send_response(302)
        self.send_header("Location", self.location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def _server(location: str = "", tls: ssl.SSLContext | None = None) -> Iterator[tuple[int, list[str], list[int]]]:
    hits: list[str] = []
    accepted: list[int] = []
    handler = type("Handler", (_Handler,), {"hits": hits, "location": location})

    class Server(http.server.ThreadingHTTPServer):
        def get_request(self):
            sock, address = super().get_request()
            accepted.append(1)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            return sock, address

        def handle_error(self, request, client_address) -> None:
            pass   # the client hanging up on a bad certificate is the point of the test

    server = Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], hits, accepted
    finally:
        server.shutdown()
        server.server_close()


def test_redirect_is_one_line_and_not_followed(tmp_path, monkeypatch):
    with _server() as (target_port, target_hits, _):
        with _server(f"http://127.0.0.1:{target_port}/administration/login") as (port, hits, _):
            write_policy(tmp_path, f"http://127.0.0.1:{port}/administration")
            started = time.monotonic()
            result = cli(tmp_path, monkeypatch, "plan", "policies")
    assert time.monotonic() - started < 10
    assert result.exit_code == 1
    assert "internal error" not in result.output
    [line] = result.stderr.splitlines()
    assert re.fullmatch(rf"hq: login failed: POST /login: HTTP 302 redirect to "
                        rf"http://127\.0\.0\.1:{target_port}/administration/login; redirects are not followed, so "
                        r"credentials stay with 127\.0\.0\.1: set the system's url to the API's own address", line), line
    assert hits == ["/administration/login"]
    assert target_hits == []
    assert "secret" not in result.output


def _self_signed() -> ssl.SSLContext:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    start = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(start).not_valid_after(start + dt.timedelta(days=36500))
            .sign(key, hashes.SHA256()))
    directory = Path(__import__("tempfile").mkdtemp())
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return context


def test_bad_certificate_is_one_line_and_not_retried(tmp_path, monkeypatch):
    with _server(tls=_self_signed()) as (port, hits, accepted):
        write_policy(tmp_path, f"https://127.0.0.1:{port}/administration")
        started = time.monotonic()
        result = cli(tmp_path, monkeypatch, "plan", "policies")
    assert time.monotonic() - started < 10
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert re.fullmatch(r"hq: login failed: POST /login: TLS certificate of 127\.0\.0\.1 not accepted "
                        r"\(self[- ]signed certificate\); not retried", line), line
    assert len(accepted) == 1 and hits == []


def test_unknown_host_is_one_line_and_not_retried(tmp_path, monkeypatch):
    lookups: list[str] = []

    def no_such_host(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    write_policy(tmp_path, "https://doors.example.invalid")
    result = cli(tmp_path, monkeypatch, "plan", "policies", "--allow-host", "doors.example.invalid")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "hq: login failed: POST /login: cannot resolve doors.example.invalid (DNS: no such host); not retried"]
    assert lookups == ["doors.example.invalid"]


def test_policy_error_type_is_unchanged_for_library_callers(tmp_path):
    from reconciler.policy import load_policy
    from reconciler.providers.factory import capabilities

    write_policy(tmp_path, "https://evil.example.com")
    with pytest.raises(PolicyError):
        load_policy(tmp_path / "policies", capabilities(), ENV)
    assert load_policy(tmp_path / "policies", capabilities(), ENV, allowed_hosts=["evil.example.com"]).systems

"""Benchmark: apply a generated fleet over a slow link, at several concurrencies.

    python bench/latency.py [--doors 60] [--users 120] [--grants 3] [--latency 0.05] [--concurrency 1 8 32]
                            [--rate-limit N]

The Abloy simulator is served on 127.0.0.1 by a child process (so that its CPU is not the tool's), with
`--latency` seconds of delay added to every answer (a slow link). For each concurrency the fleet is
applied from scratch against a fresh simulator, and the table says how many writes a second the apply
reached and what share that is of the bound `min(concurrency / RTT, the vendor's own rate)`, where RTT is
measured on the same link (the median of a few sequential requests; `write ms` is the mean time a write
took to be answered during the apply) and the vendor's rate is
`--rate-limit` (unlimited when not given). Figures, not assertions: the test suite never times anything.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

import httpx

ROOT = Path(__file__).resolve().parent.parent
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "examples" / "large-fleet" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate


# ---------------------------------------------------------------------------------------- the server
def serve(latency: float, rate_limit: int | None) -> None:
    """Child process: one fresh Abloy simulator on 127.0.0.1, every answer delayed by `latency`."""
    from reconciler.sandbox import server as served
    from reconciler.sandbox.abloy import AbloySimulator

    sim = AbloySimulator(rate_limit=rate_limit)

    def slow(request: httpx.Request) -> httpx.Response:
        time.sleep(latency)
        return sim.handle(request)

    server = served.make_server("127.0.0.1", 0, {"/abloy-keyless": slow})
    print(json.dumps({"url": server.urls()["/abloy-keyless"], **sim.credentials}), flush=True)
    server.serve_forever(poll_interval=0.2)


class Served:
    def __init__(self, latency: float, rate_limit: int | None):
        command = [sys.executable, __file__, "--serve", "--latency", str(latency)]
        if rate_limit:
            command += ["--rate-limit", str(rate_limit)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.process.stdout is not None
        self.info: dict[str, str] = json.loads(self.process.stdout.readline())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


# ------------------------------------------------------------------------------------- the client side
class Counting(httpx.BaseTransport):
    """A real HTTP transport that notes each request's method, status and when it was sent and answered."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.lock = threading.Lock()
        self.log: list[tuple[str, int, float, float]] = []   # method (LOGIN for a login), status, sent, answered

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        sent = time.perf_counter()
        response = self.inner.handle_request(request)
        response.read()
        with self.lock:
            method = "LOGIN" if request.url.path.endswith("/login") else request.method
            self.log.append((method, response.status_code, sent, time.perf_counter()))
        return response

    def close(self) -> None:
        self.inner.close()


def measure_rtt(url: str, samples: int = 15) -> float:
    times = []
    with httpx.Client(timeout=10) as client:
        for _ in range(samples):
            started = time.perf_counter()
            client.get(url + "/user")      # 403 without an API key: one full round trip, nothing else
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def apply_once(args: argparse.Namespace, concurrency: int) -> dict[str, Any]:
    from reconciler import run

    with Served(args.latency, args.rate_limit) as served, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        policies = work / "policies"
        _generator()(policies, args.doors, args.users, args.grants)
        info = served.info
        (policies / "systems.yaml").write_text(
            "systems:\n  fleet:\n    vendor: abloy-keyless\n"
            f"    url: {info['url']}\n    concurrency: {concurrency}\n"
            "    credentials:\n      user_id: \"${ABLOY_USER_ID}\"\n      access_key: \"${ABLOY_ACCESS_KEY}\"\n"
            "      api_key: \"${ABLOY_API_KEY}\"\n")
        env = {"ABLOY_USER_ID": info["user_id"], "ABLOY_ACCESS_KEY": info["access_key"],
               "ABLOY_API_KEY": info["api_key"]}
        rtt = measure_rtt(info["url"])
        transport = Counting()
        session = run.Session(directory=policies, state_path=work / "state.json", env=env,
                              transports={"fleet": transport})
        cpu = time.process_time()
        started = time.perf_counter()
        _, report = run.apply(session, saved=None, approve=lambda plan: True)
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu
        assert report is not None
        writes = [(s, a, st) for m, st, s, a in transport.log if m in WRITES]
        done = [w for w in writes if w[2] < 400]
        span = max(a for _, a, _ in writes) - min(s for s, _, _ in writes) if writes else 0.0
        rate = len(done) / span if span else 0.0
        answer = statistics.mean(a - s for s, a, _ in writes) if writes else 0.0
        bound = concurrency / rtt
        if args.rate_limit:
            bound = min(bound, float(args.rate_limit))
        return {"concurrency": concurrency, "changes": len(report.done), "failed": len(report.failed) +
                len(report.uncertain) + len(report.skipped), "writes": len(done),
                "429": sum(1 for m, st, _, _ in transport.log if st == 429), "requests": len(transport.log),
                "rtt": rtt, "answer": answer, "span": span, "wall": wall, "cpu": cpu, "rate": rate, "bound": bound,
                "share": rate / bound if bound else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doors", type=int, default=60)
    parser.add_argument("--users", type=int, default=120)
    parser.add_argument("--grants", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds added to every answer")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rate-limit", type=int, default=None, help="the vendor's requests per second")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.latency, args.rate_limit)
        return
    sys.path.insert(0, str(ROOT))
    vendor = f"{args.rate_limit}/s" if args.rate_limit else "unlimited"
    print(f"fleet: {args.doors} doors, {args.users} users, {args.users * args.grants} permissions; "
          f"link +{args.latency * 1000:.0f} ms; vendor rate {vendor}; commit {_commit()}")
    print("| concurrency | RTT ms | write ms | changes | not done | writes | 429s | requests | write span s | apply wall s "
          "| apply CPU s | writes/s | bound/s | share |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for concurrency in args.concurrency:
        r = apply_once(args, concurrency)
        print(f"| {r['concurrency']} | {r['rtt'] * 1000:.1f} | {r['answer'] * 1000:.1f} | {r['changes']} | {r['failed']} | {r['writes']} "
              f"| {r['429']} | {r['requests']} | {r['span']:.2f} | {r['wall']:.2f} | {r['cpu']:.2f} "
              f"| {r['rate']:.1f} | {r['bound']:.1f} | {r['share'] * 100:.0f} % |", flush=True)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    main()

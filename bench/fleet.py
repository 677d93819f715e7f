"""Benchmark: plan, apply and re-plan a large fleet against the in-process Abloy simulator.

    python bench/fleet.py [--doors 1000] [--users 2000] [--grants 5] [--state postgresql://…?schema=bench]

Prints wall time, peak memory and vendor request counts per phase. Figures, not assertions: the test
suite never times anything.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import resource
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from reconciler import run
from reconciler.sandbox.abloy import AbloySimulator

ROOT = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("generate", ROOT / "examples" / "large-fleet" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--doors", type=int, default=1000)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--grants", type=int, default=5)
    parser.add_argument("--state", default=None, help="postgresql://… to measure the shared state (default: a file)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _generator()(work / "policies", args.doors, args.users, args.grants)
        sim = AbloySimulator()
        session = run.Session(directory=work / "policies", state_path=work / "state.json", env={}, state_url=args.state,
                              now=datetime(2026, 11, 22, 10, tzinfo=UTC),
                              transports={"fleet": httpx.MockTransport(sim.handle)})
        print(f"fleet: {args.doors} doors, {args.users} users, {args.users * args.grants} permissions")

        def phase(name, func):
            sim.reset_log()
            started = time.perf_counter()
            result = func()
            elapsed = time.perf_counter() - started
            calls = collections.Counter(f"{r.method} {r.path.split('?')[0].rsplit('/', 1)[0] if r.method != 'POST' and r.path.count('/') > 1 else r.path}"
                                        for r in sim.requests)
            top = ", ".join(f"{k}={v}" for k, v in calls.most_common(4))
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"{name:>8}: {elapsed:7.2f} s  requests={len(sim.requests):6d}  peak RSS {peak:6.0f} MiB  ({top})")
            return result

        first = phase("plan", lambda: run.plan(session))
        print(f"          {len(first.changes)} changes")
        phase("apply", lambda: run.apply(session, saved=None, approve=lambda plan: True))
        again = phase("re-plan", lambda: run.plan(session))
        print(f"          {len(again.changes)} changes after apply")


if __name__ == "__main__":
    main()

"""Benchmark: plan, apply and re-plan a large fleet against the in-process Abloy simulator.

    python bench/fleet.py --size 10k            # 10,000 grants: 1,000 doors, 2,000 people, 5 doors each
    python bench/fleet.py --size 100k --profile # 100,000 grants, and where the plan's time goes
    python bench/fleet.py --size 100k --plan-only
    python bench/fleet.py [--doors 1000] [--users 2000] [--grants 5] [--state postgresql://…?schema=bench]
    python bench/fleet.py --latency             # also bench/latency.py (apply over an injected latency)
    python bench/fleet.py --state postgresql://root@127.0.0.1:5432/test --pg-latency 5ms
                                                # the shared state over a link 5 ms slower (bench/pgproxy.py)
    python bench/fleet.py --systems 4 --state postgresql://… [--pg-latency 5ms]
                                                # 4 systems: wall time of 1 runner for all vs 2 runners with
                                                # --target, 2 systems each, at once (separate processes)

Prints one table: CPU and wall seconds, vendor requests and peak RSS for each phase (plan, rendering the plan
as text and JSON, streamed to /dev/null as the CLI streams it, apply, re-plan), then the floor: the CPU PyYAML's C loader alone takes to read the same
policy files, and the plan's CPU as a multiple of it (the target is at most 4x). CPU is the whole process, so
apply and re-plan include the simulator answering in the same process. `--profile` adds a cProfile of one more
plan (top 20 by cumulative time), taken apart from the measured one because profiling slows everything down.
Figures, not assertions: the test suite never times anything.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import importlib.util
import io
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import yaml

from reconciler import run
from reconciler.render import write_json, write_text
from reconciler.sandbox.abloy import AbloySimulator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from pgproxy import ProxyProcess, parse_latency  # noqa: E402

SIZES = {"10k": 10_000, "50k": 50_000, "100k": 100_000}
GRANTS_PER_PERSON = 5


def _generator() -> Callable[[Path, int, int, int], None]:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "examples" / "large-fleet" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate  # type: ignore[no-any-return]


def fresh_schema(url: str, default: str) -> str:
    """The state URL with its schema (default `default`) emptied: every run starts from nothing."""
    import psycopg

    parts = urlsplit(url)
    options = dict(parse_qsl(parts.query))
    options.setdefault("schema", default)
    with psycopg.connect(urlunsplit(parts._replace(query="")), autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {options['schema']} CASCADE")
    return urlunsplit(parts._replace(query=urlencode(options)))


def delayed(url: str, round_trip: float, stack: contextlib.ExitStack) -> str:
    """The state URL through a loopback proxy adding `round_trip` to every exchange (bench/pgproxy.py, in a
    process of its own)."""
    parts = urlsplit(url)
    proxy = stack.enter_context(ProxyProcess(parts.hostname or "127.0.0.1", parts.port or 5432, round_trip=round_trip))
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{proxy.port}"))


def generate_sites(out: Path, systems: int, doors: int, users: int, grants: int) -> None:
    """One policy of `systems` sandbox Abloy systems (site-0, site-1, …), each with `doors` doors and `users`
    people of its own, `grants` doors per person."""
    out.mkdir(parents=True, exist_ok=True)
    sites = [f"site-{n}" for n in range(systems)]
    (out / "systems.yaml").write_text("systems:\n" + "".join(f"  {s}: {{vendor: abloy-keyless, url: sandbox}}\n"
                                                             for s in sites))
    (out / "devices.yaml").write_text("devices:\n" + "".join(
        f"  {s}-door-{d:05d}: {{system: {s}, name: Door {d:05d}}}\n" for s in sites for d in range(doors)))
    (out / "users.yaml").write_text("users:\n" + "".join(
        f"  {s}-person-{u:05d}: {{systems: [{s}]}}\n" for s in sites for u in range(users)))
    lines = ["permissions:\n"]
    for s in sites:
        for u in range(users):
            granted = ", ".join(f"{s}-door-{(u * 7 + g * 13) % doors:05d}" for g in range(grants))
            lines.append(f"  - users: [{s}-person-{u:05d}]\n    devices: [{granted}]\n"
                         "    start: 2026-01-01T00:00:00Z\n    end: 2027-12-31T23:59:59Z\n")
    (out / "access.yaml").write_text("".join(lines))


def runner(directory: Path, state: str | None, targets: list[str]) -> None:
    """One runner (a process of its own): apply `targets` of the policy in `directory`, each system on an
    in-process simulator of its own; prints how many changes it applied."""
    sims = {t: AbloySimulator() for t in targets}
    session = run.Session(directory=directory, state_path=directory.parent / f"state-{'-'.join(targets)}.json",
                          env={}, state_url=state, now=datetime(2026, 11, 22, 10, tzinfo=UTC),
                          targets=tuple(targets), transports={t: httpx.MockTransport(s.handle) for t, s in sims.items()})
    _, report = run.apply(session, saved=None, approve=lambda plan: True)
    assert report is not None and report.ok, report.summary()
    print(len(report.done), flush=True)


def parallel(args: argparse.Namespace, work: Path) -> None:
    """Wall time of all systems applied by 1 runner, then by 2 runners at once (each half the systems)."""
    sites = [f"site-{n}" for n in range(args.systems)]
    doors, users = max(1, args.doors // args.systems), max(1, args.users // args.systems)
    print(f"{args.systems} systems of {doors} doors, {users} people, {users * args.grants} grants each; "
          f"state {'a local file per run' if not args.state else urlsplit(args.state).path + ' (a fresh schema per run)'}")
    rows = []
    for count in (1, 2):
        policies = work / f"runners-{count}" / "policies"
        generate_sites(policies, args.systems, doors, users, args.grants)
        state = fresh_schema(args.state, f"bench_sites_{count}") if args.state else None
        state = state.replace(f"127.0.0.1:{urlsplit(args.state).port}", f"127.0.0.1:{args.proxy_port}") \
            if state and args.proxy_port else state
        halves = [sites[i::count] for i in range(count)]
        started = time.perf_counter()
        processes = [subprocess.Popen([sys.executable, __file__, "--runner", str(policies), *(["--state", state] if state
                                      else []), *[a for t in half for a in ("--target", t)]],
                                      stdout=subprocess.PIPE, text=True) for half in halves]
        done = [int(p.communicate()[0].strip() or 0) for p in processes]
        wall = time.perf_counter() - started
        if any(p.returncode for p in processes):
            raise SystemExit(f"a runner failed: exit codes {[p.returncode for p in processes]}")
        rows.append((count, " | ".join(",".join(h) for h in halves), sum(done), wall))
    print("| runners | systems per runner | changes | wall s | changes/s |")
    print("|---|---|---|---|---|")
    for count, halves, changes, wall in rows:
        print(f"| {count} | {halves} | {changes} | {wall:.2f} | {changes / wall:.0f} |")
    print(f"2 runners / 1 runner wall time: {rows[1][3] / rows[0][3]:.2f}")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def c_loader_seconds(directory: Path) -> float:
    """CPU seconds PyYAML's C loader (libyaml, `CSafeLoader`) takes to read every policy file: the floor."""
    if not getattr(yaml, "__with_libyaml__", False):
        raise SystemExit("PyYAML was built without libyaml: the C loader floor cannot be measured")
    texts = [path.read_text(encoding="utf-8") for path in sorted(directory.rglob("*.yaml"))]
    started = time.process_time()
    for text in texts:
        yaml.load(text, Loader=yaml.CSafeLoader)
    return time.process_time() - started


class Table:
    def __init__(self, sim: AbloySimulator) -> None:
        self.sim = sim
        self.rows: list[tuple[str, float, float, int, float, str]] = []

    def phase(self, name: str, func: Callable[[], Any]) -> Any:
        self.sim.reset_log()
        wall, cpu = time.perf_counter(), time.process_time()
        result = func()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        calls = collections.Counter(
            f"{r.method} {r.path.split('?')[0].rsplit('/', 1)[0] if r.method != 'POST' and r.path.count('/') > 1 else r.path}"
            for r in self.sim.requests)
        top = ", ".join(f"{k}={v}" for k, v in calls.most_common(3))
        self.rows.append((name, cpu, wall, len(self.sim.requests), peak_rss_mib(), top))
        return result

    def print(self) -> None:
        print(f"| {'phase':<12} | {'CPU s':>8} | {'wall s':>8} | {'requests':>8} | {'peak RSS MiB':>12} | requests by kind")
        print(f"|{'-' * 14}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 14}|{'-' * 20}")
        for name, cpu, wall, requests, rss, top in self.rows:
            print(f"| {name:<12} | {cpu:8.2f} | {wall:8.2f} | {requests:8d} | {rss:12.0f} | {top}")


def _discard(text: str) -> None:
    """Where the bench writes rendered plans: /dev/null, as the CLI writes to a terminal or a file."""
    _DEVNULL.write(text)


_DEVNULL = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - open for the whole run


def profile_plan(session: run.Session, limit: int = 20) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    result = run.plan(session)
    write_text(result, _discard), write_json(result, _discard)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(limit)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), help="grants in the fleet (sets --doors and --users)")
    parser.add_argument("--doors", type=int, default=1000)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--grants", type=int, default=GRANTS_PER_PERSON, help="doors per person")
    parser.add_argument("--state", default=None, help="postgresql://… to measure the shared state (default: a file)")
    parser.add_argument("--pg-latency", default=None, metavar="DURATION",
                        help="reach the --state database through a loopback proxy adding this round trip (5ms)")
    parser.add_argument("--systems", type=int, default=None,
                        help="that many systems (--doors/--users split between them): 1 runner vs 2 runners")
    parser.add_argument("--runner", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--target", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--plan-only", action="store_true", help="plan and render only (no apply, no re-plan)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile (top 20, cumulative) of a plan")
    parser.add_argument("--latency", action="store_true", help="also run bench/latency.py and print its table")
    args = parser.parse_args()
    if args.size:
        total = SIZES[args.size]
        args.grants = GRANTS_PER_PERSON
        args.users, args.doors = total // GRANTS_PER_PERSON, total // (2 * GRANTS_PER_PERSON)
    if args.runner:
        runner(args.runner, args.state, args.target)
        return
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        if args.systems:
            args.proxy_port = None
            if args.state and args.pg_latency:
                args.proxy_port = urlsplit(delayed(args.state, parse_latency(args.pg_latency), stack)).port
            parallel(args, work)
            return
        if args.state:
            args.state = fresh_schema(args.state, "bench_fleet")
            if args.pg_latency:
                args.state = delayed(args.state, parse_latency(args.pg_latency), stack)
        _generator()(work / "policies", args.doors, args.users, args.grants)
        sim = AbloySimulator()
        session = run.Session(directory=work / "policies", state_path=work / "state.json", env={},
                              state_url=args.state, now=datetime(2026, 11, 22, 10, tzinfo=UTC),
                              transports={"fleet": httpx.MockTransport(sim.handle)})
        grants = args.users * args.grants
        print(f"fleet: {args.doors} doors, {args.users} people, {grants} grants "
              f"({', '.join(f'{p.name} {p.stat().st_size / 1e6:.1f} MB' for p in sorted(work.glob('policies/*')))})")
        floor = c_loader_seconds(work / "policies")
        table = Table(sim)
        first = table.phase("plan", lambda: run.plan(session))
        table.phase("render", lambda: (write_text(first, _discard), write_json(first, _discard)))
        changes = len(first.changes)
        again = None
        if not args.plan_only:
            table.phase("apply", lambda: run.apply(session, saved=None, approve=lambda plan: True))
            again = table.phase("re-plan", lambda: run.plan(session))
        print()
        table.print()
        plan_cpu = table.rows[0][1]
        render_cpu = table.rows[1][1]
        print(f"\n{changes} changes planned" + (f", {len(again.changes)} after apply" if again is not None else ""))
        if again is not None:
            apply_wall = table.rows[2][2]
            where = "a local state file" if not args.state else \
                f"PostgreSQL{f' at +{args.pg_latency} round trip' if args.pg_latency else ' on loopback'}"
            print(f"apply: {changes / apply_wall:.0f} changes/s on {where}")
        print(f"C loader alone (yaml.load, CSafeLoader) on the same files: {floor:.2f} s CPU")
        print(f"plan CPU / C loader: {plan_cpu / floor:.1f}x (target <= 4x); "
              f"with rendering text and JSON: {(plan_cpu + render_cpu) / floor:.1f}x")
        if args.profile:
            print("\ncProfile of one more plan with rendering (top 20, cumulative):")
            print(profile_plan(session))
    latency = ROOT / "bench" / "latency.py"
    if args.latency:
        if latency.exists():
            print("\nbench/latency.py:")
            sys.stdout.flush()
            subprocess.run([sys.executable, str(latency)], check=False)
        else:
            print("\nbench/latency.py is not there yet: no latency table")


if __name__ == "__main__":
    main()

"""Benchmark: CPU per recorded change on the PostgreSQL state, as an apply's workers record them.

    python bench/state_commit.py --state postgresql://root@127.0.0.1:5432/test [--ops 3000] [--workers 1 32]

Each worker does what a provider does for one confirmed change: `put` the record, `mark_applied`, then `sync()`
(the commit every request that may change a vendor waits for). The table gives, per worker count, the wall
time, the process CPU per change and the commits made (group commit: several workers' writes in one). The
schema `bench_commit` is emptied before each run. Figures, not assertions: the test suite never times anything.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fleet import fresh_schema

from reconciler.state.postgres import PostgresState


def run(url: str, ops: int, workers: int) -> tuple[float, float, int]:
    state = PostgresState(fresh_schema(url, "bench_commit"))
    state.lock(["hq"])

    def work(w: int) -> None:
        for i in range(ops // workers):
            address = f"hq/permission/u{w}-{i}"
            state.put(address, {"id": f"{w}-{i}", "name": "x" * 50})
            state.mark_applied(address, "sha256:" + "0" * 64)
            state.sync()

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    cpu, wall = time.process_time(), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    state.unlock()
    return wall, cpu, state.commits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", required=True, help="a postgresql:// state URL")
    parser.add_argument("--ops", type=int, default=3000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()
    print("| workers | changes | wall s | CPU µs per change | commits |")
    print("|---|---|---|---|---|")
    for workers in args.workers:
        wall, cpu, commits = run(args.state, args.ops, workers)
        print(f"| {workers} | {args.ops} | {wall:.2f} | {1e6 * cpu / args.ops:.0f} | {commits} |")


if __name__ == "__main__":
    main()

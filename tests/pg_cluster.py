"""A throwaway PostgreSQL cluster from the binaries on this machine, for tests and for `.ci/run`.

`.ci/run` calls `python tests/pg_cluster.py ensure URL`: when no server answers at URL (a 127.0.0.1 address),
it starts one on that port with trust authentication, the URL's user as superuser and its database created,
installing the PostgreSQL packages with apt-get when no binaries are found; `stop DIR` ends it. The
state tests use `Cluster` directly for a server they may restart. initdb refuses to run as root, so as root
the cluster belongs to the `postgres` user (created by the Debian packages).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit


def find_binaries() -> Path | None:
    for candidate in [os.environ.get("PG_BINDIR", ""), *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]:
        if candidate and (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found and shutil.which("pg_ctl") else None


def install_binaries() -> Path:
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql"], check=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    found = find_binaries()
    if found is None:
        raise SystemExit("PostgreSQL binaries not found even after apt-get install postgresql")
    return found


class Cluster:
    """A cluster in its own directory on 127.0.0.1:`port`, `user` its superuser, trust authentication."""

    def __init__(self, port: int, user: str = "root", bindir: Path | None = None, directory: Path | None = None):
        self.port = port
        self.user = user
        self.bindir = bindir or find_binaries() or install_binaries()
        self.directory = directory or Path(tempfile.mkdtemp(prefix="reconciler-pg-"))
        self.data = self.directory / "data"
        self.owner = "postgres" if os.geteuid() == 0 else None

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.owner:
            command = ["runuser", "-u", self.owner, "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True)   # pg_ctl -t bounds it

    def init(self) -> "Cluster":
        if self.owner:
            shutil.chown(self.directory, self.owner)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", self.user, "--no-sync", "-E", "UTF8")
        return self

    def start(self) -> "Cluster":
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        result = self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.directory / "log"),
                           "-w", "-t", "60", "start", check=False)
        if result.returncode != 0:
            log = (self.directory / "log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"pg_ctl start failed: {result.stdout}{result.stderr}\n{log}")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        self.stop("immediate")
        self.start()

    def create_database(self, name: str) -> None:
        if name not in ("postgres",):
            self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name, check=False)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)


def answers(url: str) -> bool:
    import psycopg
    try:
        psycopg.connect(url, connect_timeout=5).close()
        return True
    except psycopg.Error:
        return False


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] == "ensure":
        url = argv[2]
        if answers(url):
            return 0
        parts = urlsplit(url)
        if parts.hostname not in ("127.0.0.1", "localhost"):
            raise SystemExit(f"no PostgreSQL answers at {parts.hostname}; only a local one can be started")
        cluster = Cluster(parts.port or 5432, user=parts.username or "root").init().start()
        cluster.create_database(parts.path.lstrip("/") or "postgres")
        if not answers(url):
            raise SystemExit(f"started a cluster in {cluster.directory}, but it does not answer at {url}")
        print(cluster.directory)      # for `stop`
        return 0
    if len(argv) == 3 and argv[1] == "stop":
        directory = Path(argv[2])
        Cluster(0, bindir=find_binaries(), directory=directory).remove()
        return 0
    print("usage: pg_cluster.py ensure URL | stop DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))

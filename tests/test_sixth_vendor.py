"""A sixth vendor as a separate package converges with no edit under reconciler/.

`tests/sixth_vendor/` is the package a vendor's author would publish: `pyproject.toml` registers
`gatehouse.GatehouseProvider` under the entry-point group `reconciler.vendors`; the provider declares accounts
with an email and a name, its own grant kind `access_grant` with its own attribute `pin_required`
(`access=(True, False)`), and reads every list through cursor pages; its simulator is in the package. Here it
is installed the way pip would leave it (the package beside a dist-info built from that pyproject, on
PYTHONPATH) and the CLI validates, plans, applies and plans again against its sandbox.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from reconciler.sandbox.common import read_store

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(__file__).resolve().parent / "sixth_vendor"
NOW = "2026-11-22T10:00:00Z"

POLICY = """\
systems:
  lobby: {vendor: gatehouse, url: sandbox}
users:
  alice: {email: alice@example.com, name: Alice Andersen}
  bob: {email: bob@example.com, name: Bob Berg}
devices:
  main: {system: lobby, id: door-1}
  locker: {system: lobby, id: door-99}
permissions:
  - users: [alice]
    devices: [main, locker]
    start: 2026-01-01T00:00:00Z
  - users: [bob]
    devices: [main]
    end: 2027-06-30T00:00:00Z
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """The package installed as a wheel would install it: the module and a dist-info whose metadata and entry
    points come from the package's own pyproject.toml."""
    project = tomllib.loads((PACKAGE / "pyproject.toml").read_text())["project"]
    site = tmp_path / "site"
    shutil.copytree(PACKAGE / "gatehouse", site / "gatehouse")
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    entries = "".join(f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in table.items())
                      for group, table in project["entry-points"].items())
    (info / "entry_points.txt").write_text(entries)
    return site


class Cli:
    def __init__(self, site: Path, work: Path):
        self.site, self.work = site, work
        (work / "policy").mkdir(parents=True)

    def write(self, text: str) -> None:
        (self.work / "policy" / "policy.yaml").write_text(text)

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("RECONCILER_")}
        env["PYTHONPATH"] = os.pathsep.join([str(self.site), *filter(None, [os.environ.get("PYTHONPATH")])])
        return subprocess.run([sys.executable, "-m", "reconciler", *args, "-d", "policy", "--now", NOW]
                              if args[0] in ("plan", "apply") else [sys.executable, "-m", "reconciler", *args],
                              cwd=self.work, env=env, capture_output=True, text=True)

    def plan(self) -> list[dict]:
        result = self("plan", "--format", "json")
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)["changes"]

    def apply(self) -> str:
        result = self("apply", "--auto-approve")
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def vendor(self) -> dict:
        return read_store(next((self.work / ".reconciler").rglob("sandbox/lobby.json")))


@pytest.fixture
def cli(site: Path, tmp_path: Path) -> Cli:
    return Cli(site, tmp_path / "work")


def test_the_sixth_vendor_validates_plans_applies_and_converges(cli: Cli) -> None:
    cli.write(POLICY)
    validated = cli("validate", "-d", "policy")
    assert validated.returncode == 0, validated.stdout + validated.stderr

    planned = {c["address"]: c for c in cli.plan()}
    # Accounts carry the email and the name the policy gives, as the vendor's user schema declares.
    assert planned["lobby/user/alice"]["after"] == {"email": "alice@example.com",
                                                                  "name": "Alice Andersen"}
    # Its own grant kind, with its own attribute at its declared default; door-99 is on the second page.
    grants = {a: c for a, c in planned.items() if c["kind"] == "access_grant"}
    assert set(grants) == {"lobby/access_grant/alice/main", "lobby/access_grant/alice/locker",
                           "lobby/access_grant/bob/main"}
    assert all(c["action"] == "create" and c["effect"] == "grant" for c in grants.values())
    assert grants["lobby/access_grant/bob/main"]["after"] == {"end": "2027-06-30T00:00:00Z",
                                                                            "pin_required": True}

    cli.apply()
    vendor = cli.vendor()
    people = {u["email"]: u["name"] for u in vendor["users"].values()}
    assert people == {"alice@example.com": "Alice Andersen", "bob@example.com": "Bob Berg",
                      "pat@visitor.example": "Pat Visitor"}
    assert sorted((g["door_id"], g["pin_required"]) for g in vendor["grants"].values()) == [
        ("door-1", True), ("door-1", True), ("door-99", True)]

    again = cli("plan", "--detailed-exitcode")
    assert again.returncode == 0, again.stdout + again.stderr

    # Nothing under reconciler/ names the vendor: the package and its entry point are all there is.
    assert not [f for f in (ROOT / "reconciler").rglob("*") if f.is_file() and f.suffix in (".py", ".j2", ".json")
                and re.search(r"gatehouse", f.read_text(encoding="utf-8"), re.IGNORECASE)]


def test_turning_pin_required_off_is_planned_as_granting_access_and_on_as_revoking(cli: Cli) -> None:
    cli.write(POLICY)
    cli.apply()
    cli.write(POLICY.replace("    end: 2027-06-30T00:00:00Z\n", "    end: 2027-06-30T00:00:00Z\n    pin_required: false\n"))

    [change] = cli.plan()
    assert (change["address"], change["action"], change["changed"]) == \
        ("lobby/access_grant/bob/main", "update", ["pin_required"])
    assert change["effect"] == "grant"
    text = cli("plan").stdout
    assert "~ lobby/access_grant/bob/main  [grant]" in text and "(1 granting access, 0 revoking access)" in text
    cli.apply()
    assert [g["pin_required"] for g in cli.vendor()["grants"].values() if g["door_id"] == "door-1"] in \
        ([False, True], [True, False])
    assert cli("plan", "--detailed-exitcode").returncode == 0

    cli.write(POLICY)      # back on: narrower, so it revokes (the mass-revoke guard counts it)
    [change] = cli.plan()
    assert change["effect"] == "revoke"


def test_an_account_without_the_name_the_vendor_needs_is_a_located_error_and_nothing_is_sent(cli: Cli) -> None:
    cli.write(POLICY.replace("bob: {email: bob@example.com, name: Bob Berg}", "bob: {email: bob@example.com}"))
    result = cli("validate", "-d", "policy")
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(r"policy/policy\.yaml:5:\d+: .*name", result.stdout + result.stderr), result.stdout + result.stderr

"""The vendor registry: a vendor is one provider class registered under the entry-point group
`reconciler.vendors`; the core reads its declaration and names no vendor.

The toy sixth vendor (`tests/toy_vendor/`) is installed the way a separate package would be (a dist-info with
`entry_points.txt` on PYTHONPATH) and the CLI validates, plans and applies a policy on it in a subprocess.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler import vendors
from reconciler.errors import PolicyError
from reconciler.policy import load_policy

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "reconciler"
TOY = Path(__file__).resolve().parent / "toy_vendor" / "toy_vendor"
BUILT_IN = ("abloy-keyless", "sentry", "spkey", "unloc", "unloc-partner")
# The core: it reads vendors' declarations and never names one.
CORE = ["policy", "planner.py", "plan.py", "applier.py", "render.py", "run.py", "cli.py", "resources.py",
        "errors.py", "state", "access.py", "export.py", "vendors.py", "templates"]
# Product names besides the registered ones that would also name a vendor.
PRODUCTS = ("smartphonekey", "doordeck", "keyless")
LOCK_HOLDER = "866b8a35-4184-44c5-8ffd-448a77e5a91c"


def test_the_built_in_vendors_are_registered_through_the_entry_point_group() -> None:
    registered = vendors.vendors()

    assert tuple(registered) == BUILT_IN == vendors.names()
    for name, vendor in registered.items():
        assert vendor.provider.vendor == name
        assert vendor.capabilities.vendor == name
        assert vendor.capabilities.production_url == vendor.provider.default_url
        assert vendor.simulator and vendor.load_simulator().__name__.endswith("Simulator")
    # Settings are the settings model's fields; the required ones are its required fields.
    # Every vendor takes `max_answer_mb` (the base settings model's).
    assert registered["unloc"].capabilities.settings == {"lock_holder_id", "notify", "max_answer_mb"}
    assert registered["unloc"].capabilities.required_settings == {"lock_holder_id"}
    assert registered["spkey"].capabilities.settings == {"max_answer_mb"}


def test_a_provider_registered_under_another_name_is_refused() -> None:
    unloc = vendors.vendors()["unloc"].provider

    with pytest.raises(vendors.RegistryError, match="registered as vendor acme but declares vendor = 'unloc'"):
        vendors.declaration("acme", unloc)


def test_validate_locates_a_malformed_vendor_setting(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("systems:\n  cabins:\n    vendor: unloc\n    url: sandbox\n    lock_holder_id: not-a-uuid\n"
                      "  rentals: {vendor: unloc-partner, url: sandbox, partner_id: 'a b'}\n"
                      "  hq: {vendor: unloc, url: sandbox, lock_holder_id: " + LOCK_HOLDER + ", notify: 'no'}\n")

    with pytest.raises(PolicyError) as caught:
        load_policy(policy, vendors.capabilities(), {})

    lines = [str(d) for d in caught.value.diagnostics]
    assert lines == [
        f"{policy}:5:21: 'not-a-uuid' is not a UUID: lock_holder_id is the id of the lock holder, e.g. {LOCK_HOLDER}",
        f"{policy}:6:62: 'a b' is not a partner id: letters, digits and . _ ~ - only",
        f"{policy}:7:99: expected true or false",
    ]


def test_importing_the_cli_loads_no_simulator() -> None:
    code = ("import sys, reconciler.cli; "
            "print(sorted(m for m in sys.modules if m.startswith('reconciler.sandbox')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "[]"


def test_validating_a_policy_without_sandbox_systems_loads_no_simulator(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "systems:\n  cabins:\n    vendor: unloc\n    lock_holder_id: " + LOCK_HOLDER + "\n"
        "    credentials: {client_id: '${UNLOC_CLIENT_ID}', client_secret: '${UNLOC_CLIENT_SECRET}'}\n")
    code = ("import sys; from reconciler.cli import main\n"
            "try:\n    main([\"validate\", \"-d\", sys.argv[1]])\nexcept SystemExit as exit:\n    code = exit.code\n"
            "print(code, sorted(m for m in sys.modules if m.startswith('reconciler.sandbox')))")
    env = {**os.environ, "UNLOC_CLIENT_ID": "id", "UNLOC_CLIENT_SECRET": "secret"}
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                            check=True)

    assert result.stdout.strip().splitlines()[-1] == "0 []", result.stdout + result.stderr


def test_validating_loads_only_the_providers_of_the_vendors_the_policy_names(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(f"systems:\n  cabins: {{vendor: unloc, url: sandbox, lock_holder_id: {LOCK_HOLDER}}}\n")
    code = ("import sys; from reconciler.cli import main\n"
            "try:\n    main([\"validate\", \"-d\", sys.argv[1]])\nexcept SystemExit as exit:\n    code = exit.code\n"
            "print(code, sorted(m for m in sys.modules if m.startswith('reconciler.providers.')))")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)

    status, loaded = result.stdout.strip().splitlines()[-1].split(" ", 1)
    vendor_modules = {f"'reconciler.providers.{m}'" for m in ("abloy", "sentry", "spkey", "unloc", "unloc_partner")}
    assert status == "0"
    assert {m for m in loaded.strip("[]").split(", ") if m in vendor_modules} == {"'reconciler.providers.unloc'"}


def _vendor_words() -> re.Pattern[str]:
    words = {part for name in vendors.names() for part in re.split(r"[^a-z0-9]+", name) if len(part) > 2}
    words.discard("partner")
    return re.compile(r"\b(" + "|".join(sorted({*words, *PRODUCTS})) + r")\b", re.IGNORECASE)


def test_no_core_module_names_a_vendor() -> None:
    pattern = _vendor_words()
    found = []
    for entry in CORE:
        path = PACKAGE / entry
        for file in sorted(path.rglob("*") if path.is_dir() else [path]):
            if file.suffix not in (".py", ".j2") or not file.is_file():
                continue
            for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
                if pattern.search(line):
                    found.append(f"{file.relative_to(ROOT)}:{number}: {line.strip()}")

    assert found == []


def test_the_check_above_finds_a_vendor_name() -> None:
    pattern = _vendor_words()

    assert pattern.search('if caps.vendor != "spkey":') and pattern.search("# Unloc allows one span")
    assert not pattern.search("def unlock(self) -> None:  # unlock_duration")


def test_the_provider_factory_keeps_no_table_of_vendors() -> None:
    # The one place a provider class is bound to a name is the registry: no module keeps its own table.
    tree = ast.parse((PACKAGE / "providers" / "factory.py").read_text())
    literals = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}

    assert not literals & set(BUILT_IN)


# -------------------------------------------------------------------------------------------- a sixth vendor

@pytest.fixture
def toy_site(tmp_path: Path) -> Path:
    """A directory holding the toy vendor package as an installed distribution would: the package and its
    dist-info, whose entry point registers the provider under `reconciler.vendors`."""
    site = tmp_path / "site"
    shutil.copytree(TOY, site / "toy_vendor")
    info = site / "toy_vendor-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-vendor\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[reconciler.vendors]\ntoy = toy_vendor:ToyProvider\n")
    return site


def _cli(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RECONCILER_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", "reconciler", *args], cwd=cwd, env=env, capture_output=True,
                          text=True)


def _policy(directory: Path, site: str = "main") -> None:
    directory.mkdir(exist_ok=True)
    (directory / "policy.yaml").write_text(
        f"systems:\n  shop: {{vendor: toy, url: sandbox, site: {site}}}\n"
        "users:\n  alice: {email: alice@example.com}\n  bob: {email: bob@example.com}\n"
        "devices:\n  front: {system: shop, id: lock-1}\n  back: {system: shop, id: lock-2}\n"
        "permissions:\n  - {users: [alice], devices: [front, back]}\n"
        "  - {users: [bob], devices: [front], end: 2030-01-01T00:00:00Z}\n")


def test_a_sixth_vendor_validates_plans_and_applies_through_the_registry_alone(toy_site: Path,
                                                                              tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    _policy(work / "policy")

    validated = _cli(toy_site, work, "validate", "-d", "policy")
    assert validated.returncode == 0, validated.stdout + validated.stderr

    planned = _cli(toy_site, work, "plan", "-d", "policy", "--detailed-exitcode")
    assert planned.returncode == 2, planned.stdout + planned.stderr
    for address in ("shop/key/alice/front", "shop/key/alice/back", "shop/key/bob/front"):
        assert address in planned.stdout

    applied = _cli(toy_site, work, "apply", "-d", "policy", "--auto-approve")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    store = next((work / ".reconciler").rglob("sandbox/shop.json"))   # under the state of this policy directory
    assert store.read_text().count("@example.com") == 3      # the toy simulator holds the three keys

    again = _cli(toy_site, work, "plan", "-d", "policy", "--detailed-exitcode")
    assert again.returncode == 0, again.stdout + again.stderr

    # Take bob's key away: the plan revokes exactly it, and apply does.
    text = (work / "policy" / "policy.yaml").read_text()
    (work / "policy" / "policy.yaml").write_text(text.replace("  - {users: [bob], devices: [front], "
                                                              "end: 2030-01-01T00:00:00Z}\n", ""))
    revoked = _cli(toy_site, work, "apply", "-d", "policy", "--auto-approve")
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    assert "shop/key/bob/front" in revoked.stdout
    assert "bob@example.com" not in store.read_text() and store.read_text().count("alice@example.com") == 2

    # Nothing in the package was edited to get here: no file of it names the toy vendor.
    assert not [f for f in PACKAGE.rglob("*.py") if re.search(r"\btoy\b", f.read_text(encoding="utf-8"))]


def test_the_sixth_vendor_settings_are_validated_with_its_model(toy_site: Path, tmp_path: Path) -> None:
    _policy(tmp_path / "policy", site="'Main Site'")

    result = _cli(toy_site, tmp_path, "validate", "-d", "policy")

    assert result.returncode == 1
    assert "policy/policy.yaml:2:43: 'Main Site' is not a site code: lower-case letters, digits and -" in \
        result.stdout + result.stderr


def test_an_unregistered_vendor_is_unknown_without_the_package(tmp_path: Path) -> None:
    _policy(tmp_path / "policy")

    result = _cli(tmp_path / "no-site", tmp_path, "validate", "-d", "policy")

    assert result.returncode == 1
    assert "unknown vendor 'toy'" in result.stdout + result.stderr

"""The shared state knows whose it is, as the local state does: the identity checks of `state/trust.py`
hold on PostgreSQL too, against a real server (see test_state_postgres.py for the server and schemas)."""

from __future__ import annotations

import json

import pytest

from reconciler.errors import RefusedError
from reconciler.state.postgres import StateLocation

from test_abloy_provider import POLICY, vendor
from test_state_postgres import PgHarness, _raw, pg_server, pg_url  # noqa: F401 - fixtures

WRITES = ("POST", "PUT", "PATCH", "DELETE")


def _writes(h: PgHarness) -> int:
    return sum(h.sim.count(m) for m in WRITES) - h.sim.count("POST", "/administration/login")


@pytest.fixture
def pg_harness(tmp_path, pg_url):  # noqa: F811 - the fixture imported above
    return PgHarness(tmp_path, pg_url)


def test_identity_recorded_in_the_database_without_secrets(pg_harness):
    pg_harness.write(POLICY)
    pg_harness.converge()
    rows = dict(_raw(pg_harness.url, "SELECT name, identity FROM {s}.systems"))
    identity = rows["hq"]
    assert identity["vendor"] == "abloy-keyless" and identity["url"] == "https://abloy.test/administration"
    assert identity["account"].startswith("sha256:")
    stored = json.dumps([list(r) for r in _raw(pg_harness.url, "SELECT address, record FROM {s}.resources")])
    stored += json.dumps(rows)
    assert all(secret not in stored for secret in pg_harness.sim.credentials.values())


def test_shared_state_of_another_system_is_refused_and_nothing_sent(pg_harness):
    pg_harness.write(POLICY)
    pg_harness.converge()
    systems = pg_harness.policy_dir / "systems.yaml"
    systems.write_text(systems.read_text().replace("https://abloy.test/administration",
                                                   "https://other-tenant.test/administration"))
    pg_harness.allowed_hosts.append("other-tenant.test")
    pg_harness.sim.reset_log()
    with pytest.raises(RefusedError, match="belongs to .*abloy.test.*other-tenant.test"):
        pg_harness.plan()
    with pytest.raises(RefusedError):
        pg_harness.apply(allow_mass_revoke=True)
    assert _writes(pg_harness) == 0
    # The refusal changed nothing in the database: the recorded identity is still the first system's.
    assert dict(_raw(pg_harness.url, "SELECT name, identity FROM {s}.systems"))["hq"]["url"] == \
        "https://abloy.test/administration"


def test_shared_state_of_another_policy_on_the_same_account_is_refused(pg_harness):
    pg_harness.write(POLICY)
    pg_harness.converge()
    users_before = len(vendor(pg_harness, "/user"))
    pg_harness.write("users:\n  zed: {}\n")
    with pytest.raises(RefusedError, match="written by another policy"):
        pg_harness.apply(allow_mass_revoke=True)
    assert len(vendor(pg_harness, "/user")) == users_before


def test_emptied_shared_state_is_refused_not_a_first_run(pg_harness):
    pg_harness.write(POLICY)
    pg_harness.converge()
    for table in ("resources", "applied", "systems"):
        _raw_exec(pg_harness.url, f"DELETE FROM {{s}}.{table}")
    pg_harness.sim.reset_log()
    with pytest.raises(RefusedError, match="knows nothing of this system"):
        pg_harness.plan()
    with pytest.raises(RefusedError):
        pg_harness.apply(allow_mass_revoke=True)
    assert _writes(pg_harness) == 0


def _raw_exec(url: str, query: str) -> None:
    location = StateLocation(url)
    with location.connect() as conn:
        conn.execute(query.format(s=location.schema))

"""The sandboxes' store and paging at fleet scale: an append-only log shared between processes, and pages
answered from an ordered index.

- A write appends what it changed (one line per request) instead of rewriting the store; the store
  survives other instances and processes writing meanwhile, threads of the socket server, a process
  killed mid-write (a torn last line is cut off), compaction, and the older one-document format.
- Paging through the indexed views gives exactly what sorting the whole table per page gave: same
  items, same order, both directions, filters, deletions between pages.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from reconciler.sandbox.abloy import MEDIA_TYPE, AbloySimulator
from reconciler.sandbox.common import LogStore, PageTokens, SortedView, StoreError, paginate, read_store
from reconciler.sandbox.server import start_in_thread
from reconciler.sandbox.spkey import SpkeySimulator
from reconciler.sandbox.unloc import UnlocSimulator

from conftest import NOW

BASE = "https://sandbox.invalid/abloy"


@contextlib.contextmanager
def client_for(sim: AbloySimulator, transport: httpx.BaseTransport | None = None,
               base_url: str = BASE) -> Iterator[httpx.Client]:
    with httpx.Client(transport=transport or httpx.MockTransport(sim.handle), base_url=base_url,
                      headers={"X-Api-Key": sim.credentials["api_key"], "Accept": MEDIA_TYPE}) as client:
        token = client.post("/login", json={"userId": sim.credentials["user_id"],
                                            "accessKey": sim.credentials["access_key"]}).json()["token"]
        client.headers["Authorization"] = f"Bearer {token}"
        yield client


def all_ids(client: httpx.Client, path: str, **query: str) -> list[str]:
    ids: list[str] = []
    params: dict[str, str] = {"limit": "100", **query}
    while True:
        body = client.get(path, params=params).json()
        ids += [item["id"] for item in body["items"]]
        if "nextPageToken" not in body:
            return ids
        params["next-page-token"] = body["nextPageToken"]


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


# ---------------------------------------------------------------------------------------------- log

def test_a_write_appends_one_line_and_never_rewrites_the_store(tmp_path: Path) -> None:
    store = tmp_path / "hq.json"
    sim = AbloySimulator(store, clock=lambda: NOW)
    inode, before = store.stat().st_ino, len(lines(store))
    with client_for(sim) as client:
        created = [client.post("/user", json={"role": "USER"}).json()["id"] for _ in range(5)]
        client.get("/user")                                          # a read writes nothing
    after = lines(store)
    assert store.stat().st_ino == inode, "the store file was replaced"
    assert len(after) == before + 5
    ops = json.loads(after[-1])
    assert ops == [["set", ["users", created[-1]], ops[0][2]], ["set", ["seq"], ops[1][2]]]
    assert "accessKey" not in ops[0][2] and ops[0][2]["_accessKeyHash"]      # the hash, never the key


def test_every_change_survives_a_new_instance(tmp_path: Path) -> None:
    store = tmp_path / "hq.json"
    sim = AbloySimulator(store, clock=lambda: NOW)
    with client_for(sim) as client:
        users = [client.post("/user", json={"role": "USER"}).json()["id"] for _ in range(3)]
        device = client.post("/locking-device", json={"name": "Door"}).json()["id"]
        client.patch(f"/locking-device/{device}", content=json.dumps([{"op": "replace", "path": "/name",
                                                                      "value": "Front"}]),
                     headers={"Content-Type": "application/json-patch+json"})
        client.delete(f"/user/{users[0]}")
    sim.expire_tokens()
    again = AbloySimulator(store, clock=lambda: NOW)
    assert again.state == json.loads(json.dumps(sim.state))
    assert read_store(store) == again.state
    assert again.state["lockingDevices"][device]["name"] == "Front"
    assert users[0] not in again.state["users"] and again.state["tokenGeneration"] == 1


def test_two_instances_interleave_without_losing_or_reusing_ids(tmp_path: Path) -> None:
    store = tmp_path / "hq.json"
    first, second = AbloySimulator(store, clock=lambda: NOW), AbloySimulator(store, clock=lambda: NOW)
    with client_for(first) as a, client_for(second) as b:
        made = []
        for _ in range(10):
            made.append(a.post("/user", json={"role": "USER"}).json()["id"])
            made.append(b.post("/user", json={"role": "USER"}).json()["id"])
        assert len(set(made)) == 20
        assert set(made) <= set(all_ids(a, "/user")) and set(made) <= set(all_ids(b, "/user"))
    assert set(made) <= set(AbloySimulator(store, clock=lambda: NOW).state["users"])


def test_separate_processes_share_the_store(tmp_path: Path) -> None:
    store = tmp_path / "hq.json"
    sim = AbloySimulator(store, clock=lambda: NOW)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_sandbox_store import client_for, NOW
        from reconciler.sandbox.abloy import AbloySimulator
        sim = AbloySimulator({str(store)!r}, clock=lambda: NOW)
        with client_for(sim) as client:
            for _ in range(20):
                print(client.post("/user", json={{"role": "USER"}}).json()["id"], flush=True)
    """)
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as child, \
            client_for(sim) as client:
        mine = [client.post("/user", json={"role": "USER"}).json()["id"] for _ in range(20)]
        out, _ = child.communicate()
        theirs = out.split()
        assert child.returncode == 0 and len(theirs) == 20
        listed = all_ids(client, "/user")
    assert set(mine) | set(theirs) <= set(listed) and len(set(mine) | set(theirs)) == 40


def test_threads_of_the_socket_server_all_get_written(tmp_path: Path) -> None:
    store = tmp_path / "hq.json"
    sim = AbloySimulator(store, clock=lambda: NOW)
    server, url = start_in_thread("127.0.0.1", 0, {"/abloy-keyless": sim.handle})
    made: list[str] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with client_for(sim, httpx.HTTPTransport(), url + "/abloy-keyless") as client:
                for _ in range(10):
                    response = client.post("/user", json={"role": "USER"})
                    made.append(response.json()["id"])
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    with server:
        threads = [threading.Thread(target=worker) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors and len(set(made)) == 60
    assert set(made) <= set(AbloySimulator(store, clock=lambda: NOW).state["users"])


def test_a_torn_last_write_is_cut_off(tmp_path: Path) -> None:
    store = tmp_path / "hq.json"
    sim = AbloySimulator(store, clock=lambda: NOW)
    with client_for(sim) as client:
        kept = client.post("/user", json={"role": "USER"}).json()["id"]
    whole = store.read_bytes()
    with store.open("ab") as handle:
        handle.write(b'[["set",["users","torn"],{"id":"tor')          # died in the middle of a write
    again = AbloySimulator(store, clock=lambda: NOW)
    assert kept in again.state["users"] and "torn" not in again.state["users"]
    assert store.read_bytes() == whole                               # cut off, so the next write is whole
    with client_for(again) as client:
        added = client.post("/user", json={"role": "USER"}).json()["id"]
    assert {kept, added} <= set(AbloySimulator(store, clock=lambda: NOW).state["users"])


def test_a_process_killed_while_writing_leaves_a_store_that_opens_with_every_answered_write(tmp_path: Path) -> None:
    store = tmp_path / "hq.json"
    AbloySimulator(store, clock=lambda: NOW)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_sandbox_store import client_for, NOW
        from reconciler.sandbox.abloy import AbloySimulator
        sim = AbloySimulator({str(store)!r}, clock=lambda: NOW)
        with client_for(sim) as client:
            while True:
                print(client.post("/user", json={{"role": "USER"}}).json()["id"], flush=True)
    """)
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None
        answered = [child.stdout.readline().strip() for _ in range(200)]
        os.kill(child.pid, signal.SIGKILL)      # while it keeps writing
        child.wait()
        answered += [line.strip() for line in child.stdout if line.endswith("\n")]
    users = AbloySimulator(store, clock=lambda: NOW).state["users"]
    assert set(answered) <= set(users)


def test_compaction_keeps_the_state_and_other_instances_follow(tmp_path: Path) -> None:
    store = tmp_path / "hq.json"
    sim, follower = AbloySimulator(store, clock=lambda: NOW), AbloySimulator(store, clock=lambda: NOW)
    with client_for(sim) as client:
        device = client.post("/locking-device", json={"name": "Door"}).json()["id"]
        for n in range(1200):          # many writes to one record: the log outgrows the state
            client.patch(f"/locking-device/{device}", content=json.dumps(
                [{"op": "replace", "path": "/name", "value": f"Door {n}"}]),
                headers={"Content-Type": "application/json-patch+json"})
    assert len(lines(store)) < 1200, "never compacted"
    assert read_store(store)["lockingDevices"][device]["name"] == "Door 1199"
    with client_for(follower) as client:
        assert client.get(f"/locking-device/{device}").json()["name"] == "Door 1199"
        client.post("/user", json={"role": "USER"})
    assert AbloySimulator(store, clock=lambda: NOW).state == json.loads(json.dumps(follower.state))


def test_a_store_in_the_one_document_format_is_converted(tmp_path: Path) -> None:
    legacy = UnlocSimulator(clock=lambda: NOW).state          # what the older format held
    store = tmp_path / "cabins.json"
    store.write_text(json.dumps(legacy, indent=1))
    sim = UnlocSimulator(store, clock=lambda: NOW)
    assert sim.state == legacy
    assert json.loads(lines(store)[0])["kind"] == "reconciler-sandbox-log"
    assert read_store(store) == legacy


@pytest.mark.parametrize("content", [
    b'{"format": "reconciler-sandbox/unloc", "version": 1}',
    b'{"kind":"reconciler-sandbox-log","log":1,"format":"reconciler-sandbox/unloc","version":1}\n',
    b"not json at all",
])
def test_a_store_of_another_vendor_or_none_is_refused_clearly(tmp_path: Path, content: bytes) -> None:
    store = tmp_path / "hq.json"
    store.write_bytes(content)
    with pytest.raises(StoreError, match=r"not a reconciler-sandbox/abloy-keyless store|is not a sandbox store"):
        AbloySimulator(store, clock=lambda: NOW)
    assert store.read_bytes() == content                       # refused, not overwritten


def test_appended_log_entries_are_written_as_appends(tmp_path: Path) -> None:
    from reconciler.sandbox.sentry import SentrySimulator

    store = tmp_path / "office.json"
    sim = SentrySimulator(store, clock=lambda: NOW)
    lock = next(iter(sim.state["locks"]))
    sim.set_offline(lock)
    ops = json.loads(lines(store)[-1])
    assert [op[0] for op in ops] == ["set", "add"] and ops[1][1] == ["log"]
    assert read_store(store) == json.loads(json.dumps(sim.state))


def test_a_deleted_store_is_written_again_on_the_next_start(tmp_path: Path) -> None:
    store = tmp_path / "spkey.json"
    SpkeySimulator(store, clock=lambda: NOW)
    store.unlink()
    assert SpkeySimulator(store, clock=lambda: NOW).state == read_store(store)


def test_a_store_deleted_under_a_running_simulator_is_written_whole_on_its_next_change(tmp_path: Path) -> None:
    store = tmp_path / "hq.json"
    sim = AbloySimulator(store, clock=lambda: NOW)
    with client_for(sim) as client:
        kept = client.post("/user", json={"role": "USER"}).json()["id"]
        store.unlink()
        assert client.get(f"/user/{kept}").status_code == 200          # still served from memory
        added = client.post("/user", json={"role": "USER"}).json()["id"]
    assert {kept, added} <= set(AbloySimulator(store, clock=lambda: NOW).state["users"])
    assert read_store(store) == json.loads(json.dumps(sim.state))


def test_log_store_creation_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    first = LogStore(path, "f", 1).open(lambda: {"n": 1})
    second = LogStore(path, "f", 1).open(lambda: {"n": 2})       # the store exists: not seeded again
    assert first == second == {"n": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


# ------------------------------------------------------------------------------------------- paging

def naive_page(records: list[dict], key, *, after, limit: int, descending: bool, where):
    ordered = sorted(records, key=key, reverse=descending)
    if after is not None:
        ordered = [r for r in ordered if (key(r) < after if descending else key(r) > after)]
    ordered = [r for r in ordered if where is None or where(r)]
    return ordered[:limit], len(ordered) > limit


@pytest.mark.parametrize("seed", range(5))
def test_sorted_view_pages_exactly_as_sorting_the_whole_table(seed: int) -> None:
    rng = random.Random(seed)
    records = [{"id": f"{rng.randrange(10**6):06d}", "n": rng.randrange(50), "g": rng.choice("ab")}
               for _ in range(rng.randrange(0, 300))]
    key = lambda r: (r["n"], r["id"])  # noqa: E731
    view = SortedView(records, key)
    for descending in (False, True):
        for where in (None, lambda r: r["g"] == "a"):
            for limit in (1, 7, 100):
                after = None
                walked_view, walked_naive = [], []
                while True:
                    page, more = view.page(after=after, limit=limit, descending=descending, where=where)
                    expected, expected_more = naive_page(records, key, after=after, limit=limit,
                                                         descending=descending, where=where)
                    assert (page, more) == (expected, expected_more)
                    walked_view += page
                    walked_naive += expected
                    if not more:
                        break
                    after = key(page[-1])
                assert walked_view == walked_naive


def test_a_cursor_of_another_shape_is_an_invalid_token_not_a_crash() -> None:
    tokens = PageTokens(b"k" * 32)
    view = SortedView([{"_seq": 1}, {"_seq": 2}], lambda r: (r["_seq"],))
    foreign = tokens.encode("permission", ["text"])
    with pytest.raises(Exception, match="Invalid next-page-token"):
        paginate(view, limit=1, token=foreign, scope="permission", tokens=tokens)


def test_paging_a_large_table_keeps_order_through_creates_and_deletes(tmp_path: Path) -> None:
    sim = AbloySimulator(tmp_path / "hq.json", clock=lambda: NOW)
    with client_for(sim) as client:
        device = client.post("/locking-device", json={"name": "Door"}).json()["id"]
        user = client.post("/user", json={"role": "USER"}).json()["id"]
        body = {"permissionType": "SINGLE_INTERVAL", "userId": user, "lockingDeviceId": device,
                "operationType": "OPEN", "start": "2026-01-01T00:00:00Z", "end": "2027-01-01T00:00:00Z"}
        made = [client.post("/permission", json=body).json()["id"] for _ in range(450)]
        seq_of = {p["id"]: p["_seq"] for p in sim.state["permissions"].values()}
        first = client.get("/permission", params={"limit": "100"}).json()
        for doomed in made[50:60] + made[300:310]:                 # deleted between pages
            assert client.delete(f"/permission/{doomed}").status_code == 204
        later = client.post("/permission", json=body).json()["id"]
        rest = all_ids(client, "/permission", **{"next-page-token": first["nextPageToken"]})
    last = max(seq_of[item["id"]] for item in first["items"])
    remaining = sorted(sim.state["permissions"].values(), key=lambda p: p["_seq"])
    assert len(first["items"]) == 100
    assert rest == [p["id"] for p in remaining if p["_seq"] > last]
    assert rest[-1] == later and not set(made[300:310]) & set(rest)


def test_the_unloc_key_list_pages_by_id_from_the_index(tmp_path: Path) -> None:
    sim = UnlocSimulator(clock=lambda: NOW)
    lock = next(iter(sim.state["locks"]))
    made = [sim.add_key(lock, f"+4790000{n:03d}", via="api") for n in range(230)]
    holder = sim.state["locks"][lock]["lockHolderId"]
    with httpx.Client(transport=httpx.MockTransport(sim.handle), base_url="https://sandbox.invalid") as client:
        token = client.post("/auth/v1/token/", json={
            "grant_type": "client_credentials", "scope": [f"lockHolder.admin:{holder}"],
            **sim.credentials}).json()["access_token"]
        client.headers["Authorization"] = f"Bearer {token}"
        seen, params = [], {"limit": "100"}
        while True:
            body = client.get(f"/integrators/v1/lock-holders/{holder}/keys", params=params).json()
            seen += [k["id"] for k in body["keys"]]
            if "startAfterId" not in body:
                break
            params["startAfterId"] = body["startAfterId"]
    api_keys = sorted(k["id"] for k in sim.state["keys"].values() if k["_origin"] == "api")
    assert seen == api_keys and set(made) <= set(seen)


def test_unloc_keys_move_on_by_the_clock_from_an_agenda_not_a_scan() -> None:
    from datetime import timedelta

    clock = [NOW]
    sim = UnlocSimulator(clock=lambda: clock[0])
    lock = next(iter(sim.state["locks"]))
    rng = random.Random(7)
    made = {}
    for n in range(300):
        start = NOW + timedelta(seconds=rng.randrange(-50, 400))
        end = None if n % 5 == 0 else start + timedelta(seconds=rng.randrange(1, 400))
        made[sim.add_key(lock, f"+4791{n:06d}", start=start, end=end, via="api", state="creating")] = (start, end)
    revoked = set(list(made)[::17])
    for key_id in revoked:
        sim.state["keys"][key_id]["state"] = "revoked"
        sim.mark_changed("keys", key_id)
    settle = NOW + sim.creation_delay

    def expected(key_id: str, at) -> str:
        start, end = made[key_id]
        if key_id in revoked:
            return "revoked"
        if at < settle:
            return "creating"
        if at < start:
            return "scheduled"
        return "expired" if end is not None and at >= end else "active"

    for step in range(0, 900, 7):
        clock[0] = NOW + timedelta(seconds=step)
        states = {k["id"]: k["state"] for k in sim.keys() if k["id"] in made}
        assert states == {key_id: expected(key_id, clock[0]) for key_id in made}, step


def test_sandbox_serve_restarted_serves_what_it_held_and_more(tmp_path: Path) -> None:
    from conftest import serve_sandboxes

    @contextlib.contextmanager
    def served_client(url: str, credentials: dict[str, str]) -> Iterator[httpx.Client]:
        with httpx.Client(base_url=f"{url}/abloy-keyless",
                          headers={"X-Api-Key": credentials["ABLOY_API_KEY"], "Accept": MEDIA_TYPE}) as client:
            token = client.post("/login", json={"userId": credentials["ABLOY_USER_ID"],
                                                "accessKey": credentials["ABLOY_ACCESS_KEY"]}).json()["token"]
            client.headers["Authorization"] = f"Bearer {token}"
            yield client

    with serve_sandboxes(tmp_path) as served, served_client(*served) as client:
        before = all_ids(client, "/user")
        made = [client.post("/user", json={"role": "USER"}).json()["id"] for _ in range(3)]
    with serve_sandboxes(tmp_path) as served, served_client(*served) as client:
        assert all_ids(client, "/user") == before + made
        more = client.post("/user", json={"role": "USER"}).json()["id"]
        assert all_ids(client, "/user") == before + made + [more]

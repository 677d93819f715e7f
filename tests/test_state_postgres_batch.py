"""#23 (writes at the network's pace): a commit on the PostgreSQL state is one query of a few set-based
statements, each row's last write; on the real server the rows end as the writes in order left them, a
quote or a backslash in a record stays data, and the lock fence still refuses a commit after a takeover."""

from __future__ import annotations

import pytest
from test_state_postgres import pg_server, pg_url  # noqa: F401

from reconciler.state.postgres import PostgresState, _set_based

PUT = ("INSERT INTO {s}.resources (address, record, written_by, written_at) VALUES (%s, %s::jsonb, %s, now()) "
       "ON CONFLICT (address) DO UPDATE SET record = EXCLUDED.record, written_by = EXCLUDED.written_by, "
       "written_at = EXCLUDED.written_at")
DELETE = "DELETE FROM {s}.resources WHERE address = %s"


def test_a_batch_comes_to_each_rows_last_write_in_a_few_statements():
    batch = [(PUT, ("a", '{"id": "1"}', "me")), (DELETE, ("a",)), (DELETE, ("b",)), (PUT, ("b", '{"id": "2"}', "me")),
             (PUT, ("c", '{"id": "3"}', "me")), (PUT, ("c", '{"id": "4"}', "me"))]
    statements = list(_set_based(batch))
    assert len(statements) == 2
    (delete, (deleted,)), (upsert, (rows,)) = sorted(statements, key=lambda s: not s[0].startswith("DELETE"))
    assert deleted == ["a"] and "ANY(%s::text[])" in delete
    assert rows == '[["b", "{\\"id\\": \\"2\\"}", "me"], ["c", "{\\"id\\": \\"4\\"}", "me"]]'
    assert "jsonb_array_elements(%s::jsonb)" in upsert and "(r->>1)::jsonb" in upsert


def test_the_rows_end_as_the_writes_in_order_left_them_on_the_server(pg_url):
    state = PostgresState(pg_url)
    state.lock(["hq"])
    state.put("hq/user/gone", {"id": "1"})
    state.put("hq/user/kept", {"id": "2"})
    state.delete("hq/user/gone")
    state.put("hq/user/back", {"id": "3"})
    state.delete("hq/user/back")
    state.put("hq/user/back", {"id": "4", "name": "O'Brien \\ \"quoted\" ; DROP TABLE x; --"})
    state.mark_applied("hq/user/kept", "sha256:1")
    state.mark_applied("hq/user/kept", "sha256:2")
    state.set_note("evidence/hq/00", {"hq/user/kept": {"name": "it's"}})
    state.sync()
    state.unlock()
    again = PostgresState(pg_url)
    assert dict(again.items("hq/")) == {"hq/user/kept": {"id": "2"},
                                        "hq/user/back": {"id": "4", "name": "O'Brien \\ \"quoted\" ; DROP TABLE x; --"}}
    assert again.applied() == {"hq/user/kept": "sha256:2"}
    assert again.note("evidence/hq/00") == {"hq/user/kept": {"name": "it's"}}


def test_a_commit_after_the_lock_moved_on_writes_nothing(pg_url):
    state = PostgresState(pg_url)
    state.lock(["hq"])
    state.put("hq/user/a", {"id": "1"})
    state.sync()
    with state.server.connect() as conn:      # another runner takes the lock over: its epoch moves on
        conn.execute(f'UPDATE "{state.server.schema}".locks SET epoch = epoch + 1')
    state.put("hq/user/b", {"id": "2"})
    with pytest.raises(Exception, match="took the lock over"):
        state.sync()
    assert set(dict(PostgresState(pg_url).items("hq/"))) == {"hq/user/a"}

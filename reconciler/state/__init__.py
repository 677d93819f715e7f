"""State stores: what the vendors cannot tell us (ids of objects without natural keys, sent invitations,
creates whose answer was lost). `StateStore` is their one interface; `LocalState` is the JSON-file backend
for one person, `PostgresState` the shared one for a team, chosen by a `postgresql://` URL. `open_state`
picks one; run.py calls it. `reconciler.state.trust` refuses a state that is another system's or was lost."""

from __future__ import annotations

from pathlib import Path

from reconciler.state.local import DATA_DIR, STATE_FILE, LocalState, default_state_path, is_database_url
from reconciler.state.store import StateStore

__all__ = ["DATA_DIR", "STATE_FILE", "LocalState", "StateStore", "default_state_path", "is_database_url", "open_state"]


def open_state(spec: str | Path, *, lock_timeout: float = 0.0) -> StateStore:
    """A `postgresql://` URL opens the shared PostgreSQL state; anything else is a local file path."""
    if isinstance(spec, str) and is_database_url(spec):
        from reconciler.state.postgres import PostgresState  # psycopg is loaded only when asked for
        return PostgresState(spec, lock_timeout=lock_timeout)
    return LocalState(Path(spec), lock_timeout=lock_timeout)

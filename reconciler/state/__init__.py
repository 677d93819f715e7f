"""State stores: what the vendors cannot tell us (ids of objects without natural keys, sent invitations,
creates whose answer was lost). `LocalState` is the JSON-file backend."""

from reconciler.state.local import LocalState, default_state_path

__all__ = ["LocalState", "default_state_path"]

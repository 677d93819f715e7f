"""A wrapper that keeps secret values out of reprs, logs, plans and tracebacks.

The policy loader wraps every credential read from the environment; only a provider's HTTP layer calls
`reveal()` when it builds a request.
"""

from __future__ import annotations


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

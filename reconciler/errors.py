"""Error tree, policy locations and exit codes.

Every module raises a `ReconcilerError` subclass; `cli.py` is the one place that turns them into a message
and an exit code. Errors are classified by what the caller should do: fix the policy (`PolicyError`),
look at the vendor (`VendorError`, temporary or permanent), or not run the plan (`RefusedError`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1
    CHANGES = 2
    INTERNAL = 3    # a bug in reconciler, not a policy or vendor problem


@dataclass(frozen=True, order=True)
class Location:
    """A place in a policy file; `line` and `col` are 1-based."""

    path: str
    line: int = 0
    col: int = 0

    def __str__(self) -> str:
        if not self.line:
            return self.path
        return f"{self.path}:{self.line}:{self.col or 1}"


@dataclass(frozen=True, order=True)
class Diagnostic:
    """One problem found in a policy, at a place, with a reason a person can act on."""

    location: Location
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


class ReconcilerError(Exception):
    """Base of every error the CLI reports without a traceback."""

    exit_code = ExitCode.ERROR

    def lines(self) -> list[str]:
        return [str(self)]


class PolicyError(ReconcilerError):
    """The policy is invalid; carries every diagnostic found, not just the first."""

    def __init__(self, diagnostics: list[Diagnostic]):
        self.diagnostics = sorted(diagnostics)
        super().__init__("\n".join(str(d) for d in self.diagnostics))

    def lines(self) -> list[str]:
        return [str(d) for d in self.diagnostics]


class StateError(ReconcilerError):
    """The state file cannot be read, written or locked."""


class LockedError(StateError):
    """Another process holds the state lock."""


class VendorError(ReconcilerError):
    """A vendor answered with an error, or could not be reached.

    `temporary` says whether trying again later may help (rate limit, 5xx, connection);
    `ambiguous` says the request may have taken effect even though no answer arrived.
    """

    def __init__(self, message: str, *, status: int | None = None, temporary: bool = False,
                 ambiguous: bool = False):
        self.status = status
        self.temporary = temporary
        self.ambiguous = ambiguous
        super().__init__(message)


class PlanError(ReconcilerError):
    """The live systems and the policy cannot be reconciled as written (an unknown email at a vendor,
    say); every problem is listed and nothing is sent."""

    def __init__(self, problems: list[str]):
        self.problems = sorted(problems)
        super().__init__("\n".join(self.problems))

    def lines(self) -> list[str]:
        return list(self.problems)


class RefusedError(ReconcilerError):
    """A plan or apply was refused by a safety rail (stale plan, mass revocation, no approval)."""


class ApplyFailedError(ReconcilerError):
    """Apply finished with some changes failed; the report says what succeeded and what remains."""

    def __init__(self, message: str, report_lines: list[str]):
        self.report_lines = report_lines
        super().__init__(message)

    def lines(self) -> list[str]:
        return [*self.report_lines, str(self)]


class InternalError(ReconcilerError):
    """A programming error (a `KeyError`, say) stopped an apply at `address`: a bug, not a vendor's failure.
    What was in flight finished and is journaled; `RECONCILER_DEBUG=1` re-raises `error` instead."""

    exit_code = ExitCode.INTERNAL

    def __init__(self, address: str, error: BaseException, report_lines: list[str]):
        self.address = address
        self.error = error
        self.report_lines = report_lines
        super().__init__(f"internal error at {address}: {type(error).__name__}: {error}; this is a bug in "
                         "reconciler, not a vendor failure: the apply stopped and what was in flight is journaled "
                         "(run with RECONCILER_DEBUG=1 for its traceback)")

    def lines(self) -> list[str]:
        return [*self.report_lines, str(self)]

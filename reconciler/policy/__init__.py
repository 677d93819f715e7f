"""Load a policy directory into systems and desired resources, or fail with every problem at once.

`cli.py` calls `load_policy(path, capabilities, env)` for validate, plan and apply; the provider registry
supplies `capabilities` (vendor name → `Capabilities`) so that this package never imports a provider, and the
caller passes the environment so that tests need not touch `os.environ`.

Stages (each collects diagnostics instead of stopping at the first): `yamlio` reads and parses every file,
`schema` validates and merges the entries, `checks` resolves references, credentials and vendor limits,
`expand` produces the desired `Resource`s. A `PolicyError` carries everything found, sorted by location.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from reconciler.bulk import paused_collection
from reconciler.errors import PolicyError
from reconciler.resources import Capabilities

from .checks import check_ignore, check_references, check_systems
from .expand import evidence, expand, renames
from .proofs import resolve, zone
from .schema import Policy, SystemConfig, parse
from .yamlio import read_documents

__all__ = ["Policy", "SystemConfig", "load_policy"]


@paused_collection
def load_policy(path: Path, capabilities: Mapping[str, Capabilities], env: Mapping[str, str], *,
                allowed_hosts: Iterable[str] = (), allowed_credentials: Iterable[str] = ()) -> Policy:
    """`allowed_hosts` and `allowed_credentials` come from the operator (options, the workflow's
    environment), never from the policy directory: hosts a system's `url` may name besides sandbox, loopback
    and the vendor's production host, and variable names `credentials:` may read besides the vendor's prefix."""
    documents, diagnostics = read_documents(Path(path))
    declarations, problems = parse(documents)
    diagnostics += problems
    systems, problems = check_systems(declarations, capabilities, env, allowed_hosts=allowed_hosts,
                                      allowed_credentials=allowed_credentials)
    diagnostics += problems
    diagnostics += check_references(declarations, capabilities)
    resources, warnings, problems = expand(declarations, capabilities)
    diagnostics += problems
    diagnostics += check_ignore(declarations, resources)
    zones = {name: zone(entry.model.timezone) for name, entry in declarations.systems.items()
             if entry.model is not None}
    assertions, rules, problems = resolve(declarations, zones)
    diagnostics += problems
    if diagnostics:
        # One problem can be found by two routes (a permission listing two devices on one vendor); say it once.
        raise PolicyError(sorted(set(diagnostics)))
    emails = {entry.model.email: name for name, entry in sorted(declarations.users.items())
              if entry.model is not None and entry.model.email}
    return Policy(systems=systems, resources=resources, warnings=warnings, files=declarations.files, emails=emails,
                  renames=renames(declarations), ignore=tuple(dict.fromkeys(p for p, _ in declarations.ignore)),
                  evidence=evidence(declarations, resources), assertions=assertions, rules=rules)

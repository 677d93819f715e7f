"""Start-up: `reconciler --help` imports no heavy library, and `validate` imports neither the templates nor the
round-trip YAML library for a valid policy. Checked in a fresh interpreter through `sys.modules`, never by
timing (the start-up time is a figure of bench/, not an assertion)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

POLICY = """\
systems:
  hq: {vendor: abloy-keyless, url: sandbox}
users:
  alice: {}
devices:
  door: {system: hq}
permissions:
- users: [alice]
  devices: [door]
  start: 2026-01-01T00:00:00Z
  end: 2027-01-01T00:00:00Z
"""


def loaded_by(tmp_path, *args: str) -> tuple[int, set[str]]:
    """Run the CLI in a fresh interpreter; return its exit code and every module it imported (executed: a
    module `reconciler.lazy` has registered but nobody touched yet does not count)."""
    script = textwrap.dedent(f"""
        import json, sys, importlib.util
        from reconciler.cli import main
        try:
            main({list(args)!r})
        except SystemExit as exc:
            code = exc.code or 0
        lazy = importlib.util._LazyModule
        names = [name for name, module in list(sys.modules.items()) if not isinstance(module, lazy)]
        print(json.dumps([code, names]))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True)
    code, names = json.loads(done.stdout.strip().splitlines()[-1])
    return code, set(names)


def tops(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


def test_help_imports_no_heavy_library(tmp_path):
    code, names = loaded_by(tmp_path, "--help")
    assert code == 0
    heavy = {"jinja2", "cryptography", "jwt", "httpx", "yaml", "ruamel", "pydantic", "psycopg", "phonenumbers"}
    assert tops(names) & heavy == set()
    assert {n for n in names if n.startswith(("reconciler.sandbox", "reconciler.providers", "reconciler.policy",
                                              "reconciler.render", "reconciler.run"))} == set()


def test_validate_imports_no_templates_cryptography_simulator_or_round_trip_parser(tmp_path):
    (tmp_path / "p.yaml").write_text(POLICY.replace("url: sandbox", "url: sandbox}\n  door-co: {vendor: sentry, url: sandbox"))
    code, names = loaded_by(tmp_path, "validate", "p.yaml")
    assert code == 0
    assert "yaml" in tops(names) and "reconciler.policy.yamlio" in names      # it did read the policy
    assert tops(names) & {"jinja2", "ruamel", "cryptography", "jwt"} == set()
    assert {n for n in names if n.startswith(("reconciler.render", "reconciler.sandbox"))} == set()


def test_a_policy_error_still_reads_the_file_with_the_reference_parser(tmp_path):
    (tmp_path / "p.yaml").write_text(POLICY + "users:\n  bob: {}\n")     # a duplicate key: ruamel.yaml says where
    code, names = loaded_by(tmp_path, "validate", "p.yaml")
    assert code == 1
    assert "ruamel" in tops(names)

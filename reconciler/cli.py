"""Command line: parse options, call one function of `reconciler.run`, print, exit with its code.

Exit codes, one meaning each: 0 success or no changes; 1 any error (policy, vendor, refused plan, a declined
apply, a usage error such as an unknown option); 2 only "changes present" (`plan --detailed-exitcode`); 3 a bug in
reconciler. Errors print one line per problem, never a traceback.

Every command accepts `-v/--verbose` and `--no-color` wherever they are written (`ReconcilerGroup` adds them to
each command it registers, so a new command gets them too), and the commands that read a policy take it the same
way: `[DIR]` or `-d/--directory DIR`. Without `--state`, each policy directory keeps its own state and sandbox
data (`data_dir`), so the demo and the examples never see each other's vendors.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, cast

import click

from reconciler import __version__
from reconciler.errors import (
    ApplyFailedError,
    Diagnostic,
    ExitCode,
    InternalError,
    Location,
    PolicyError,
    ReconcilerError,
    RefusedError,
)
from reconciler.lazy import lazy_module
from reconciler.state import DATA_DIR, STATE_FILE, default_state_path, is_database_url
from reconciler.terminal import ApplyProgress, ReadProgress, color_wanted, colorize_plan, is_terminal
from reconciler.text import EscapingFormatter, printable

if TYPE_CHECKING:
    from reconciler import render, run
    from reconciler.applier import ApplyReport
    from reconciler.plan import Change, Plan
else:   # loaded when a command first uses them: `--help` needs neither (see reconciler/lazy.py)
    run, render = lazy_module("reconciler.run"), lazy_module("reconciler.render")

log = logging.getLogger(__name__)

DEFAULT_WAIT_TEXT = "5m"     # bare `apply --wait`: a vendor's documented "short delay", with room for a slow one


def _parse_now(value: str | None) -> datetime | None:
    """`--now`, or None: the session then reads the wall clock itself (`run.wall_clock`)."""
    moment = _parse_at(value)
    return None if moment is None else moment.astimezone(UTC)


def _parse_duration(value: str) -> float:
    """`0`, `90` or `90s`, `5m`, `1h30m`: seconds."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s?)?", value.strip())
    if not value.strip() or match is None:
        raise click.BadParameter(f"{value[:40]!r} is not a duration (e.g. 0, 30s, 5m, 1h)")
    hours, minutes, seconds = match.groups()
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds or 0)


DEFAULT_DIRECTORY = "policies"


def data_dir(directory: Path) -> Path:
    """Where a policy directory keeps its state and sandbox data when no `--state` is given.

    The default `policies/` keeps `.reconciler/` (state.json, sandbox/); any other directory (or file) D under the
    working directory keeps `.reconciler/dirs/D/`, and one outside it `.reconciler/dirs/_abs/<hash>/`. So every
    example has its own sandbox vendors and state, and plans and applies whatever ran before it.
    """
    resolved = directory.resolve()
    try:
        relative = resolved.relative_to(Path.cwd().resolve())
    except ValueError:
        import hashlib

        return DATA_DIR / "dirs" / "_abs" / hashlib.sha256(resolved.as_posix().encode()).hexdigest()[:16]
    if relative.as_posix() == DEFAULT_DIRECTORY:
        return DATA_DIR
    return DATA_DIR / "dirs" / (relative.as_posix() if relative.parts else "_here")


def _session(directory: str, state: str | None, now: str | None, allow_host: tuple[str, ...] = (),
             lock_timeout: str = "0") -> run.Session:
    env = dict(os.environ)
    url = state if state and is_database_url(state) else None
    if url:
        state_path = default_state_path()
    elif state:
        state_path = Path(state)
    elif os.environ.get("RECONCILER_STATE"):
        state_path = default_state_path()
    else:
        state_path = data_dir(Path(directory)) / STATE_FILE
    return run.Session(directory=Path(directory), state_path=state_path, state_url=url,
                       lock_timeout=_parse_duration(lock_timeout), env=env, now=_parse_now(now),
                       allowed_hosts=tuple(allow_host), provider_options=_trust_env_options(),
                       allowed_credentials=tuple(env.get("RECONCILER_ALLOW_CREDENTIALS", "").replace(",", " ").split()))


def _run_command(func: Callable[[], int]) -> None:
    """Run a command body and exit with its code; the one error handler: known errors → their lines and exit
    code; anything else → one line."""
    try:
        code = func()
    except ReconcilerError as exc:
        for line in exc.lines():
            # Messages quote policy values and vendor answers: one line each, no control characters.
            click.echo(printable(line), err=True)
        code = exc.exit_code
    except KeyboardInterrupt:
        # Apply catches Ctrl-C itself once it starts sending (see `apply`): reaching here, nothing was sent.
        click.echo("interrupted; nothing was sent", err=True)
        code = ExitCode.ERROR
        _leave_blocked_reads(int(code))
    except click.exceptions.ClickException:
        raise
    except Exception as exc:  # an internal error still gets one line, not a traceback
        if os.environ.get("RECONCILER_DEBUG"):
            raise
        click.echo(printable(f"internal error: {type(exc).__name__}: {exc} (a bug in reconciler; set "
                             "RECONCILER_DEBUG=1 for a traceback)"), err=True)
        code = ExitCode.INTERNAL
    sys.exit(int(code))


def _leave_blocked_reads(code: int) -> None:
    """After Ctrl-C, once the command has unwound (state unlocked, clients closed): a read still blocked on a
    silent vendor would hold the process until its request timeout, since Python joins every worker thread
    at exit. Reads change nothing, so the process exits now and leaves them behind."""
    if any(t.is_alive() and not t.daemon and t is not threading.main_thread() for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        _hard_exit(code)


_hard_exit: Callable[[int], Any] = os._exit


# ------------------------------------------------------------------------------------------- shared options

def _configure_logging(verbosity: int) -> None:
    """-v: reconciler's own decisions (INFO); -vv: everything at DEBUG, HTTP requests included."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(EscapingFormatter("%(levelname)s %(name)s %(message)s"))   # vendor text escaped
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO if verbosity == 1 else logging.WARNING)
    # httpx and httpcore log every request at INFO; that is -vv detail, not -v.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)


def _count_verbose(ctx: click.Context, _param: click.Parameter, value: int) -> None:
    meta = ctx.find_root().meta
    meta["reconciler.verbose"] = meta.get("reconciler.verbose", 0) + (value or 0)
    _configure_logging(meta["reconciler.verbose"])


def _set_no_color(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.find_root().meta["reconciler.no_color"] = True


def shared_options() -> list[click.Option]:
    return [
        click.Option(["-v", "--verbose"], count=True, expose_value=False, callback=_count_verbose,
                     help="Log decisions to stderr; -vv also logs every HTTP request. Works before or after "
                          "the command."),
        click.Option(["--no-color"], is_flag=True, expose_value=False, callback=_set_no_color,
                     help="Plain output without colour (also when NO_COLOR is set or output is not a terminal)."),
    ]


# Terraform's single-dash options, and what reconciler spells instead.
TERRAFORM_HABITS = {
    "json": "use --format json",
    "target": "use --target SYSTEM (or --target SYSTEM/KIND/NAME)",
    "var": "reconciler has no -var: credentials come from ${VAR} references in the policy",
    "var-file": "reconciler has no -var-file: credentials come from ${VAR} references in the policy",
    "input": "reconciler has no -input: apply asks only on a terminal; pass --auto-approve",
    "chdir": "use -d/--directory DIR",
    "destroy": "reconciler has no -destroy: remove the entries from the policy and apply",
}


class ReconcilerGroup(click.Group):
    """A group whose every command, registered now or later, accepts the shared options.

    Exit codes have one meaning each: a usage error (a typo'd option, a bad `--now`, an unknown command)
    exits 1 like every other error, never 2, which only `plan --detailed-exitcode` uses for "changes present".
    """

    group_class = type   # subgroups are ReconcilerGroups too

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        present = {opt for param in cmd.params for opt in getattr(param, "opts", [])}
        cmd.params.extend(option for option in shared_options() if not present & set(option.opts))
        super().add_command(cmd, name)

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            if parent is None:
                _refuse_single_dash(self, args)
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            exc.exit_code = int(ExitCode.ERROR)   # type: ignore[misc]  # click: 2; ours: 1 (see the docstring)
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            exc.exit_code = int(ExitCode.ERROR)   # type: ignore[misc]  # click: 2; ours: 1 (see the docstring)
            raise


def _long_options(command: click.Command) -> set[str]:
    names = {opt[2:] for param in command.params for opt in getattr(param, "opts", []) if opt.startswith("--")}
    for sub in getattr(command, "commands", {}).values():
        names |= _long_options(sub)
    return names


def _refuse_single_dash(group: click.Group, args: list[str]) -> None:
    """`-out plan.json`, `-auto-approve`, `-json`: Terraform's habits get a hint (`use --out`), not click's
    "No such option: -o" (or worse, `-d` taking "etailed-exitcode" as its value)."""
    known = _long_options(group)
    for arg in args:
        if arg == "--":
            return
        match = re.fullmatch(r"-([a-z][a-z0-9]*(?:-[a-z0-9]+)*)(=.*)?", arg)
        if match is None or len(match.group(1)) < 2 or set(match.group(1)) <= {"v"}:
            continue
        name = match.group(1)
        if name in known:
            raise click.UsageError(f"{arg.split('=', 1)[0]} is not an option: use --{name} "
                                   "(reconciler's options take two dashes)")
        if name in TERRAFORM_HABITS:
            raise click.UsageError(f"{arg.split('=', 1)[0]} is a Terraform option: {TERRAFORM_HABITS[name]}")


def _echo_policy_tests(session: run.Session) -> None:
    """The assertions' and rules' results under a markdown plan, for the pull request (`reconciler test` fails
    the check when one fails)."""
    from reconciler.assertions import markdown

    policy, results = run.test(session)
    click.echo(markdown(results, policy.rules), nl=False)


def _echo_plan(result: Plan, fmt: str) -> None:
    """A plan on stdout as `plan` and `show` print it: text (coloured on a terminal), json or markdown."""
    if fmt == "text":
        color = _color()
        render.write_text(result, lambda text: click.echo(colorize_plan(text, color), nl=False))
    elif fmt == "json":
        render.write_json(result, lambda text: click.echo(text, nl=False))
    else:
        click.echo(render.render_markdown(result), nl=False)


def _color() -> bool:
    ctx = click.get_current_context(silent=True)
    no_color = bool(ctx and ctx.find_root().meta.get("reconciler.no_color"))
    return color_wanted(no_color)


def policy_directory(func: Callable[..., None]) -> Callable[..., None]:
    """`[DIR]` and `-d/--directory DIR`, the same on every command that reads a policy; the command receives
    `directory`."""
    @functools.wraps(func)
    def wrapper(*args: Any, directory_arg: str | None, directory: str | None, **kwargs: Any) -> None:
        if directory_arg and directory and Path(directory_arg) != Path(directory):
            raise click.UsageError(f"two policy directories given: {directory_arg} and --directory {directory}")
        return func(*args, directory=directory_arg or directory or DEFAULT_DIRECTORY, **kwargs)

    wrapper = click.option("-d", "--directory", "directory", default=None, metavar="DIR",
                           help=f"The policy directory or file (default: {DEFAULT_DIRECTORY}); same as DIR.")(wrapper)
    return click.argument("directory_arg", metavar="[DIR]", required=False, default=None,
                          type=click.Path(file_okay=True))(wrapper)


target_option = click.option("--target", "targets", multiple=True, metavar="SYSTEM|ADDRESS",
                              help="Only this system (or SYSTEM/KIND/NAME and what it depends on); repeatable. "
                                   "What is read, planned, locked and applied; the plan says it is partial.")
lock_timeout_option = click.option("--lock-timeout", default="0", show_default=True, metavar="DURATION",
                                   help="Wait this long (30s, 5m) for another apply's lock; 0 refuses at once.")
_allow_host = click.option(
    "--allow-host", "allow_host", multiple=True, envvar="RECONCILER_ALLOW_HOSTS", metavar="HOST[:PORT]",
    help="A host a system's url may name besides sandbox, loopback and the vendor's production host "
         "(repeatable; RECONCILER_ALLOW_HOSTS: space-separated).")
TRUST_ENV_KEY = "reconciler.trust_env_proxy"


def _remember_trust_env(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta[TRUST_ENV_KEY] = True
    return value


_trust_env_proxy = click.option(
    "--trust-env-proxy", is_flag=True, envvar="RECONCILER_TRUST_ENV_PROXY", expose_value=False,
    callback=_remember_trust_env,
    help="Send vendor requests through the proxy and trust the CAs that HTTP(S)_PROXY, ALL_PROXY, NO_PROXY, "
         "SSL_CERT_FILE and SSL_CERT_DIR name (RECONCILER_TRUST_ENV_PROXY=1); by default they are ignored, so "
         "credentials go only to each system's own host.")


def allow_host_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """`--allow-host` and, beside it, `--trust-env-proxy`: where requests, and credentials, may go."""
    return _allow_host(_trust_env_proxy(func))


def _trust_env_options() -> dict[str, Any]:
    ctx = click.get_current_context(silent=True)
    return {"trust_env": True} if ctx is not None and ctx.meta.get(TRUST_ENV_KEY) else {}

directory_argument = policy_directory   # the name commands used before `-d/--directory` came


state_option = click.option("--state", envvar="RECONCILER_STATE", default=None, metavar="PATH",
                            help="State file (default: .reconciler/state.json for policies/, "
                                 ".reconciler/dirs/DIR/state.json for another DIR), or a shared state in PostgreSQL: "
                                 "postgresql://USER@HOST:PORT/DB[?schema=NAME] (password from PGPASSWORD); "
                                 "or RECONCILER_STATE.")
now_option = click.option("--now", default=None, metavar="ISO-8601",
                          help="Plan as of this time, e.g. 2026-11-22T10:00:00Z (default: now).")


@click.group(cls=ReconcilerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="reconciler", message="%(prog)s %(version)s")
def main() -> None:
    """Declare who may open which door, and when; plan and apply it on the vendors' systems."""


main.params.extend(shared_options())


@main.command()
@policy_directory
@click.option("--format", "fmt", type=click.Choice(["text", "github", "json"]), default="text", show_default=True,
              help="github: workflow-command annotations on the policy lines, for pull requests; json: "
                   "{valid, error_count, diagnostics: [{severity, file, line, column, message}]} for programs.")
@allow_host_option
def validate(directory: str, fmt: str, allow_host: tuple[str, ...]) -> None:
    """Check the policy without contacting any vendor."""
    def body() -> int:
        try:
            policy = run.validate(_session(directory, None, None, allow_host))
        except PolicyError as exc:
            if fmt == "json":
                return _validate_json([("error", d) for d in exc.diagnostics])
            if fmt != "github":
                raise
            for diagnostic in exc.diagnostics:
                click.echo(_annotation("error", diagnostic))
            click.echo(f"{len(exc.diagnostics)} problem(s) in the policy", err=True)
            return ExitCode.ERROR
        except ReconcilerError as exc:
            if fmt != "json":
                raise
            return _validate_json([("error", Diagnostic(Location(""), line)) for line in exc.lines()])
        if fmt == "json":
            return _validate_json([("warning", w) for w in policy.warnings])
        for warning in policy.warnings:
            click.echo(_annotation("warning", warning) if fmt == "github" else printable(f"warning: {warning}"),
                       err=fmt != "github")
        click.echo(f"The policy in {directory} is valid: {_count(len(policy.systems), 'system')}, "
                   f"{_count(len(policy.resources), 'resource')}.")
        return ExitCode.OK
    _run_command(body)


def _validate_json(found: list[tuple[str, Diagnostic]]) -> int:
    """`validate --format json` (Terraform's `validate -json`): one object on standard output; the exit code
    is 1 when there is any error. `file`, `line` and `column` are null where a problem has no place."""
    diagnostics = [{"severity": severity, "file": d.location.path or None, "line": d.location.line or None,
                    "column": (d.location.col or 1) if d.location.line else None, "message": d.message}
                   for severity, d in found]
    errors = sum(1 for severity, _ in found if severity == "error")
    click.echo(json.dumps({"valid": not errors, "error_count": errors, "warning_count": len(found) - errors,
                           "diagnostics": diagnostics}, indent=2, ensure_ascii=False))
    return ExitCode.ERROR if errors else ExitCode.OK


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _annotation(level: str, diagnostic: Diagnostic) -> str:
    """A GitHub Actions workflow command that puts the message on the policy line in the pull request."""
    where = diagnostic.location
    return (f"::{level} file={_escape_property(where.path)},line={where.line or 1},col={where.col or 1}"
            f"::{_escape_data(diagnostic.message)}")


def _escape_data(text: str) -> str:
    # GitHub's workflow-command encoding: a message cannot end the command or start another one.
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


@main.command()
@policy_directory
@click.option("--out", type=click.Path(dir_okay=False), help="Save the plan as JSON for `apply --plan`.")
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "json"]), default="text", show_default=True,
              help="text for people, markdown for a pull request comment, json for programs.")
@click.option("--detailed-exitcode", is_flag=True, help="Exit 2 when there are changes, 0 when none.")
@now_option
@state_option
@allow_host_option
@click.option("--revision", envvar="RECONCILER_REVISION", metavar="COMMIT[@TIME]",
              help="The policy's revision when the directory is not its git work tree (RECONCILER_REVISION).")
@target_option
def plan(directory: str, out: str | None, fmt: str, detailed_exitcode: bool, now: str | None,
         state: str | None, allow_host: tuple[str, ...], revision: str | None, targets: tuple[str, ...]) -> None:
    """Show what apply would change."""
    def body() -> int:
        session = _session(directory, state, now, allow_host)
        session.revision = revision
        session.targets = targets
        result = run.plan(_reading(session))
        # Written as it is rendered: a plan of 100,000 changes is never held as one string.
        if out:
            with open(out, "w", encoding="utf-8") as handle:
                render.write_json(result, handle.write)
        _echo_plan(result, fmt)
        if fmt == "markdown":
            _echo_policy_tests(session)
        if out and fmt == "text":
            click.echo(f"\nSaved the plan to {out}; run `reconciler apply --plan {out}` to apply exactly it.")
        # Something uncertain (a create that cannot be proven ours) is not "the system matches the policy".
        uncertain = any(dict(w.details).get("uncertain") for w in result.warnings)
        notice = run.revision_notice(session) if fmt == "text" else None
        if notice:
            click.echo(f"\nnote: {notice}", err=True)
        return ExitCode.CHANGES if detailed_exitcode and (result.has_changes or uncertain) else ExitCode.OK
    _run_command(body)


@main.command()
@policy_directory
@click.option("--plan", "plan_file", type=click.Path(exists=True, dir_okay=False),
              help="Apply exactly this saved plan; refused if the live state or policy changed.")
@click.option("--auto-approve", is_flag=True, help="Do not ask for confirmation (typing yes).")
@click.option("--allow-mass-revoke", is_flag=True,
              help="Apply even what a mass-revoke guard stops (or acknowledge it in the policy).")
@now_option
@state_option
@allow_host_option
@lock_timeout_option
@click.option("--revision", envvar="RECONCILER_REVISION", metavar="COMMIT[@TIME]",
              help="The policy's revision when the directory is not its git work tree (RECONCILER_REVISION).")
@click.option("--allow-older-revision", is_flag=True,
              help="Apply even a revision older than the one applied last (a deliberate revert).")
@target_option
@click.option("--wait", "wait", is_flag=False, flag_value=DEFAULT_WAIT_TEXT, default=None, metavar="[DURATION]",
              help=f"After applying, read the systems until every change is in force on the lock, at most DURATION "
                   f"(30s, 2m; bare --wait: {DEFAULT_WAIT_TEXT}); exit 1 naming what is not.")
def apply(directory: str, plan_file: str | None, auto_approve: bool, allow_mass_revoke: bool,
          now: str | None, state: str | None, allow_host: tuple[str, ...], lock_timeout: str,
          revision: str | None, allow_older_revision: bool, targets: tuple[str, ...], wait: str | None) -> None:
    """Make the live systems match the policy."""
    def body() -> int:
        wait_seconds = _parse_duration(wait) if wait is not None else None
        saved = _read_plan(plan_file) if plan_file else None
        color = _color()

        def show(result: Plan) -> None:
            render.write_text(result, lambda text: click.echo(colorize_plan(text, color), nl=False))

        with StopSignal(terminal=is_terminal(), color=color) as stopping:
            def approve(result: Plan) -> bool:
                if not auto_approve and not _ask_yes():
                    return False
                stopping.arm(len(result.changes))   # from here on, Ctrl-C stops sending, honestly
                return True

            session = _session(directory, state, now, allow_host, lock_timeout)
            session.revision = revision
            session.targets = targets
            result, report = run.apply(_reading(session), allow_older_revision=allow_older_revision,
                                       saved=saved, approve=approve, allow_mass_revoke=allow_mass_revoke,
                                       on_plan=show, on_change=stopping.on_change, stop=stopping.stop)
        uncertain = [w for w in result.warnings if dict(w.details).get("uncertain")]
        if report is None:
            if result.has_changes:
                click.echo("\nApply cancelled: nothing was sent.")
            if uncertain:
                raise ApplyFailedError(f"apply incomplete: {len(uncertain)} uncertain (see the warnings above); "
                                       "resolve them as each says, then run apply again",
                                       [f"remains: {n.address}: {n.message}" for n in uncertain])
            # Declined: Terraform exits 1 too; a script must not take "not applied" for "applied".
            if result.has_changes:
                return ExitCode.ERROR
            # Nothing to apply: --wait still waits for what an earlier apply left pending (a key in `creating`).
            return _wait_in_force(session, result, None, wait_seconds) if wait_seconds is not None else ExitCode.OK
        if report.internal:
            change, error = report.internal[0]
            if os.environ.get("RECONCILER_DEBUG"):
                raise error     # with its traceback, from the worker that hit it
            raise InternalError(change.address, error, [f"not applied: {line}" for line in report.remaining()])
        if not report.ok or uncertain:
            raise ApplyFailedError(f"apply incomplete: {report.summary()}",
                                   [f"not applied: {line}" for line in report.remaining()]
                                   + [f"remains: {n.address}: {n.message}" for n in uncertain])
        click.echo(f"\nApply complete: {report.summary()}; {stopping.progress_closing()}.")
        for line in report.exposures():
            click.echo(f"  ⧗ {printable(line)}")
        return _wait_in_force(session, result, report, wait_seconds) if wait_seconds is not None else ExitCode.OK
    _run_command(body)


def _wait_in_force(session: run.Session, result: Plan, report: ApplyReport | None, seconds: float) -> int:
    """`apply --wait`: poll until every applied change is in force (`run.wait_in_force`); print, per system and
    vendor, how long it took, and exit 1 naming what is not in force. Unknown is said, never taken as in force."""
    click.echo(f"\nWaiting up to {seconds:g} s until the vendors have put the changes in force ...")
    outcome, vendors = run.wait_in_force(session, result, report, seconds)
    if not (outcome.watched or outcome.at_once or outcome.unknown):
        click.echo("Nothing to wait for.")
        return ExitCode.OK
    for line in outcome.per_system(vendors):
        click.echo(f"  {printable(line)}")
    for _, address, basis in outcome.unknown:
        click.echo(f"  not known to be in force: {printable(address)}: {printable(basis)}")
    missing = outcome.missing()
    if outcome.interrupted:
        raise ApplyFailedError(f"wait interrupted after {outcome.waited:.1f} s: {len(missing)} change(s) not known "
                               "to be in force (the apply itself is complete)",
                               [f"not in force: {printable(line)}" for line in missing])
    if missing:
        raise ApplyFailedError(f"not in force: {len(missing)} of {len(outcome.watched)} change(s) the vendors had "
                               f"to carry out, after waiting {outcome.waited:.1f} s (the apply itself is complete)",
                               [f"not in force: {printable(line)}" for line in missing])
    click.echo("In force: every change the vendors had to carry out"
               + (f"; {len(outcome.unknown)} not known (listed above)" if outcome.unknown else "") + ".")
    return ExitCode.OK


class StopSignal:
    """Ctrl-C during an apply, as a context manager around it.

    Until `arm` (the plan is approved) Ctrl-C is the usual KeyboardInterrupt: nothing was sent. Once armed, the
    first Ctrl-C sets `stop` (the applier sends nothing new; what is in flight finishes and is journaled) and
    says so; a second exits at once, saying how many changes were applied. `arm` also starts the progress
    display, which `on_change` feeds from the applier's workers. On leaving, the previous handler is restored,
    except after a stop: then Ctrl-C is ignored so that a late one cannot cut the report short.
    """

    def __init__(self, *, terminal: bool, color: bool, hard_exit: Callable[[int], Any] = os._exit) -> None:
        self.stop = threading.Event()
        self.applied = 0
        self.progress: ApplyProgress | None = None
        self._terminal = terminal
        self._color = color
        self._exit = hard_exit
        self._lock = threading.Lock()
        self._stack = contextlib.ExitStack()
        self._previous: Any = None

    def __enter__(self) -> Self:
        self._previous = signal.getsignal(signal.SIGINT)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN if self.stop.is_set() else self._previous)
        self._stack.close()

    def arm(self, total: int) -> None:
        signal.signal(signal.SIGINT, self.interrupt)
        self.progress = self._stack.enter_context(ApplyProgress(total, terminal=self._terminal, color=self._color))

    def interrupt(self, signum: int, frame: Any) -> None:
        if not self.stop.is_set():
            self.stop.set()
            click.echo("\nInterrupted: sending nothing new; waiting for the requests in flight (at most "
                       "the request timeout) to journal them. Ctrl-C again exits at once.", err=True)
            return
        with self._lock:
            click.echo(f"\nInterrupted again: exiting now. {self.applied} changes were applied and "
                       "journaled (listed above); what was in flight is uncertain and the next apply looks "
                       "it up before sending anything; nothing else was sent. Run apply again to finish.",
                       err=True)
            sys.stdout.flush()
            sys.stderr.flush()
            self._exit(int(ExitCode.ERROR))   # worker threads still waiting on the network are abandoned

    def on_change(self, change: Change, error: str | None) -> None:
        with self._lock:
            if not error:
                self.applied += 1
        if self.progress is not None:
            self.progress.on_change(change.address, change.action, error)

    def progress_closing(self) -> str:
        assert self.progress is not None, "the apply was approved, so its progress was shown"
        return self.progress.closing()


def _reading(session: run.Session) -> run.Session:
    """The session with a reading-progress line on a terminal (it ends when every system is read)."""
    session.on_read = ReadProgress(terminal=is_terminal(sys.stderr), color=_color()).on_read
    return session


def _stdin_is_terminal() -> bool:
    return is_terminal(sys.stdin)


def _ask_yes() -> bool:
    """Terraform's confirmation: only the word `yes` applies; no terminal to ask on is a refusal."""
    if not _stdin_is_terminal():
        raise RefusedError("refused: no terminal to ask for approval; pass --auto-approve")
    click.echo("\nDo you want to perform these actions?\n  Only 'yes' will be accepted to approve.\n")
    answer = click.prompt("  Enter a value", default="", show_default=False, prompt_suffix=": ")
    return answer.strip() == "yes"


def _read_plan(path: str) -> dict[str, Any]:
    """A saved plan, refused before anything is read or sent when it is not one or was edited by hand."""
    return run.load_saved(Path(path))


def _parse_at(value: str | None) -> datetime | None:
    """`--at`, keeping its offset: weekly schedules are read in the time zone it is given in."""
    if value is None:
        return None
    if " " in value.strip():     # an IANA zone after the time: "2026-12-07T08:30:00 Europe/Oslo"
        from reconciler.policy.proofs import at_in_zone

        try:
            return at_in_zone(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 date-time (e.g. 2026-11-22T10:00:00Z)") from None
    if moment.tzinfo is None:
        raise click.BadParameter(f"{value!r} needs a timezone, e.g. {value}Z")
    return moment


@main.command()
@click.argument("plan_file", metavar="PLAN.json", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "json"]), default="text", show_default=True,
              help="text for people, markdown for a pull request comment, json for programs.")
def show(plan_file: str, fmt: str) -> None:
    """Show a saved plan (`plan --out`) as `plan` showed it, without reading any system.

    A plan edited by hand is refused, as `apply --plan` refuses it.
    """
    def body() -> int:
        _echo_plan(cast("Plan", run.SavedPlan(run.load_saved(Path(plan_file)))), fmt)
        return ExitCode.OK
    _run_command(body)


@main.command()
@directory_argument
@click.option("--user", default=None, help="Only this user (policy name, or id:… for an account not in it).")
@click.option("--device", default=None, help="Only this device.")
@click.option("--at", "at", default=None,
              help="Only what is open at this ISO 8601 time, with an offset or an IANA zone after it "
                   "('2026-12-07T08:30:00 Europe/Oslo'); weekly schedules are read in each site's zone.")
@click.option("--live", is_flag=True, help="Read the live systems instead of the policy.")
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "csv", "json"]), default="text",
              show_default=True, help="text or markdown for people, csv for a spreadsheet, json for programs.")
@state_option
def access(directory: str, user: str | None, device: str | None, at: str | None, live: bool, fmt: str,
           state: str | None) -> None:
    """Who can open what, and when: from the policy, or from the live systems with --live."""
    def body() -> int:
        moment = _parse_at(at)
        rows, admins = run.access(_session(directory, state, None), user=user, device=device, at=moment,
                                  live=live)
        heading = " ".join(part for part in (
            "Live access" if live else "Access in the policy", f"of {user}" if user else "",
            f"to {device}" if device else "", f"open at {at}" if at else "") if part)
        if moment is not None:
            zones = run.site_zones(_session(directory, state, None))
            if set(zones.values()) - {"UTC"}:    # a site with its own zone: say in which each is read
                heading += " (weekly schedules in each site's time zone: " + ", ".join(
                    f"{name} {zone}" for name, zone in zones.items()) + ")"
        click.echo(render.render_access(rows, admins, fmt, heading=heading), nl=False)
        return ExitCode.OK
    _run_command(body)


@main.command("test")
@policy_directory
@click.option("--live", is_flag=True, help="Evaluate the assertions against what the systems hold.")
@click.option("--junit-xml", "junit_xml", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Also write the results as JUnit XML, for CI.")
@state_option
@allow_host_option
def test_command(directory: str, live: bool, junit_xml: str | None, state: str | None,
                 allow_host: tuple[str, ...]) -> None:
    """Check the policy's assertions and rules, without contacting any vendor (unless --live).

    Each assertion is printed with its file:line; exit 1 when any fails (a broken rule is an error at the
    violating entry and at the rule)."""
    def body() -> int:
        policy, results = run.test(_session(directory, state, None, allow_host), live=live)
        for result in results:
            status = "PASS" if result.passed else "FAIL"
            click.echo(printable(f"{status} {result.source}: {result.assertion.title}: {result.detail}"))
        failed = sum(1 for r in results if not r.passed)
        if junit_xml:
            from reconciler.assertions import junit_xml as to_junit

            Path(junit_xml).write_text(to_junit(results, policy.rules), encoding="utf-8")
        click.echo(f"{_count(len(results), 'assertion')}: {len(results) - failed} passed, {failed} failed; "
                   f"{_count(len(policy.rules), 'rule')} hold.")
        return ExitCode.ERROR if failed else ExitCode.OK
    _run_command(body)


@main.command()
@click.argument("system")
@click.argument("device")
@click.option("-d", "--directory", "directory", default=DEFAULT_DIRECTORY, show_default=True, metavar="DIR",
              help="The policy directory or file.")
@state_option
@allow_host_option
def events(system: str, device: str, directory: str, state: str | None, allow_host: tuple[str, ...]) -> None:
    """Show the audit trail of a device: when, what, who."""
    def body() -> int:
        rows = run.events(_session(directory, state, None, allow_host), system, device)
        if not rows:
            click.echo(f"No events for {system}/{device}.")
            return ExitCode.OK
        # Vendor text: each field escaped (control characters, a leading `::`) before it is aligned.
        rows = [type(r)(*(printable(str(v)) for v in (r.time, r.action, r.person, r.detail))) for r in rows]
        widths = [max(len(getattr(r, f)) for r in rows) for f in ("time", "action", "person")]
        header = ("time", "action", "person")
        widths = [max(w, len(h)) for w, h in zip(widths, header, strict=False)]
        click.echo("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False)) + "  detail")
        for r in rows:
            click.echo("  ".join(v.ljust(w) for v, w in zip((r.time, r.action, r.person), widths, strict=False)) + f"  {r.detail}")
        return ExitCode.OK
    _run_command(body)


@main.command()
@click.argument("system")
@click.option("-d", "--directory", "directory", default=DEFAULT_DIRECTORY, show_default=True, metavar="DIR",
              help="The policy directory or file.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="File to write (default: DIRECTORY/SYSTEM.exported.yaml); - for standard output.")
@click.option("--force", is_flag=True, help="Overwrite the file if it exists.")
@state_option
@allow_host_option
def export(system: str, directory: str, out: str | None, force: bool, state: str | None,
           allow_host: tuple[str, ...]) -> None:
    """Write policy YAML that adopts what a live system holds."""
    from reconciler.export import export_system, write_export

    def body() -> int:
        text = export_system(_session(directory, state, None, allow_host), system)
        if out == "-":
            click.echo(text, nl=False)
            return ExitCode.OK
        path = Path(out) if out else Path(directory) / f"{system}.exported.yaml"
        write_export(text, path, force=force)
        click.echo(f"Wrote {path}. Review the names; `reconciler plan` should now show no changes for {system}.")
        return ExitCode.OK
    _run_command(body)


@main.group(name="state")
def state_group() -> None:
    """Look after the state: forget a record, move it between a local file and PostgreSQL."""


@state_group.command()
@click.argument("address")
@click.option("-d", "--directory", "directory", default=DEFAULT_DIRECTORY, show_default=True, metavar="DIR",
              help="The policy directory whose state this is (when --state is not given).")
@state_option
def forget(address: str, directory: str, state: str | None) -> None:
    """Drop the state's record of ADDRESS (e.g. hq/user/alice) after checking the vendor by hand."""
    def body() -> int:
        record = run.forget(_session(directory, state, None), address)
        what = "an unsettled create" if record.get("intent") else "its record"
        click.echo(f"Forgot {what} for {address}; the next plan treats it as never created.")
        return ExitCode.OK
    _run_command(body)


@state_group.command("push")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace a database state that already holds records.")
@click.option("--target", "targets", multiple=True, metavar="SYSTEM",
              help="Move only this system's records (repeatable), under its own lock; the others stay as they are.")
@state_option
@lock_timeout_option
def state_push(file: str, force: bool, targets: tuple[str, ...], state: str | None, lock_timeout: str) -> None:
    """Copy a local state file into the PostgreSQL state named by --state."""
    def body() -> int:
        session = _session(".", state, None, lock_timeout=lock_timeout)
        count = run.push_state(session, Path(file), force=force, targets=targets)
        click.echo(f"Pushed {count} records from {file} to the shared state"
                   + (f" (systems {', '.join(printable(t) for t in sorted(set(targets)))})." if targets else "."))
        return ExitCode.OK
    _run_command(body)


def _emit(text: str, out: str | None) -> int:
    """Write `text` to the file `out`, saying so on stderr, or to standard output."""
    if out:
        Path(out).write_text(text, encoding="utf-8")
        click.echo(f"Wrote {out}.", err=True)
    else:
        click.echo(text, nl=False)
    return ExitCode.OK


@state_group.command("unlock")
@click.argument("lock_id")
@state_option
def state_unlock(lock_id: str, state: str | None) -> None:
    """Break lock LOCK_ID (a system's name, or * for the whole state) of the PostgreSQL state, whose holder
    is stuck: its database session is ended. The id is in the message of a refused or waiting apply."""
    def body() -> int:
        holder = run.unlock_state(_session(".", state, None), lock_id)
        click.echo(f"Broke lock {printable(lock_id)}, held by {holder}.")
        return ExitCode.OK
    _run_command(body)


@state_group.command("pull")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the state file here instead of standard output.")
@click.option("--target", "targets", multiple=True, metavar="SYSTEM",
              help="Only this system's records (repeatable).")
@state_option
def state_pull(out: str | None, targets: tuple[str, ...], state: str | None) -> None:
    """Print the state (in the local file's format) of the store named by --state."""
    def body() -> int:
        pulled = run.pull_state(_session(".", state, None), targets)
        return _emit(json.dumps(pulled, indent=1, sort_keys=True) + "\n", out)
    _run_command(body)


@main.command()
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Write the schema to this file instead of standard output.")
def schema(out: str | None) -> None:
    """Print the JSON Schema (draft 2020-12) of one policy file, for editors.

    For VS Code's YAML extension (yaml-language-server): `reconciler schema --out policy.schema.json`, then start
    each policy file with `# yaml-language-server: $schema=policy.schema.json` (a path relative to the file).
    """
    def body() -> int:
        return _emit(json.dumps(run.schema(), indent=2, ensure_ascii=False) + "\n", out)
    _run_command(body)


@main.group()
def sandbox() -> None:
    """The embedded vendor simulators."""


@sandbox.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback only).")
@click.option("--port", default=8700, show_default=True, type=int, help="TCP port to listen on.")
@click.option("--dir", "store", default=str(DATA_DIR / "sandbox" / "served"), show_default=True, metavar="DIR",
              help="Where the simulators keep their data.")
@click.option("--rate-limit", type=int, default=None, help="Requests per second before 429.")
@click.option("--now", default=None, metavar="ISO-8601",
              help="Start the simulators' clock at this ISO 8601 time (default: the machine's clock).")
@click.option("-d", "--directory", "directory", default=DEFAULT_DIRECTORY, show_default=True, metavar="DIR",
              help="The policy whose ${VAR} names the printed credentials use (when it exists).")
def serve(host: str, port: int, store: str, rate_limit: int | None, now: str | None, directory: str) -> None:
    """Serve the vendor simulators over HTTP on this machine."""
    from reconciler.providers.factory import sandbox_mounts
    from reconciler.providers.factory import serve as serve_http

    start = _parse_now(now)

    def body() -> int:
        clock = run.running_clock(start) if start is not None else None
        mounts, credentials = sandbox_mounts(Path(store), rate_limit=rate_limit, clock=clock)
        names = _credential_variables(Path(directory))

        def announce(base: str) -> None:
            # Printed once the socket is bound: with --port 0 the URLs name the port the system chose.
            click.echo(f"Serving vendor sandboxes on {base} (Ctrl-C to stop):")
            for prefix in mounts:
                click.echo(f"  {prefix[1:]}: url {base}{prefix}")
            click.echo("Sandbox credentials (test values of the simulators, not secrets):")
            for vendor, values in credentials.items():
                for key, value in sorted(values.items()):
                    variable = names.get((vendor, key)) or conventional_variable(vendor, key)
                    click.echo(f"  export {variable}={value}")
            click.echo("Ready.")

        serve_http(host, port, mounts, on_bound=announce)
        return ExitCode.OK
    _run_command(body)


def conventional_variable(vendor: str, key: str) -> str:
    """The variable the documented policies name for a credential (the vendor declares it), for vendors
    the policy does not use."""
    from reconciler import vendors

    declared = vendors.get(vendor)
    return declared.credential_variable(key) if declared is not None else f"{vendor}_{key}".upper().replace("-", "_")


_REFERENCE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


def _credential_variables(directory: Path) -> dict[tuple[str, str], str]:
    """(vendor, credential key) → the variable the policy in `directory` names for it, so that the printed
    `export` lines are exactly what that policy reads. Unreadable files are skipped: this only names things."""
    from reconciler.policy.yamlio import read_documents

    if not directory.exists():
        return {}
    names: dict[tuple[str, str], str] = {}
    documents, _ = read_documents(directory)
    for document in documents:
        systems = document.root.get("systems") if isinstance(document.root, dict) else None
        for system in (systems or {}).values() if isinstance(systems, dict) else []:
            if not isinstance(system, dict) or not isinstance(system.get("credentials"), dict):
                continue
            for key, value in system["credentials"].items():
                match = _REFERENCE.match(value) if isinstance(value, str) else None
                if match:
                    names.setdefault((str(system.get("vendor")), str(key)), match.group(1))
    return names

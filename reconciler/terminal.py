"""How the CLI talks to a person: colour on a terminal, plain lines elsewhere, a live count during apply.

Called only by `cli.py`. Colour follows Terraform's habit (`+` green, `-` red, `~` yellow, `-/+` both) and is
on only when standard output is a terminal, `--no-color` is not given and `NO_COLOR` is unset or empty
(https://no-color.org). The live progress line is click's progress bar (count, percent, rate, elapsed, ETA),
drawn only on a terminal; elsewhere progress degrades to plain lines a CI log keeps. (rich draws nicer bars,
but with rich installed every `import httpx` also loads rich and pygments, about a hundred modules, which
every command would pay at start-up.)
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Mapping
from typing import IO, Any, Self

import click

from reconciler.text import printable

# A change line of the text plan: indentation, the action symbol, the address.
_CHANGE_LINE = re.compile(r"^(?P<indent>\s*)(?P<symbol>-/\+|\+|-|~)(?P<rest> .*)$")
_SYMBOL_STYLE: dict[str, str] = {"+": "green", "-": "red", "~": "yellow"}
# How often, at most, a plain progress line is written when output is not a terminal.
PLAIN_PROGRESS_EVERY = 10.0


def is_terminal(stream: IO[str] | None = None) -> bool:
    stream = stream or sys.stdout
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def color_wanted(no_color: bool, env: Mapping[str, str] | None = None, stream: IO[str] | None = None) -> bool:
    env = os.environ if env is None else env
    return not no_color and not env.get("NO_COLOR") and is_terminal(stream)


def colorize_plan(text: str, color: bool) -> str:
    """The text plan with its change lines coloured by action; unchanged when colour is off."""
    if not color:
        return text
    out = []
    for line in text.splitlines(keepends=True):
        match = _CHANGE_LINE.match(line.rstrip("\n"))
        if match:
            symbol = match["symbol"]
            styled = (click.style("-", fg="red") + click.style("/+", fg="green") if symbol == "-/+"
                      else click.style(symbol, fg=_SYMBOL_STYLE[symbol]))
            line = f"{match['indent']}{styled}{match['rest']}" + ("\n" if line.endswith("\n") else "")
        out.append(line)
    return "".join(out)


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ApplyProgress:
    """Counts finished changes out of `total` and shows done/total, rate, elapsed and ETA.

    On a terminal: one live line (click's progress bar) that redraws in place; failures are listed when the
    apply ends. Elsewhere: one plain line per change (`[12/120] hq/user/alice: create done`) and, at most every
    ten seconds, a line with the count, rate, elapsed time and ETA. `on_change` is called from the applier's
    worker threads.
    """

    def __init__(self, total: int, *, terminal: bool, color: bool) -> None:
        self.total = total
        self.done = 0
        self.failed = 0
        self.started = time.monotonic()
        self._last_line = self.started
        self._lock = threading.Lock()
        self._bar: Any = None
        if terminal and total:
            fill = click.style("#", fg="green") if color else "#"
            self._bar = click.progressbar(length=total, label="Applying", show_pos=True, show_percent=True,
                                          show_eta=True, fill_char=fill, empty_char="-", width=30,
                                          item_show_func=lambda _: self._rate_and_elapsed(),
                                          file=sys.stdout, color=color)

    def __enter__(self) -> Self:
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def _rate_and_elapsed(self) -> str:
        return f"{self.rate():.1f}/s, elapsed {duration(time.monotonic() - self.started)}"

    def status(self) -> str:
        rate = self.rate()
        eta = duration((self.total - self.done) / rate) if rate > 0 else "?"
        percent = 100 * self.done // self.total if self.total else 100
        return f"{self.done}/{self.total} changes ({percent}%), {self._rate_and_elapsed()}, ETA {eta}"

    def on_change(self, address: str, action: str, error: str | None) -> None:
        with self._lock:
            self.done += 1
            if error:
                self.failed += 1
            if self._bar is not None:
                self._bar.update(1, address)
                return
            line = printable(f"{address}: failed: {error}" if error else f"{address}: {action} done")
            width = len(str(self.total))
            click.echo(f"[{self.done:>{width}}/{self.total}] {line}", err=bool(error))
            now = time.monotonic()
            if now - self._last_line >= PLAIN_PROGRESS_EVERY and self.done < self.total:
                self._last_line = now
                click.echo(f"progress: {self.status()}")

    def closing(self) -> str:
        """The one-line summary after the apply: how many, how fast, how long."""
        elapsed = time.monotonic() - self.started
        failed = f", {self.failed} failed" if self.failed else ""
        return f"{self.done} of {self.total} changes finished{failed} in {duration(elapsed)} ({self.rate():.1f}/s)"


class ReadProgress:
    """While the live state is read: on a terminal (standard error, so that `plan --format json` stays clean),
    one line counting the systems read, with objects and elapsed time; elsewhere nothing, so CI logs and
    piped output stay as they are. `on_read` (the session's callback) is called from the reading threads."""

    def __init__(self, *, terminal: bool, color: bool) -> None:
        self.started = time.monotonic()
        self.objects = 0
        self.done = 0
        self._terminal = terminal
        self._color = color
        self._lock = threading.Lock()
        self._bar: Any = None
        self._last = ""

    def _detail(self) -> str:
        return f"{self._last}{self.objects} objects, elapsed {duration(time.monotonic() - self.started)}"

    def on_read(self, system: str | None, objects: int, systems: int) -> None:
        with self._lock:
            if system is None:
                if self._terminal and systems and self._bar is None:
                    fill = click.style("#", fg="cyan") if self._color else "#"
                    self._bar = click.progressbar(length=systems, label="Reading live state", show_pos=True,
                                                  show_percent=False, show_eta=False, fill_char=fill,
                                                  empty_char="-", width=20, item_show_func=lambda _: self._detail(),
                                                  file=sys.stderr, color=self._color)
                    self._bar.__enter__()
                    self._bar.render_progress()
                return
            self.objects += objects
            self.done += 1
            self._last = f"{system} done; "
            if self._bar is not None:
                self._bar.update(1, system)
                if self.done >= systems:
                    self._bar.__exit__(None, None, None)
                    self._bar = None

"""Untrusted text made safe to print on one line: policy file names, names, emails, reasons, vendor answers.

Used by `policy.bounds` (file names), `render` (plans) and `cli` (every error line), so that no value can add a
line to a log, move the cursor, reorder text (bidi controls) or start a GitHub workflow command.
"""

from __future__ import annotations

import logging
import unicodedata

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """`text` with control, format and line-separator characters shown as escapes (`\\n`, `\\x1b`, `\\u202e`),
    and a leading `::` (which would start a GitHub workflow command at the start of a line) as `\\x3a:`."""
    if text.isprintable():
        return _no_command(text)
    return _no_command(_escaped(text))


def _no_command(text: str) -> str:
    return "\\x3a" + text[1:] if text.startswith("::") else text


def _escaped(text: str) -> str:
    out = []
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(_NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"))
        else:
            out.append(char)
    return "".join(out)


class EscapingFormatter(logging.Formatter):
    """Log lines with vendor and policy text escaped: one record, one line, no terminal control, no workflow
    command (the message and any exception text alike)."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))

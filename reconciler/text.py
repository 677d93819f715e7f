"""Untrusted text made safe to print on one line: policy file names, names, emails, reasons, vendor answers.

Used by `policy.bounds` (file names), `render` (plans) and `cli` (every error line), so that no value can add a
line to a log, move the cursor, reorder text (bidi controls) or start a GitHub workflow command.
"""

from __future__ import annotations

import unicodedata

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """`text` with control, format and line-separator characters shown as escapes (`\\n`, `\\x1b`, `\\u202e`)."""
    if text.isprintable():
        return text
    out = []
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(_NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"))
        else:
            out.append(char)
    return "".join(out)

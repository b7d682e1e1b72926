"""Text output is data: the one escaping rule for names that come from files, folders or
checkpoints, and the one JSON encoder (never NaN/Infinity, which JSON does not have)."""

from __future__ import annotations

import json
import math
import unicodedata
from typing import Any

_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def escape(text: Any) -> str:
    """Control characters (tab, newline, terminal escape codes, bidi overrides, line separators)
    written as backslash escapes, so a file or class name can neither forge an output line or
    field nor drive the terminal. Everything else, including non-ASCII letters, is unchanged."""
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for char in text:
        if char in _SHORT:
            out.append(_SHORT[char])
        elif unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs"):
            code = ord(char)
            out.append(
                f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
            )
        else:
            out.append(char)
    return "".join(out)


def finite_or_none(value: Any) -> Any:
    """NaN and ±inf become None (JSON null), recursively through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


def to_json(value: Any) -> str:
    """One line of strict JSON: a non-finite number is null, never the invalid `NaN`."""
    return json.dumps(finite_or_none(value), allow_nan=False)

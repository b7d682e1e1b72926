"""Error types that the CLI turns into one line and an exit code.

ConfigError (exit 2) is a mistake in the YAML or the overrides; TrainkitError (exit 1) is a
runtime failure: a missing file, a bad checkpoint, an unreadable image.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TrainkitError(Exception):
    """A runtime failure reported as one line, exit code 1."""

    exit_code = 1


class ConfigError(TrainkitError):
    """A config or usage mistake, exit code 2. `path` is the dotted key, e.g. 'optim.lr'."""

    exit_code = 2

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


def unknown_choice(kind: str, value: str, choices: Iterable[str]) -> str:
    """`unknown 'lenett'; did you mean 'lenet'? choices: alexnet, lenet, mlp`"""
    choices = sorted(choices)
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ";"
    shown = ", ".join(choices) if len(choices) <= 40 else ", ".join(choices[:40]) + ", …"
    return f"unknown {kind} '{value}'{hint} choices: {shown}"


class NonFiniteLoss(TrainkitError):
    """A NaN/inf loss or weights (train.on_nonfinite), or a run in which no step was taken."""


class RunLocked(TrainkitError):
    """Another process holds the run directory's lock."""


class Interrupted(Exception):
    """A run stopped on request (SIGINT/SIGTERM) at a step boundary, its checkpoint saved.

    Not an error: the CLI prints the message as is and exits 128 + signal number."""

    def __init__(self, signum: int, message: str | None = None):
        import signal

        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")

"""Dependency floors set by security advisories, and the guard that enforces torch's at run time.

pyproject.toml pins the same floors at install time; environments drift after install, so every
checkpoint or weights file is read only after `require_safe_torch()` (called by
`checkpoint.torch_load`, the one loader). This module imports nothing heavy: `trainkit --version`
reads installed versions from package metadata.
"""

from __future__ import annotations

import re
from importlib import metadata

from trainkit.errors import TrainkitError

# distribution name → (display name, floor, why). Keep in step with pyproject.toml.
FLOORS: dict[str, tuple[str, tuple[int, ...], str]] = {
    "torch": (
        "torch",
        (2, 10),
        "CVE-2026-24747 (GHSA-63cw-57p8-fm3p): torch.load(weights_only=True) can corrupt memory "
        "and run code from a crafted checkpoint",
    ),
    "torchvision": ("torchvision", (0, 25), "the release paired with torch 2.10"),
    "pillow": (
        "Pillow",
        (13, 0),
        "GHSA-8g5g-8vmr-9782 and GHSA-5x8w-8jj5-q52h: heap buffer overflow in the JPEG decoder "
        "on a crafted image",
    ),
}


def parse_version(text: str) -> tuple[int, ...]:
    """'2.10.0+cu130' → (2, 10, 0); '2.11.0a0+git' → (2, 11, 0). Unparsable → ()."""
    match = re.match(r"\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(text))
    if not match:
        return ()
    return tuple(int(part) for part in match.groups() if part is not None)


def installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def below_floor(distribution: str, version: str) -> bool:
    floor = FLOORS[distribution][1]
    parsed = parse_version(version)
    return not parsed or parsed < floor


def _floor_text(distribution: str) -> str:
    return ".".join(str(part) for part in FLOORS[distribution][1])


def require_safe_torch() -> None:
    """Refuse (exit 1) to read any checkpoint or weights file with a torch whose weights-only
    unpickler has a known code-execution advisory."""
    import torch

    version = str(torch.__version__)
    if below_floor("torch", version):
        _, _, why = FLOORS["torch"]
        raise TrainkitError(
            f"refusing to load weights with torch {version}: below {_floor_text('torch')}, {why}; "
            f"upgrade with: pip install 'torch>={_floor_text('torch')}'"
        )


def version_lines(trainkit_version: str) -> list[str]:
    """`trainkit --version`: one line per package, flagged when below its floor."""
    lines = [f"trainkit {trainkit_version}"]
    for distribution, (shown, _, why) in FLOORS.items():
        version = installed_version(distribution)
        if version is None:
            lines.append(f"{shown} not installed")
        elif below_floor(distribution, version):
            lines.append(f"{shown} {version}  BELOW THE FLOOR {_floor_text(distribution)}: {why}; upgrade it")
        else:
            lines.append(f"{shown} {version}")
    return lines

"""The source tree as shipped: nothing the package needs may be hidden from git."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / ".git").exists() or shutil.which("git") is None, reason="not a git checkout")
def test_no_source_file_is_git_ignored():
    # A bare `data/` rule once ignored trainkit/data/, so a clean clone could not import it.
    sources = [
        str(path.relative_to(ROOT))
        for folder in ("trainkit", "tests", "configs", "benchmarks")
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    ]
    assert any(name.startswith("trainkit/data/") for name in sources)
    result = subprocess.run(
        ["git", "check-ignore", "--no-index", *sources], cwd=ROOT, capture_output=True, text=True
    )
    assert result.stdout.split() == [], f"git ignores: {result.stdout.split()}"

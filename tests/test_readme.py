"""The README's commands work as typed: its shell blocks are read and the cheap commands run
(a `trainkit train` line is checked as `trainkit config` with the same config and overrides:
the file exists and every override is a valid key; training itself is left to other tests)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def shell_lines(text: str = README) -> list[str]:
    """Lines of the README's indented code blocks, comments stripped, continuations joined."""
    lines, previous_blank, in_block = [], True, False
    for raw in text.splitlines():
        if raw.startswith("    ") and (in_block or previous_blank):
            in_block = True
            lines.append(raw[4:])
        elif raw.strip():
            in_block = False
        previous_blank = not raw.strip()
    joined, pending = [], ""
    for line in lines:
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    return [line for line in joined if line]


def trainkit_commands() -> list[list[str]]:
    """Every `trainkit …` invocation (also under torchrun -m / srun) as argv after `trainkit`."""
    found = []
    for line in shell_lines():
        try:
            words = shlex.split(line)
        except ValueError:  # printed output shown in a block (an apostrophe), not a command
            assert not re.match(r"(\S+/)?trainkit\b|.*-m trainkit\b", line), line
            continue
        for i, word in enumerate(words):
            if word == "trainkit" and (i == 0 or words[i - 1] in ("-m", "srun")):
                found.append(words[i + 1 :])
                break
    return found


def test_set_up_block_activates_before_bare_trainkit():
    lines = shell_lines(README[README.index("## Set up") :])
    activate = lines.index("source .venv/bin/activate")
    first_bare = next(i for i, line in enumerate(lines) if line.startswith("trainkit "))
    assert activate < first_bare
    assert 'pip install -e ".[dev]"' in lines
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in lines


TRAIN_LINES = [c for c in trainkit_commands() if c[:1] == ["train"] and not any("CONFIG" in w for w in c)]


@pytest.mark.parametrize("argv", TRAIN_LINES, ids=[" ".join(c) for c in TRAIN_LINES])
def test_readme_train_commands_resolve(cli, argv):
    # the line's config (a resume may name none: its overrides are checked on the quickstart's)
    config = next((word for word in argv if word.endswith(".yaml")), "configs/quickstart.yaml")
    rest = [word for word in argv[1:] if "=" in word]
    result = cli("config", ROOT / config, *rest)
    assert result.exit_code == 0, result


def test_readme_verbs_exist_and_cheap_ones_run(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    verbs = {argv[0] for argv in trainkit_commands() if argv}
    assert {"train", "eval", "predict", "cache"} <= verbs
    for verb in sorted(verbs):
        assert cli(verb, "--help").exit_code == 0, verb
    for argv in trainkit_commands():
        if argv[:1] == ["cache"] and not any(word.isupper() or "[" in word for word in argv[1:]):
            assert cli(*argv).exit_code == 0, argv
    assert cli("cache", "list").exit_code == 0

"""`--help` as vLLM's and huggingface_hub's users read it, through the installed console script: every value
option says what to type (PATH, NAME=PATH, URL, N), no flag shows a type, and text wraps at the terminal's width."""

from __future__ import annotations

import re

import pytest

from helpers import run_console

COMMANDS = [
    ("merged",),
    ("inspect",),
    ("example",),
    ("generate",),
    ("dynamic",),
    ("check",),
    ("smoke",),
    ("bench",),
    ("manifests",),
    ("crds",),
    ("plan",),
    ("adapters", "list"),
    ("adapters", "publish"),
    ("adapters", "retire"),
    ("adapters", "load"),
    ("adapters", "unload"),
]


def _help(*command: str, columns: int = 120) -> str:
    res = run_console(*command, "--help", env={"COLUMNS": str(columns)})
    assert res.returncode == 0, res.stderr
    return res.stdout


def _option_lines(text: str) -> list[str]:
    """The lines of the Options section that start an option (two spaces, then a dash)."""
    body = text.split("\nOptions:\n", 1)[1]
    return [line for line in body.splitlines() if re.match(r"  -", line)]


def test_every_command_is_listed_here():
    """The list above is the CLI's: a new command cannot go untested for its help."""
    listed = _help()
    names = set(re.findall(r"^  ([a-z]+)\s", listed.split("\nCommands:\n", 1)[1], re.M))
    assert names == {c[0] for c in COMMANDS}
    sub = _help("adapters")
    assert set(re.findall(r"^  ([a-z]+)\s", sub.split("\nCommands:\n", 1)[1], re.M)) == {
        c[1] for c in COMMANDS if len(c) == 2
    }


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_no_python_type_names_and_flags_without_a_value(command):
    text = _help(*command)
    assert not re.search(r"<(str|int|float|bool|path|list\[[a-z]+\])>", text), text
    for line in _option_lines(text):
        first = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        # a value option names its value in capitals (or its choices); a flag is its name(s) alone
        names = r"(-\w, )?--[a-z0-9-]+(, --[a-z0-9-]+)*"
        assert re.fullmatch(names + r"( [A-Za-z0-9=|:,.-]+| / --[a-z-]+)?", first), (command, first)
        if first.split()[0] in {"--json", "--force", "--dry-run", "--verify", "--serve", "--replace", "--check"}:
            assert re.fullmatch(names, first), (command, first)  # a flag takes no value


def test_metavars_say_what_to_type():
    merged = _help("merged")
    assert "--base PATH|ID" in merged and "-o, --output PATH" in merged and "--shard-size SIZE" in merged
    assert re.search(r"^  --json\s{2,}Print", merged, re.M) and re.search(r"^  --verify\s{2,}After", merged, re.M)
    dynamic = _help("dynamic")
    assert "--adapter NAME=PATH" in dynamic and "--port N" in dynamic and "--api-key-env VAR" in dynamic
    assert "--url URL" in _help("smoke") and "--replicas HOST:PORT" in _help("adapters", "publish")


def test_text_wraps_at_the_terminal_width():
    """Both ways: a wide terminal gets lines longer than 80 columns, a narrow one none longer than itself."""
    wide = _help("dynamic", columns=160)
    narrow = _help("dynamic", columns=72)
    assert max(len(line) for line in wide.splitlines()) > 100
    examples = narrow.split("Examples:", 1)[0]  # example commands are kept whole, one a line, as click's \b says
    assert max(len(line) for line in examples.splitlines()) <= 72

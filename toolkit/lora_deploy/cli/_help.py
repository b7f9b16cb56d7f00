"""``--help`` in the style vLLM's and huggingface_hub's users read every day.

Plain click help (argparse's layout): each option with a metavar that says what to type (``--base PATH|ID``,
``--adapter NAME=PATH``, ``--url URL``, ``--port N``), a flag with none (``--verify``, ``--json``), and text wrapped
to the terminal's width. An option's metavar is declared with the option where its type alone does not say it (a
``str`` that is a URL, say); :func:`apply` fills in the rest from the type, once, for every command.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

# what a value of each annotated type is called where the option itself does not say
_BY_TYPE: dict[object, str] = {Path: "PATH", int: "N", float: "X", str: "TEXT"}
# an option's value where its type alone does not say what to type: the same name means the same thing in every
# command (a command whose option differs declares its own metavar, which wins: `dynamic --adapter NAME=PATH`)
BY_NAME: dict[str, str] = {
    "--base": "PATH|ID",
    "--adapter": "PATH|ID",
    "--adapter-store": "DIR",
    "--store": "DIR",
    "--served-from": "DIR",
    "--api-key-env": "VAR",
    "--url": "URL",
    "--endpoint": "URL",
    "--replicas": "HOST:PORT",
    "--host": "HOST",
    "--model": "NAME",
    "--base-model": "NAME",
    "--name": "NAME",
    "--served-model-name": "NAME",
    "--model-source": "FILE|DIR|ID",
    "--dtype": "DTYPE",
    "--serve-dtype": "DTYPE",
    "--kv-cache-dtype": "DTYPE",
    "--qlora": "nf4|fp4|PATH",
    "--quantize": "fp8-dynamic|w8a8-int8",
    "--merge-into": "dequantized|original",
    "--weights": "W1,W2,...",
    "--shard-size": "SIZE",
    "--revision": "REV",
    "--gpu": "TYPE",
    "--size-for": "TYPE",
    "--traffic": "NAME=SHARE",
    "--gpu-memory": "GIB",
    "--kv-cache-gib": "GIB",
    "--gpu-memory-utilization": "FRACTION",
    "--lora-overhead": "FRACTION",
    "--timeout": "SECONDS",
    "--prompt": "TEXT",
}
_FENCE = re.compile(r"```\n(.*?)```\n?", re.S)


def terminal_width() -> int:
    """The terminal's columns (``COLUMNS`` where set, 100 when not a terminal), at least 60."""
    return max(shutil.get_terminal_size((100, 24)).columns, 60)


def context_settings() -> dict:
    """click's help formatter wraps at the smaller of these two: both are the terminal's width."""
    width = terminal_width()
    return {"help_option_names": ["-h", "--help"], "max_content_width": width, "terminal_width": width}


def epilog(text: str) -> str:
    """An examples epilog written with a fenced block, as click keeps it: one command a line, never rewrapped
    (click's ``\\b`` marker)."""
    return _FENCE.sub(lambda m: "\b\n" + m.group(1), text)


def metavar(param) -> str | None:
    """The metavar ``param`` should show: its own if declared, none for a flag, else its value type's name."""
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return ""
    if param.metavar is not None:
        return param.metavar
    long_names = [o for o in param.opts if o.startswith("--")]
    if long_names and long_names[0] in BY_NAME:
        return BY_NAME[long_names[0]]
    descriptor = getattr(param, "type_descriptor", None)
    annotation = getattr(descriptor, "annotation", None)
    args = getattr(annotation, "__args__", ())
    if getattr(annotation, "__origin__", None) is list and args:
        annotation = args[0]
    if isinstance(annotation, type) and hasattr(annotation, "__members__"):  # an Enum: its values
        return "|".join(str(m.value) for m in annotation)  # type: ignore[attr-defined]
    return _BY_TYPE.get(annotation, "VALUE")


def apply(command) -> None:
    """Give every option of ``command`` and its subcommands the metavar :func:`metavar` says, and every argument
    its name in capitals (``ADAPTER``), as the usage line shows it."""
    for sub in (getattr(command, "commands", None) or {}).values():
        apply(sub)
    for param in command.params:
        if param.param_type_name == "option":
            param.metavar = metavar(param)
        else:  # an argument: its name in capitals, with no "<str>" after it (typer 0.29 adds the type there)
            param.metavar = param.metavar or param.name.upper()
            param.display_type_rich = lambda ctx: None  # noqa: ARG005 - typer's signature; older typers never call it

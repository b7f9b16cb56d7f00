"""Options shared by several commands, declared once."""

from __future__ import annotations

from typing import Annotated

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")]
AllowPickleOpt = Annotated[bool, typer.Option(
    "--allow-pickle", help="Accept adapter_model.bin (pickle can run code: only for adapters you trust).")]

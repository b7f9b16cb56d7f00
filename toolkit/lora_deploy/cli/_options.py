"""Every option shared by several commands, declared once (help text and defaults stay consistent)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")]
AllowPickleOpt = Annotated[
    bool,
    typer.Option("--allow-pickle", help="Accept adapter_model.bin (pickle can run code: only for adapters you trust)."),
]

# Serving: `dynamic` and `merged --serve`
HostOpt = Annotated[str, typer.Option(help="Address vLLM listens on.")]
PortOpt = Annotated[int, typer.Option(help="Port vLLM listens on.")]
MaxLenOpt = Annotated[int | None, typer.Option(help="vLLM --max-model-len (default: vLLM's; small on CPU).")]
MaxRankOpt = Annotated[int | None, typer.Option(help="vLLM --max-lora-rank (default: smallest that fits).")]
ServedNameOpt = Annotated[
    str | None, typer.Option(help="Model name of the base on the API (default: from the folder or hub id).")
]
NoSmokeOpt = Annotated[bool, typer.Option("--no-smoke", help="Skip the smoke test after start-up.")]
ExitAfterSmokeOpt = Annotated[
    bool, typer.Option("--exit-after-smoke", help="Stop vLLM and exit once the smoke test has run (CI).")
]
StartTimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds to wait for vLLM to serve every model.")]
LogOpt = Annotated[Path | None, typer.Option(help="vLLM's log file (default: a temporary file).")]

# Talking to a running endpoint: `smoke`, `bench`, `adapters`
UrlOpt = Annotated[str, typer.Option(help="Server URL, e.g. http://127.0.0.1:8000 (with or without /v1).")]
ApiKeyEnvOpt = Annotated[
    str | None, typer.Option(help="Environment variable holding the API key (never pass a key on the command line).")
]
PromptOpt = Annotated[str | None, typer.Option(help="Probe prompt for the smoke test.")]

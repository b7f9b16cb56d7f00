"""Every option shared by several commands, declared once (help text and defaults stay consistent)."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from pydantic import BaseModel, ValidationError

from lora_deploy.errors import InputError
from lora_deploy.serve.settings import cli_flag, problems

F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R", bound=BaseModel)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON summary on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")]
AllowPickleOpt = Annotated[
    bool,
    typer.Option("--allow-pickle", help="Accept adapter_model.bin (pickle can run code: only for adapters you trust)."),
]

# Serving: `dynamic` and `merged --serve`
HostOpt = Annotated[str, typer.Option(help="Address vLLM listens on.")]
PortOpt = Annotated[int, typer.Option(help="Port vLLM listens on.")]
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


# ---------------------------------------------------------------- options from the settings records


def settings_options(
    record: type[BaseModel],
    *,
    before: str,
    only: tuple[str, ...] | None = None,
    flags: dict[str, tuple[str, ...]] | None = None,
) -> Callable[[F], F]:
    """Give a command one option per field of the settings ``record`` (serve/settings.py), as vLLM's
    ``EngineArgs.add_cli_args`` does from its config records: the flag is vLLM's (``--max-lora-rank``, or
    ``flags[name]``), the help is the field's docstring, the default and type are the field's. The options are
    listed before the command's parameter ``before``; the command receives them in ``**settings`` and builds the
    record with :func:`settings_from`. ``only`` picks fields (a command that cannot honour the others)."""

    def decorate(func: F) -> F:
        signature = inspect.signature(func, eval_str=True)
        params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        at = next(i for i, p in enumerate(params) if p.name == before)
        added = []
        for name, field in record.model_fields.items():
            if only is not None and name not in only:
                continue
            annotation = field.annotation
            if typing.get_origin(annotation) is Literal:  # click has no Literal: a string, the record checks it
                annotation = str
            option = typer.Option(
                *(flags or {}).get(name, (cli_flag(name),)), help=" ".join((field.description or "").split())
            )
            added.append(
                inspect.Parameter(
                    name,
                    inspect.Parameter.POSITIONAL_OR_KEYWORD,
                    default=field.default,
                    annotation=Annotated[annotation, option],
                )
            )
        func.__signature__ = signature.replace(parameters=params[:at] + added + params[at:])  # type: ignore[attr-defined]
        return func

    return decorate


def settings_from(record: type[R], values: dict[str, Any], **given: Any) -> R:
    """The settings ``record`` from a command's parsed options (its ``**settings``) and ``given`` fields; a value the
    record refuses is a usage mistake named by its flag (exit 3)."""
    data = {name: values[name] for name in record.model_fields if name in values} | given
    try:
        return record.model_validate(data)
    except ValidationError as e:
        flags = {field.alias or name: cli_flag(name) for name, field in record.model_fields.items()}
        lines = [
            flags.get(line.split(":", 1)[0], line.split(":", 1)[0]) + ":" + line.split(":", 1)[1]
            for line in problems(e, record)
        ]
        raise InputError("; ".join(lines), hint="see --help for what each option takes") from None

"""The `lora-deploy` command line: thin wrappers that parse, call the library, and print.

Every expected failure is a :class:`~lora_deploy.errors.LoraDeployError`; :func:`main` prints it once
(``Error:`` and ``Hint:`` on stderr) and exits with its code. ``LORA_DEPLOY_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import os
import sys

import typer

from .. import __version__
from ..errors import LoraDeployError
from ..output import out
from . import example_cmd, k8s_cmds, merge_cmds, serve_cmds

app = typer.Typer(
    name="lora-deploy",
    help="Deploy PEFT LoRA fine-tunes on vLLM: merge adapters exactly, serve them, and roll them out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("merged", epilog=merge_cmds.MERGED_EXAMPLES)(merge_cmds.merged)
app.command("inspect", epilog=merge_cmds.INSPECT_EXAMPLES)(merge_cmds.inspect_adapter)
app.command("example", epilog=example_cmd.EXAMPLES)(example_cmd.example)
app.command("generate")(example_cmd.generate)
app.command("dynamic", epilog=serve_cmds.DYNAMIC_EXAMPLES,
            context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(serve_cmds.dynamic)
app.command("check")(serve_cmds.check)
app.command("smoke")(serve_cmds.smoke)
app.command("bench")(serve_cmds.bench)
app.add_typer(serve_cmds.adapters_app, name="adapters")
app.command("manifests", epilog=k8s_cmds.EXAMPLES)(k8s_cmds.manifests)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lora-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Deploy PEFT LoRA fine-tunes on vLLM."""


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, turning expected errors into a message and an exit code."""
    try:
        rc = app(args=argv, standalone_mode=False)  # a typer.Exit inside a command comes back as its code
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except LoraDeployError as e:
        if os.environ.get("LORA_DEPLOY_DEBUG"):
            raise
        out.error(e.message, e.hint)
        if not e.hint:
            print("Set LORA_DEPLOY_DEBUG=1 for the full traceback.", file=sys.stderr)
        sys.exit(e.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        print("Aborted.", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # click usage errors come through here in non-standalone mode
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise

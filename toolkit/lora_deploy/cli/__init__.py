"""The `lora-deploy` command line: thin wrappers that parse, call the library, and print.

Every expected failure is a :class:`~lora_deploy.errors.LoraDeployError`; :func:`main` prints it once
(``Error:`` and ``Hint:`` on stderr) and exits with its code (``LORA_DEPLOY_DEBUG=1`` re-raises it with its
traceback). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

import typer

from lora_deploy import __version__
from lora_deploy.cli import _help, endpoint_cmds, example_cmd, k8s_cmds, merge_cmds, plan_cmd, serve_cmds
from lora_deploy.errors import EXIT_INPUT, EXIT_INTERRUPTED, LoraDeployError
from lora_deploy.output import out

app = typer.Typer(
    name="lora-deploy",
    help="Deploy PEFT LoRA fine-tunes on vLLM: merge adapters exactly, serve them, and roll them out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help, as argparse's (vLLM's) reads: see _help.py
    context_settings=_help.context_settings(),
)
app.command("merged", epilog=_help.epilog(merge_cmds.MERGED_EXAMPLES))(merge_cmds.merged)
app.command("inspect", epilog=_help.epilog(merge_cmds.INSPECT_EXAMPLES))(merge_cmds.inspect_adapter)
app.command("example", epilog=_help.epilog(example_cmd.EXAMPLES))(example_cmd.example)
app.command("generate")(example_cmd.generate)
app.command(
    "dynamic",
    epilog=_help.epilog(serve_cmds.DYNAMIC_EXAMPLES),
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)(serve_cmds.dynamic)
app.command("check")(serve_cmds.check)
app.command("smoke")(endpoint_cmds.smoke)
app.command("bench")(endpoint_cmds.bench)
app.add_typer(endpoint_cmds.adapters_app, name="adapters")
app.command("manifests", epilog=_help.epilog(k8s_cmds.EXAMPLES))(k8s_cmds.manifests)
app.command("crds", epilog=_help.epilog(k8s_cmds.CRDS_EXAMPLES))(k8s_cmds.crds)
app.command("plan", epilog=_help.epilog(plan_cmd.EXAMPLES))(plan_cmd.plan)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lora-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Deploy PEFT LoRA fine-tunes on vLLM."""


def main(argv: list[str] | None = None) -> None:
    """Run the app in-process, turning expected errors into a message and an exit code (via SystemExit).

    typer runs in its standalone mode, so usage errors (no such command or option, a bad value) print themselves
    with the usage line and exit 2, and ``typer.Exit`` carries a command's code, through typer's public behaviour
    only. Ctrl-C, which typer reports as "Aborted!" with exit 1, leaves with 130 (the exit-code table's value).
    """
    import logging
    import signal

    # bitsandbytes (imported by transformers/PEFT when installed) warns on every AVX512-BF16 CPU that it could not
    # fetch an optional kernel from the Hugging Face Hub: nothing here wants a kernel from the Hub, and the line
    # reads like a failure of the command
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    interrupted = []

    def on_sigint(signum, frame):  # noqa: ARG001 - signal handler signature
        interrupted.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        command = typer.main.get_command(app)
        _help.apply(command)
        command.main(args=argv, prog_name="lora-deploy")  # standalone: always leaves through SystemExit
    except LoraDeployError as e:
        if os.environ.get("LORA_DEPLOY_DEBUG"):
            raise
        out.error(e.message, e.hint)  # an expected failure: its message says it all, no traceback hint
        sys.exit(e.exit_code)
    except (MemoryError, RuntimeError) as e:
        # torch reports a failed CPU allocation as a plain RuntimeError from its DefaultCPUAllocator (no subclass)
        if isinstance(e, RuntimeError) and "DefaultCPUAllocator" not in str(e) or os.environ.get("LORA_DEPLOY_DEBUG"):
            raise
        out.error(
            "ran out of memory: the input is larger than this machine (or pod) can hold",
            "run it where more memory is available, and check the input's sizes with lora-deploy inspect",
        )
        sys.exit(EXIT_INPUT)
    except SystemExit as e:
        if interrupted and e.code not in (0, None, EXIT_INTERRUPTED):
            sys.exit(EXIT_INTERRUPTED)
        raise
    finally:
        signal.signal(signal.SIGINT, previous)


def entry_point() -> None:
    """The ``lora-deploy`` process: :func:`main`, then a quick exit once every output is flushed.

    Tearing down an interpreter that imported torch takes about 0.7 s (measured here, a sixth of a 0.5B
    merge). Once the command has finished, its files are closed and renamed into place and its atexit
    handlers have run, nothing is left for that teardown to do, so the process leaves with ``os._exit``.
    """
    try:
        main()
        code: str | int | None = 0
    except SystemExit as e:
        code = e.code
    if "torch" not in sys.modules:
        sys.exit(code)
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    import atexit
    import logging

    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code or 0)

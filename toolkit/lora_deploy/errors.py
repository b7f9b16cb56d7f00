"""The exception family the CLI formats for users, one subclass per exit code.

Library code raises a :class:`LoraDeployError` subclass for every *expected* failure (bad input, a refused
feature, an existing output folder, an endpoint that failed). The CLI prints its message and hint without a
traceback and exits with the subclass's ``exit_code``; any other exception is a bug and propagates with its
traceback.
"""

from __future__ import annotations

# Exit codes with a meaning, so CI scripts can tell the kinds of failure apart.
EXIT_OK = 0
EXIT_ERROR = 1  # generic failure
EXIT_USAGE = 2  # bad command line (typer/click use 2 as well)
EXIT_INPUT = 3  # an input (base, adapter, spec) is missing, malformed or incompatible
EXIT_UNSUPPORTED = 4  # the input is valid but uses a feature this path cannot handle
EXIT_OUTPUT = 5  # the output exists (no --force) or cannot be written
EXIT_VERIFY = 6  # the work finished but verification failed
EXIT_SERVER = 7  # vLLM could not start (port in use, bad flag, crash) or died while serving
EXIT_SMOKE = 8  # the endpoint answered, but the smoke test failed (or the endpoint cannot be reached)
EXIT_ADMIN = 9  # a runtime adapter change (load/unload) was refused or did not take effect
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM


class LoraDeployError(Exception):
    """An expected failure, with a message naming what was wrong and a hint saying how to fix it.

    Each kind of failure is a subclass, and the subclass carries the exit code (the table above): code raises
    the kind it means (``InputError``, ``EndpointError``...), never a bare number. The CLI prints ``message`` and
    ``hint`` and exits with ``exit_code``.
    """

    exit_code: int = EXIT_ERROR

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nHint: {self.hint}"


class InputError(LoraDeployError):
    """An input is missing, malformed or does not fit the base model (or the caller's API key is wrong)."""

    exit_code = EXIT_INPUT


class UnsupportedError(LoraDeployError):
    """The input is well-formed but uses a feature that cannot be handled on this path."""

    exit_code = EXIT_UNSUPPORTED


class OutputError(LoraDeployError):
    """The output location is taken or cannot be written."""

    exit_code = EXIT_OUTPUT


class VerificationError(LoraDeployError):
    """The work finished, but checking its result failed (or the check could not run)."""

    exit_code = EXIT_VERIFY


class ServerError(LoraDeployError):
    """vLLM could not start (port in use, bad flag, crash) or died while serving."""

    exit_code = EXIT_SERVER


class EndpointError(LoraDeployError):
    """The endpoint cannot be reached, or did not answer as an OpenAI-compatible server does, or a smoke check
    failed on it."""

    exit_code = EXIT_SMOKE


class HttpError(EndpointError):
    """The server answered with an HTTP error: ``status`` and the server's own ``detail`` (its error message, not
    the raw JSON body), for callers that decide by them (a 400 about logprobs, a 404 for a model)."""

    def __init__(self, message: str, *, status: int, detail: str, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.status = status
        self.detail = detail


class AdminError(LoraDeployError):
    """A runtime adapter change (load, unload, telling a replica) was refused or did not take effect."""

    exit_code = EXIT_ADMIN

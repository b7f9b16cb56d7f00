"""The one exception type the CLI formats for users.

Library code raises :class:`LoraDeployError` for every *expected* failure (bad input, a refused
feature, an existing output folder). The CLI prints its message and hint without a traceback and
exits with its ``exit_code``; any other exception is a bug and propagates with its traceback.
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
    """An expected failure, with a message naming what was wrong and a hint saying how to fix it."""

    def __init__(self, message: str, *, exit_code: int = EXIT_ERROR, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nHint: {self.hint}"


class InputError(LoraDeployError):
    """An input is missing, malformed or does not fit the base model."""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message, exit_code=EXIT_INPUT, hint=hint)


class UnsupportedError(LoraDeployError):
    """The input is well-formed but uses a feature that cannot be handled on this path."""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message, exit_code=EXIT_UNSUPPORTED, hint=hint)


class OutputError(LoraDeployError):
    """The output location is taken or cannot be written."""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message, exit_code=EXIT_OUTPUT, hint=hint)

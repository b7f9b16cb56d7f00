"""One output sink for the CLI: data to stdout (text or JSON), messages and progress to stderr.

Commands never call ``print``: they hand results to :data:`out`, so ``--json`` works the same for
every command and progress bars are switched off where a machine reads the output.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def to_jsonable(obj: Any) -> Any:
    """Plain JSON data for ``obj``; a float that is not finite (NaN, infinity) becomes ``null``, because strict
    JSON parsers (``jq``, JavaScript, Go) reject the ``NaN`` that Python's json module would write."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "__fspath__"):
        return str(obj)
    return obj


class Output:
    """Human or JSON mode; ``progress`` is true only for humans on a terminal."""

    def __init__(self) -> None:
        self.json = False
        self.quiet = False

    def set_mode(self, *, json_mode: bool = False, quiet: bool = False) -> None:
        self.json, self.quiet = json_mode, quiet

    @property
    def progress(self) -> bool:
        return not self.json and not self.quiet and sys.stderr.isatty()

    def info(self, message: str) -> None:
        if not self.json and not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        print(f"Warning: {message}", file=sys.stderr, flush=True)

    def error(self, message: str, hint: str | None = None) -> None:
        print(f"Error: {message}", file=sys.stderr, flush=True)
        if hint:
            print(f"Hint: {hint}", file=sys.stderr, flush=True)

    def result(self, data: Any, text: str) -> None:
        """Emit the command's result: ``data`` as JSON in JSON mode, else the human ``text``."""
        if self.json:
            print(json.dumps(to_jsonable(data), indent=2, sort_keys=False, allow_nan=False))
        else:
            print(text)

    @staticmethod
    def table(rows: list[tuple[str, str]]) -> str:
        width = max((len(k) for k, _ in rows), default=0)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


out = Output()


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Within the block (or the decorated function): transformers logs errors only and shows no per-load progress
    bars; our own output says what happens. The previous verbosity and progress-bar state come back afterwards, so
    calling the library never changes a caller's logging."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()

"""Small file helpers shared by the readers."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError


def read_json_object(path: Path, *, missing: str, hint: str) -> dict:
    """A JSON object from ``path``; a clear InputError when it is missing, not JSON, or not an object."""
    if not path.is_file():
        raise InputError(f"{path} is missing: {missing}", hint=hint)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object")
    return data

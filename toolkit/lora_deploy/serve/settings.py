"""The serving settings a user chooses, declared once: the LoRA limits and the engine settings of a vLLM server.

Each setting is a field of :class:`LoraSettings` or :class:`EngineSettings`, documented by the docstring under it.
Everything else derives from these fields, the way vLLM's ``EngineArgs.add_cli_args`` derives its flags from
``config/lora.py``: the CLI options of ``dynamic``, ``merged --serve`` and ``plan`` (``cli/_options.py``), the deploy
spec's ``vllm:`` keys (``k8s/spec.py``'s ``VllmSpec`` is both records), :class:`~lora_deploy.serve.flags.ServeConfig`
(it holds one of each), the manifests, the capacity plan, and the deploy spec a local run writes. A new serving
setting is a new field here; ``tests/test_settings.py`` fails while a command or the spec lacks it.

:class:`Record` is the base of every validated record, the deploy spec's too: frozen, unknown keys refused, strict
types (``"8"`` is not a number, ``true`` is not 1), camelCase keys (snake_case accepted), and
:func:`problems` turns pydantic's errors into lines that name the key path and what was expected.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

T = TypeVar("T")
R = TypeVar("R", bound=BaseModel)


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# a YAML or CLI list held as a tuple (records are frozen); strict mode alone would refuse the list
Seq = Annotated[tuple[T, ...], BeforeValidator(_as_tuple)]


class Record(BaseModel):
    """A validated, frozen record: unknown keys refused, strict types, camelCase keys (snake_case too), and each
    field's docs from the docstring under it (what ``--help`` and the docs show)."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        frozen=True,
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        use_attribute_docstrings=True,
    )


# vLLM's --dtype names (vllm/config/model.py) -> the torch dtype each one means
VllmDtype = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]
VLLM_DTYPES: dict[str, str] = {
    "auto": "auto",
    "half": "float16",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "float": "float32",
    "float32": "float32",
}


class LoraSettings(Record):
    """The LoRA limits a user may set; each left out is derived from the adapters (serve/flags.py)."""

    max_lora_rank: int | None = None
    """vLLM --max-lora-rank: the largest adapter rank the server accepts (default: the smallest of vLLM's values
    that fits every adapter; an adapter store's own limit)."""
    max_loras: int | None = None
    """vLLM --max-loras: adapters in one batch, each a LoRA slot of GPU memory (default: the adapters, plus the CPU
    build's empty slot)."""
    max_cpu_loras: int | None = None
    """vLLM --max-cpu-loras: adapters cached in CPU memory (default: at least --max-loras)."""


class EngineSettings(Record):
    """The vLLM engine settings a user may set, and that sizing depends on."""

    dtype: VllmDtype = "auto"
    """vLLM --dtype: auto (the checkpoint's; float32 is served in bfloat16), half, float16, bfloat16, float or
    float32."""
    max_model_len: int | None = None
    """vLLM --max-model-len: the longest sequence (default: the model's; 2048 on the CPU build)."""
    gpu_memory_utilization: float | None = None
    """vLLM --gpu-memory-utilization: its share of each GPU (default: vLLM's 0.9)."""
    tensor_parallel_size: int | None = None
    """vLLM --tensor-parallel-size: GPUs one model is split over (default: 1; in a deploy spec, its gpus)."""
    kv_cache_dtype: str | None = None
    """vLLM --kv-cache-dtype: auto (the serving dtype), fp8, fp8_e4m3, fp8_e5m2, ... (fp8 halves the KV cache)."""


def cli_flag(name: str) -> str:
    """The CLI option of a settings field (``max_lora_rank`` -> ``--max-lora-rank``), the same as vLLM's."""
    return "--" + name.replace("_", "-")


def project(record: BaseModel, cls: type[R]) -> R:
    """The fields of ``cls`` read off ``record`` (a spec's ``vllm:`` section is both settings records)."""
    return cls.model_validate({name: getattr(record, name) for name in cls.model_fields})


# pydantic's error types -> what was expected, as the spec's messages have always said it
_EXPECTED = {
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "tuple_type": "a list",
    "list_type": "a list",
}


def _path(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The record class that holds the last key of ``loc`` (for the known keys of an unknown one)."""
    import typing

    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if fields is None:
            return None
        found = next((f for n, f in fields.items() if part in (n, f.alias)), None)
        if found is None:
            return None
        current = found.annotation
        for _ in range(3):  # Optional[X], tuple[X, ...], Annotated[...] -> X
            args = [a for a in typing.get_args(current) if isinstance(a, type) and issubclass(a, BaseModel)]
            if args:
                current = args[0]
                break
            inner = [a for a in typing.get_args(current) if a is not type(None) and a is not Ellipsis]
            current = inner[0] if inner else current
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def problems(error: ValidationError, model: type[BaseModel]) -> list[str]:
    """Each problem of ``error`` as ``key.path: what was wrong`` (unknown keys with the closest known one; missing
    keys gathered per mapping), in the order they occur."""
    lines: list[str] = []
    missing: dict[str, list[str]] = {}
    for e in error.errors():
        loc = tuple(e["loc"])
        kind = e["type"]
        where = _path(loc)
        if kind == "extra_forbidden":
            holder = _model_at(model, loc[:-1])
            names = sorted(f.alias or n for n, f in holder.model_fields.items()) if holder else []
            close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
            lines.append(
                f"{where}: unknown key"
                + (f" (did you mean {close[0]}?)" if close else f"; known keys here: {', '.join(names)}")
            )
        elif kind == "missing":
            parent = _path(loc[:-1]) or "the spec"
            if parent not in missing:
                missing[parent] = []
                lines.append(parent)  # placeholder, filled below in order
            missing[parent].append(str(loc[-1]))
        elif kind == "literal_error":
            allowed = e.get("ctx", {}).get("expected", "")
            lines.append(f"{where}: {e['input']!r} is not {allowed}")
        elif kind in _EXPECTED:
            got = e["input"]
            lines.append(f"{where or 'the spec'}: expected {_EXPECTED[kind]}, got {got!r}")
        else:
            lines.append(f"{where or 'the spec'}: {e['msg']}")
    return [
        f"{line}: missing required key(s): {', '.join(missing[line])}" if line in missing else line for line in lines
    ]

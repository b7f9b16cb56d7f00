"""Runtime adapter management on a running vLLM: list, load, unload, each confirmed through /v1/models.

vLLM has answered 200 to a load of a path that does not exist, so the HTTP status is never trusted
alone: every change is confirmed by reading the model list back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

from lora_deploy.errors import AdminError, EndpointError
from lora_deploy.serve.client import Endpoint, ServedModel, error_text

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _admin_errors(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """An adapter change that the endpoint failed is an :class:`AdminError` (exit 9), with the endpoint's message
    and hint; the original (an ``HttpError`` with its status, say) stays reachable as ``__cause__``. A wrong key
    stays an ``InputError`` (exit 3): the change was never attempted."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except EndpointError as e:
            raise AdminError(e.message, hint=e.hint) from e

    return wrapper


def _endpoint(url: str, api_key: str | None) -> Endpoint:
    # loads can take a while (weights read from disk); one retry only: a change is not idempotent
    return Endpoint(url, api_key, timeout=120.0, retries=1)


@_admin_errors
def list_models(url: str, api_key: str | None = None) -> list[ServedModel]:
    """The models a server lists, with each adapter's parent and root."""
    return _endpoint(url, api_key).models()


@dataclass(frozen=True)
class RuntimeLoad:
    """A confirmed runtime load: the listed model, how pre-flight went, and how far it answers from the base."""

    model: ServedModel
    preflight: str  # "passed", or why it could not run here
    distance_to_base: float | None  # mean |d logprob| of the top-5 tokens on the smoke probe (nats)
    replaced: str | None = None  # the path the adapter was served from before a --replace


@_admin_errors
def load_runtime_adapter(
    url: str, name: str, path: str, api_key: str | None = None, *, preflight: bool = True, replace: bool = False
) -> RuntimeLoad:
    """Load an adapter into a running vLLM, safely: pre-flight first, then confirm it is listed and applied.

    Pre-flight is the same as ``dynamic``'s, against the base the server reports as its root (when that folder
    and the adapter exist on this machine): an adapter for another base is refused before vLLM sees it.
    After the load, the adapter must answer the smoke probe unlike the base (output distributions, as the
    smoke test judges them); one that answers exactly like the base is unloaded again (or, after a
    ``replace``, put back to the adapter it replaced) and reported.

    ``replace`` swaps the weights behind an adapter name already served (vLLM's ``load_inplace``): clients
    keep the name, the slot count does not change, and a startup adapter may be replaced without ``--force``.
    """
    from lora_deploy.prompts import DEFAULT_PROMPT
    from lora_deploy.serve.preflight import check_adapters, require_passed
    from lora_deploy.serve.smoke import APPLIED_MIN_NATS, probe_model

    server = _endpoint(url, api_key)
    served = server.models()
    previous = next((m for m in served if m.id == name), None)
    if previous is not None and not previous.parent:
        raise AdminError(
            f"{name!r} is the server's base model, not an adapter",
            hint="pick another name for the adapter",
        )
    if previous is not None and not replace:
        raise AdminError(
            f"the server already serves an adapter named {name!r} (from {previous.root})",
            hint=f"pass --replace to swap its weights in place (clients keep the name), or "
            f"unload it first (lora-deploy adapters unload {name}), or pick another name",
        )
    if previous is None and replace:
        raise AdminError(
            f"--replace: the server serves no adapter named {name!r}",
            hint="drop --replace to load it as a new adapter",
        )
    from lora_deploy.serve.launcher import read_record

    record = read_record(url)
    if record is not None and previous is None:
        runtime = [m.id for m in served if m.parent and m.id not in record.startup_adapters]
        if len(runtime) >= record.runtime_slots:
            raise AdminError(
                f"all {record.runtime_slots} LoRA slot(s) reserved for runtime adapters are in use "
                f"({', '.join(runtime) or 'none: runtime loading is off'})",
                hint="unload one first, or restart with a larger --runtime-adapter-slots (on the CPU build a "
                "load beyond them would take the empty slot that keeps base answers correct)",
            )
    base = next((m for m in served if not m.parent), None)
    verdict = "skipped: no base model listed"
    moe_3d = False
    if preflight and base is not None:
        if base.root and Path(base.root).is_dir() and Path(path).exists():
            report = check_adapters(base.root, {name: path})
            require_passed(report)
            path, moe_3d = str(report.accepted[0].path), report.accepted[0].moe_3d
            verdict = "passed"
        else:
            verdict = f"skipped: the base ({base.root}) or the adapter is not a folder on this machine"
    elif not preflight:
        verdict = "skipped: --no-preflight"
    _load(server, name, path, inplace=replace, moe_3d=moe_3d)
    listed = {m.id: m for m in server.models()}
    if name not in listed or (replace and listed[name].root != path):
        raise AdminError(
            f"the server accepted the load but does not list {name!r} from {path}: the load did not happen",
            hint="check that the path exists on the server",
        )
    distance = None
    if base is not None:
        ours, theirs = (probe_model(server, m, DEFAULT_PROMPT, 8) for m in (name, base.id))
        distance = ours.distance(theirs)
        if distance <= APPLIED_MIN_NATS:
            if previous is not None and previous.root:
                from lora_deploy.model.adapter import adapter_is_moe_experts

                _load(server, name, previous.root, inplace=True, moe_3d=bool(adapter_is_moe_experts(previous.root)))
                undone = f"put back to {previous.root}"
            else:
                unload_runtime_adapter(url, name, api_key, force=True)
                undone = "unloaded again"
            raise AdminError(
                f"{name!r} loaded but answers exactly like the base {base.id!r} (distance "
                f"{distance:.3g} nats): {undone}",
                hint="the adapter's lora_B is zero, or it does not target this model's modules",
            )
    return RuntimeLoad(
        listed[name],
        verdict,
        None if distance is None else round(distance, 6),
        previous.root if previous is not None else None,
    )


def _load(server: Endpoint, name: str, path: str, *, inplace: bool, moe_3d: bool = False) -> None:
    body: dict = {"lora_name": name, "lora_path": path}
    if inplace:
        body["load_inplace"] = True
    if moe_3d:  # fused MoE expert LoRA: vLLM reads the weight layout from the request
        body["is_3d_lora_weight"] = True
    r = server.request("POST", "/v1/load_lora_adapter", json=body, check=False, retries=0)
    if r.status_code == 404 and "load_lora_adapter" in r.text or r.status_code == 405:
        raise AdminError(
            "the server does not allow runtime adapter loading",
            hint="start it with lora-deploy dynamic --allow-runtime-adapters",
        )
    if r.status_code >= 400 and "already" in r.text.lower():
        raise AdminError(
            f"the server already serves an adapter named {name!r}",
            hint=f"pass --replace to swap its weights in place, or unload it first "
            f"(lora-deploy adapters unload {name})",
        )
    if r.status_code == 401:
        server.raise_for_status(r, "/v1/load_lora_adapter")
    if r.status_code >= 400:
        raise AdminError(f"loading {name!r} from {path} failed: HTTP {r.status_code} {error_text(r)}")


@_admin_errors
def unload_runtime_adapter(url: str, name: str, api_key: str | None = None, *, force: bool = False) -> None:
    """Unload an adapter and confirm it is gone; a startup adapter (the readiness probe requires it) needs force."""
    from lora_deploy.serve.launcher import read_record

    record = read_record(url)
    if record is not None and name in record.startup_adapters and not force:
        raise AdminError(
            f"{name!r} was served from the start: the readiness probe and clients expect it",
            hint="pass --force to unload it anyway",
        )
    server = _endpoint(url, api_key)
    r = server.request("POST", "/v1/unload_lora_adapter", json={"lora_name": name}, check=False, retries=0)
    if r.status_code == 401:
        server.raise_for_status(r, "/v1/unload_lora_adapter")
    if r.status_code >= 400:
        raise AdminError(f"unloading {name!r} failed: HTTP {r.status_code} {error_text(r)}")
    if any(m.id == name for m in server.models()):
        raise AdminError(f"the server answered {r.status_code} but still lists {name!r}")


@_admin_errors
def reload_from(url: str, name: str, path: str, api_key: str | None = None) -> bool:
    """Make a replica that serves ``name`` load it from ``path`` in place (a new version in an adapter store);
    False when it had not loaded ``name``, so its next request loads the store's current version anyway.

    Confirmed through /v1/models (the listed root must be ``path``). A new path, not the old one: vLLM keys
    prefix-cache blocks by adapter name and path.
    """
    server = _endpoint(url, api_key)
    if not any(m.id == name for m in server.models()):
        return False
    _load(server, name, path, inplace=True)  # never MoE expert LoRA: stores refuse it (store.publish)
    listed = {m.id: m for m in server.models()}
    if name not in listed or listed[name].root != path:
        raise AdminError(
            f"the replica accepted the reload but does not list {name!r} from {path}",
            hint="check that the store is mounted at the same path there",
        )
    return True


@_admin_errors
def forget(url: str, name: str, api_key: str | None = None) -> bool:
    """Unload ``name`` from a replica if it loaded it (False when it had not); confirmed through /v1/models."""
    server = _endpoint(url, api_key)
    if not any(m.id == name for m in server.models()):
        return False
    unload_runtime_adapter(url, name, api_key, force=True)
    return True

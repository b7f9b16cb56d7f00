"""Runtime adapter management on a running vLLM: list, load, unload, each confirmed through /v1/models.

vLLM has answered 200 to a load of a path that does not exist, so the HTTP status is never trusted
alone: every change is confirmed by reading the model list back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import requests

from .errors import EXIT_ADMIN, EXIT_INPUT, LoraDeployError
from .smoke import error_text



@dataclass(frozen=True)
class ServedModel:
    """A model the server lists: its id, its parent (None for the base), and where it was loaded from."""

    id: str
    parent: str | None
    root: str | None


def _call(method: str, url: str, path: str, api_key: str | None, **kw) -> requests.Response:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        return requests.request(method, url.rstrip("/").removesuffix("/v1") + path, headers=headers, timeout=120, **kw)
    except requests.ConnectionError as e:
        raise LoraDeployError(f"cannot connect to {url}", exit_code=EXIT_ADMIN,
                              hint="is the server running, and is --url right?") from e


def list_models(url: str, api_key: str | None = None) -> list[ServedModel]:
    r = _call("GET", url, "/v1/models", api_key)
    if r.status_code == 401:
        raise LoraDeployError("401 Unauthorized: the server wants an API key", exit_code=EXIT_INPUT,
                              hint="pass --api-key-env VAR with VAR set to the key")
    if r.status_code != 200:
        raise LoraDeployError(f"/v1/models answered HTTP {r.status_code}: {r.text[:200]}", exit_code=EXIT_ADMIN)
    return [ServedModel(m["id"], m.get("parent"), m.get("root")) for m in r.json().get("data", [])]


@dataclass(frozen=True)
class RuntimeLoad:
    """A confirmed runtime load: the listed model, how pre-flight went, and how far it answers from the base."""

    model: ServedModel
    preflight: str  # "passed", or why it could not run here
    distance_to_base: float | None  # mean |d logprob| of the top-5 tokens on the smoke probe (nats)


def load_runtime_adapter(url: str, name: str, path: str, api_key: str | None = None, *,
                         preflight: bool = True) -> RuntimeLoad:
    """Load an adapter into a running vLLM, safely: pre-flight first, then confirm it is listed and applied.

    Pre-flight is the same as ``dynamic``'s, against the base the server reports as its root (when that folder
    and the adapter exist on this machine): an adapter for another base is refused before vLLM sees it.
    After the load, the adapter must answer the smoke probe unlike the base (output distributions, as the
    smoke test judges them); one that answers exactly like the base is unloaded again and reported.
    """
    from .preflight import check_adapters, require_passed
    from .smoke import APPLIED_MIN_NATS, DEFAULT_PROMPT, _Client, _probe

    served = list_models(url, api_key)
    if any(m.id == name for m in served):
        raise LoraDeployError(f"the server already serves a model named {name!r}", exit_code=EXIT_ADMIN,
                              hint=f"unload it first (lora-deploy adapters unload {name}) or pick another name")
    from .launcher import read_record

    record = read_record(url)
    if record is not None:
        runtime = [m.id for m in served if m.parent and m.id not in record.startup_adapters]
        if len(runtime) >= record.runtime_slots:
            raise LoraDeployError(
                f"all {record.runtime_slots} LoRA slot(s) reserved for runtime adapters are in use "
                f"({', '.join(runtime) or 'none: runtime loading is off'})", exit_code=EXIT_ADMIN,
                hint="unload one first, or restart with a larger --runtime-adapter-slots (on the CPU build a "
                     "load beyond them would take the empty slot that keeps base answers correct)")
    base = next((m for m in served if not m.parent), None)
    verdict = "skipped: no base model listed"
    if preflight and base is not None:
        if base.root and Path(base.root).is_dir() and Path(path).exists():
            report = check_adapters(base.root, {name: path})
            require_passed(report)
            path = str(report.accepted[0].path)
            verdict = "passed"
        else:
            verdict = f"skipped: the base ({base.root}) or the adapter is not a folder on this machine"
    elif not preflight:
        verdict = "skipped: --no-preflight"
    r = _call("POST", url, "/v1/load_lora_adapter", api_key, json={"lora_name": name, "lora_path": path})
    if r.status_code == 404 and "load_lora_adapter" in r.text or r.status_code == 405:
        raise LoraDeployError("the server does not allow runtime adapter loading", exit_code=EXIT_ADMIN,
                              hint="start it with lora-deploy dynamic --allow-runtime-adapters")
    if r.status_code == 401:
        list_models(url, api_key)  # raises the one 401 message
    if r.status_code >= 400 and "already" in r.text.lower():
        raise LoraDeployError(f"the server already serves an adapter named {name!r}", exit_code=EXIT_ADMIN,
                              hint=f"unload it first (lora-deploy adapters unload {name}) or pick another name")
    if r.status_code >= 400:
        raise LoraDeployError(f"loading {name!r} from {path} failed: HTTP {r.status_code} {error_text(r)}",
                              exit_code=EXIT_ADMIN)
    listed = {m.id: m for m in list_models(url, api_key)}
    if name not in listed:
        raise LoraDeployError(f"the server answered {r.status_code} but does not list {name!r}: the load did not "
                              "happen", exit_code=EXIT_ADMIN, hint="check that the path exists on the server")
    distance = None
    if base is not None:
        client = _Client(url, api_key, 60.0, 2)
        ours, theirs = (_probe(client, m, DEFAULT_PROMPT, 8, [True]) for m in (name, base.id))
        distance = ours.distance(theirs)
        if distance <= APPLIED_MIN_NATS:
            unload_runtime_adapter(url, name, api_key, force=True)
            raise LoraDeployError(f"{name!r} loaded but answers exactly like the base {base.id!r} (distance "
                                  f"{distance:.3g} nats): unloaded again", exit_code=EXIT_ADMIN,
                                  hint="the adapter's lora_B is zero, or it does not target this model's modules")
    return RuntimeLoad(listed[name], verdict, None if distance is None else round(distance, 6))


def unload_runtime_adapter(url: str, name: str, api_key: str | None = None, *, force: bool = False) -> None:
    """Unload an adapter and confirm it is gone; a startup adapter (the readiness probe requires it) needs force."""
    from .launcher import read_record

    record = read_record(url)
    if record is not None and name in record.startup_adapters and not force:
        raise LoraDeployError(f"{name!r} was served from the start: the readiness probe and clients expect it",
                              exit_code=EXIT_ADMIN, hint="pass --force to unload it anyway")
    r = _call("POST", url, "/v1/unload_lora_adapter", api_key, json={"lora_name": name})
    if r.status_code >= 400:
        raise LoraDeployError(f"unloading {name!r} failed: HTTP {r.status_code} {error_text(r)}",
                              exit_code=EXIT_ADMIN)
    if any(m.id == name for m in list_models(url, api_key)):
        raise LoraDeployError(f"the server answered {r.status_code} but still lists {name!r}", exit_code=EXIT_ADMIN)

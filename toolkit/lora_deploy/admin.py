"""Runtime adapter management on a running vLLM: list, load, unload, each confirmed through /v1/models.

vLLM has answered 200 to a load of a path that does not exist, so the HTTP status is never trusted
alone: every change is confirmed by reading the model list back.
"""

from __future__ import annotations

from dataclasses import dataclass

import requests

from .errors import LoraDeployError

EXIT_ADMIN = 9


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
        raise LoraDeployError("401 Unauthorized", exit_code=EXIT_ADMIN, hint="pass --api-key-env VAR")
    if r.status_code != 200:
        raise LoraDeployError(f"/v1/models answered HTTP {r.status_code}: {r.text[:200]}", exit_code=EXIT_ADMIN)
    return [ServedModel(m["id"], m.get("parent"), m.get("root")) for m in r.json().get("data", [])]


def load_runtime_adapter(url: str, name: str, path: str, api_key: str | None = None) -> ServedModel:
    r = _call("POST", url, "/v1/load_lora_adapter", api_key, json={"lora_name": name, "lora_path": path})
    if r.status_code == 404 and "load_lora_adapter" in r.text or r.status_code == 405:
        raise LoraDeployError("the server does not allow runtime adapter loading", exit_code=EXIT_ADMIN,
                              hint="start it with lora-deploy dynamic --allow-runtime-adapters")
    if r.status_code >= 400:
        raise LoraDeployError(f"loading {name!r} from {path} failed: HTTP {r.status_code} {r.text[:300]}",
                              exit_code=EXIT_ADMIN)
    listed = {m.id: m for m in list_models(url, api_key)}
    if name not in listed:
        raise LoraDeployError(f"the server answered {r.status_code} but does not list {name!r}: the load did not "
                              "happen", exit_code=EXIT_ADMIN, hint="check that the path exists on the server")
    return listed[name]


def unload_runtime_adapter(url: str, name: str, api_key: str | None = None) -> None:
    r = _call("POST", url, "/v1/unload_lora_adapter", api_key, json={"lora_name": name})
    if r.status_code >= 400:
        raise LoraDeployError(f"unloading {name!r} failed: HTTP {r.status_code} {r.text[:300]}",
                              exit_code=EXIT_ADMIN)
    if any(m.id == name for m in list_models(url, api_key)):
        raise LoraDeployError(f"the server answered {r.status_code} but still lists {name!r}", exit_code=EXIT_ADMIN)

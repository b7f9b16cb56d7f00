"""An ASGI middleware for vLLM's OpenAI server (``--middleware``): no way around the API key, no crafted model names.

vLLM 0.32's own ``--api-key`` check guards only paths under ``/v1``, ``/v2``, ``/inference`` and ``/cohere``
(``vllm/entrypoints/serve/middleware/authenticate.py``). Everything else is open, among it ``POST /invocations``
(which serves), ``POST /tokenize`` and, with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` on (which an adapter store needs),
the SageMaker routes ``POST /adapters`` (loads any path the server can read) and ``DELETE /adapters/{name}`` (unloads
any adapter, a startup one too). And vLLM's filesystem resolver joins a request's ``model`` onto the store folder
unchecked, so ``../x``, ``/abs``, ``NAME/.`` or ``.lora-deploy/versions/NAME/<id>`` all load.

This middleware runs before vLLM's own (a ``--middleware`` class is added last, so it is outermost) and, when an API
key is set, demands it on every path but the ones probes and Prometheus read (:data:`OPEN_PATHS`); and on every
request whose JSON body names a ``model`` (or a ``lora_name``), it accepts only a served base name or a plain adapter
name (letters, digits, '.', '_', '-'; no '/', no leading '.'), so only top-level published names reach the resolver.

It is one file with no dependency but the standard library: the manifests mount it from a ConfigMap into the stock
vLLM image (``PYTHONPATH`` names the folder) and ``lora-deploy dynamic`` passes ``lora_deploy.serve.guard.ApiKeyGuard``.
Settings come from the environment, since vLLM builds a middleware class with the app alone:

- ``VLLM_API_KEY``: the key (vLLM reads the same variable);
- ``LORA_DEPLOY_SERVED_NAMES``: the base's served names, comma-separated (they may hold a hub id's '/').
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets

OPEN_PATHS = ("/health", "/metrics")  # liveness and startup probes, Prometheus; /metrics is a mounted app
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # serve/flags.py's rule, whole-string
MAX_BODY_BYTES = 64 << 20  # a request body read to find its model: larger ones are refused, not buffered
NAME_FIELDS = ("model", "lora_name")


def _json_response(status: int, message: str, kind: str):
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return body, headers


class ApiKeyGuard:
    """Demand the API key on every path but :data:`OPEN_PATHS`; refuse a request whose JSON ``model`` (or
    ``lora_name``) is neither a served base name nor a plain adapter name."""

    def __init__(self, app, *, api_key: str | None = None, served_names: str | None = None):
        self.app = app
        key = os.environ.get("VLLM_API_KEY") if api_key is None else api_key
        self.key_hash = hashlib.sha256(key.encode()).digest() if key else None
        names = os.environ.get("LORA_DEPLOY_SERVED_NAMES", "") if served_names is None else served_names
        self.served = {n.strip() for n in names.split(",") if n.strip()}

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if self.key_hash is not None and not self._open(path) and not self._authorized(scope):
            return await self._reply(scope, send, 401, "a valid API key is required on this path", "Unauthorized")
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                return await self._reply(
                    scope, send, 413, f"request body over {MAX_BODY_BYTES >> 20} MiB", "BadRequestError"
                )
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        problem = self._name_problem(body, scope)
        if problem:
            return await self._reply(scope, send, 400, problem, "BadRequestError")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    @staticmethod
    def _open(path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in OPEN_PATHS)

    def _authorized(self, scope) -> bool:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token or self.key_hash is None:
            return False
        return secrets.compare_digest(hashlib.sha256(token.encode()).digest(), self.key_hash)

    def _name_problem(self, body: bytes, scope) -> str | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if "json" not in headers.get("content-type", "json"):
            return None
        try:
            data = json.loads(body) if body else None
        except (ValueError, RecursionError):
            return None  # vLLM answers a malformed body itself (400)
        if not isinstance(data, dict):
            return None
        for field in NAME_FIELDS:
            name = data.get(field)
            if name is None or (
                isinstance(name, str) and (name in self.served or ADAPTER_NAME.fullmatch(name) and ".." not in name)
            ):
                continue
            return (
                f"{field} {name!r} is not a served model name: a base's served name or a plain adapter name "
                "(letters, digits, '.', '_', '-') only"
            )
        return None

    @staticmethod
    async def _reply(scope, send, status: int, message: str, kind: str):
        body, headers = _json_response(status, message, kind)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return None
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return None

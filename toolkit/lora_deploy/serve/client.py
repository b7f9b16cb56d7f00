"""The one HTTP client for OpenAI-compatible servers: smoke test, runtime adapters, load, launcher and demo.

Every conversation with vLLM goes through :class:`Endpoint`: one place that normalises the URL (with or
without ``/v1``), sends the API key, retries what is worth retrying (connection refused while a server
starts, 5xx), applies timeouts, and turns HTTP failures into :class:`~lora_deploy.errors.LoraDeployError`
with the server's own message (not the raw JSON body) and the exit code of the caller's kind of work.
It needs only ``requests``, so the in-cluster smoke Job mounts it beside ``smoke.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import requests

from lora_deploy.errors import EndpointError, HttpError, InputError, LoraDeployError

# An answer larger than this is not an OpenAI-compatible reply to anything lora-deploy asks: it is cut off, and an error
MAX_RESPONSE_BYTES = 32 << 20
_DEADLINE = "_lora_deploy_deadline"  # set on each response: when the whole call must have ended (time.monotonic)


def redact_url(url: str) -> str:
    """``url`` with any credentials (``user:password@``) replaced, for every message and log line."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


@dataclass(frozen=True)
class ServedModel:
    """A model the server lists: its id, its parent (None for the base), and where it was loaded from."""

    id: str
    parent: str | None
    root: str | None


def server_root(url: str) -> str:
    """``http://host:port`` for any spelling of the server URL: a trailing slash or ``/v1`` is dropped, and a bare
    ``host:port`` (what the launcher prints and accepts) means ``http://host:port``.

    Anything else that is not an http(s) URL with a host and a valid port is an input error (exit 3) naming
    what is wrong, raised here so that every command that talks to a server inherits it.
    """
    from urllib.parse import urlsplit

    raw = url.strip()
    given = raw if "://" in raw else f"http://{raw}"
    try:
        parts = urlsplit(given)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0-65535
    except ValueError as e:
        raise InputError(
            f"--url {url!r} is not a valid URL ({e})",
            hint="give the server as http://HOST:PORT (or HOST:PORT), e.g. http://localhost:8000",
        ) from e
    if parts.scheme not in ("http", "https"):
        raise InputError(
            f"--url {url!r}: scheme {parts.scheme!r} is not http or https",
            hint="give the server as http://HOST:PORT, e.g. http://localhost:8000",
        )
    if not parts.hostname:
        raise InputError(
            f"--url {url!r} names no host", hint="give the server as http://HOST:PORT, e.g. http://localhost:8000"
        )
    if parts.query or parts.fragment:
        raise InputError(
            f"--url {url!r} has a query or fragment; it should be the server's address only",
            hint="e.g. http://localhost:8000 (a trailing /v1 is fine)",
        )
    return given.rstrip("/").removesuffix("/v1").rstrip("/")


def _read_bounded(r: requests.Response, where: str) -> None:
    """Read a response's body within its deadline and :data:`MAX_RESPONSE_BYTES` (a server that sends a byte every
    few seconds, or an endless body, cannot hold a command or fill its memory): the watchdog that
    :meth:`Endpoint.request` set closes the connection at the deadline, which ends a read that is waiting."""
    body = bytearray()
    try:
        for chunk in r.iter_content(1 << 16):
            body += chunk
            if len(body) > MAX_RESPONSE_BYTES:
                r.close()
                raise EndpointError(
                    f"{where}: the answer is larger than {MAX_RESPONSE_BYTES >> 20} MiB; cut off",
                    hint=_NOT_VLLM_HINT,
                )
    except (requests.RequestException, AttributeError, ValueError, OSError) as e:
        _raise_past_deadline(r, where)
        raise EndpointError(
            f"{where}: the answer broke off ({e.__class__.__name__})",
            hint="read the server's log",
        ) from e
    _raise_past_deadline(r, where)  # closed at the deadline: what arrived is incomplete
    r._content = bytes(body)  # requests' own cache of the body: .json() and .text read it from here


def _raise_past_deadline(r: requests.Response, where: str) -> None:
    if time.monotonic() >= getattr(r, _DEADLINE, float("inf")):
        raise EndpointError(
            f"{where}: no complete answer within the call's deadline",
            hint="the server is overloaded or stuck; raise --timeout",
        )


def _watchdog(r: requests.Response, deadline: float):
    """A timer that closes ``r`` at ``deadline``: reads of a trickling body give up then instead of waiting on."""
    import threading

    def cut() -> None:
        import socket

        # the socket under http.client's reader; shutdown wakes a recv blocked in the reading thread (close() here
        # would wait for the reader's lock instead), which then sees the end of the stream
        fp = getattr(getattr(r.raw, "_fp", None), "fp", None)
        sock = getattr(getattr(fp, "raw", None), "_sock", None)
        try:
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), cut)
    timer.daemon = True
    timer.start()
    return timer


def error_text(r: requests.Response) -> str:
    """The server's error message from an OpenAI-style error body, not the raw JSON."""
    try:
        body = r.json()
        err = body.get("error", body)
        return str(err.get("message", err) if isinstance(err, dict) else err)[:300]
    except (ValueError, AttributeError):
        return r.text[:300]


def iter_sse(response: requests.Response) -> Iterator[dict]:
    """The JSON chunks of an OpenAI-style server-sent-event stream, up to `data: [DONE]`.

    A chunk that is not a JSON object (a proxy's page, a cut connection) is a :class:`LoraDeployError` that
    says what came back, never a ``JSONDecodeError``.
    """
    where = f"{response.request.method} {response.url}" if response.request is not None else response.url
    kind = response.headers.get("content-type", "")
    if not kind.startswith("text/event-stream"):  # a proxy's page answered instead of the server's stream
        raise EndpointError(
            f"{where} answered HTTP {response.status_code} with something that is not a JSON "
            f"object or event stream ({_describe_body(response)})",
            hint=_NOT_VLLM_HINT,
        )
    deadline, received = getattr(response, _DEADLINE, None), 0
    try:
        for line in response.iter_lines(decode_unicode=True):
            received += len(line) + 1
            if received > MAX_RESPONSE_BYTES or (deadline is not None and time.monotonic() > deadline):
                response.close()
                raise EndpointError(
                    f"{where}: the stream ran past its deadline or {MAX_RESPONSE_BYTES >> 20} MiB; cut off",
                    hint="raise --timeout, or read the server's log",
                )
            if not line or not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                chunk = json.loads(data)
            except ValueError:
                chunk = None
            if not isinstance(chunk, dict):
                raise EndpointError(
                    f"{where} streamed a chunk that is not a JSON object: {data[:200]!r}",
                    hint=_NOT_VLLM_HINT,
                )
            yield chunk
    except (
        requests.RequestException,
        AttributeError,
        ValueError,
        OSError,
    ) as e:  # broke off, or closed at the deadline
        _raise_past_deadline(response, where)
        raise EndpointError(
            f"{where}: the stream broke off ({e.__class__.__name__}: {e})",
            hint="read the server's log",
        ) from e


_NOT_VLLM_HINT = (
    "is --url the OpenAI-compatible server itself (not a proxy, gateway or web page in front of it)? "
    "try: curl URL/v1/models"
)


def _describe_body(r: requests.Response) -> str:
    """What a response carried, for an error message: its content type and the start of its text."""
    kind = r.headers.get("content-type", "no content type")
    text = " ".join(r.text.split())[:200] if r.content else "an empty body"
    return f"{kind}: {text!r}" if r.content else f"{kind}, {text}"


class Endpoint:
    """An OpenAI-compatible server at ``url``.

    What goes wrong is an :class:`~lora_deploy.errors.EndpointError` (an HTTP error answer: its subclass
    :class:`~lora_deploy.errors.HttpError`, with the status and the server's message); a 401 is an
    :class:`~lora_deploy.errors.InputError`: the caller's key is wrong or missing. A caller whose kind of work
    has its own exit code (the admin commands' 9) converts at its boundary (``serve/admin.py``).
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 3,
    ):
        self.url = server_root(url)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.retries = retries

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        stream: bool = False,
        check: bool = True,
        retries: int | None = None,
        timeout: float | None = None,
    ) -> requests.Response:
        """Send one request, retrying refused connections and 5xx; ``check`` raises on any HTTP error."""
        retries = self.retries if retries is None else retries
        timeout = self.timeout if timeout is None else timeout
        last: Exception | None = None
        where = f"{method} {redact_url(self.url)}{path}"
        for attempt in range(retries + 1):
            deadline = time.monotonic() + timeout  # the whole call, not each socket read
            try:
                # redirects are never followed: the API key would travel to wherever the answer points
                r = requests.request(
                    method,
                    self.url + path,
                    headers=self.headers,
                    timeout=timeout,
                    json=json,
                    stream=True,
                    allow_redirects=False,
                )
                setattr(r, _DEADLINE, deadline)
                watchdog = _watchdog(r, deadline)
                if 300 <= r.status_code < 400:
                    r.close()
                    raise EndpointError(
                        f"{where} answered a redirect (HTTP {r.status_code} to "
                        f"{redact_url(r.headers.get('location', '?'))}); not followed",
                        hint="give the server's own address as --url",
                    )
                if not stream:
                    try:
                        _read_bounded(r, where)
                    finally:
                        watchdog.cancel()
            except requests.ConnectionError as e:
                last = e
                if attempt < retries:
                    time.sleep(min(2.0, 0.5 * (attempt + 1)))
                continue
            except requests.Timeout as e:
                raise EndpointError(
                    f"{where} timed out after {timeout:.0f} s",
                    hint="the server is overloaded or stuck; raise --timeout",
                ) from e
            except requests.RequestException as e:  # an invalid URL, a TLS failure, a broken answer
                raise EndpointError(
                    f"{where} failed: {e.__class__.__name__}",
                    hint="check --url (scheme, host, port) and that the server speaks HTTP",
                ) from e
            if r.status_code >= 500 and attempt < retries:
                r.close()
                time.sleep(0.5 * (attempt + 1))
                continue
            if check:
                self.raise_for_status(r, path, json)
            return r
        raise EndpointError(
            f"cannot connect to {redact_url(self.url)} ({last.__class__.__name__}: connection refused or "
            "host unreachable)",
            hint="is the server running, and is --url right (scheme, host, port)?",
        )

    def raise_for_status(self, r: requests.Response, path: str, body: Any = None) -> None:
        """An :class:`HttpError` for an HTTP error answer, with the server's message and what to do about it."""
        if r.status_code < 400:
            return
        detail = error_text(r)
        if r.status_code == 401:
            raise InputError(
                f"{path}: 401 Unauthorized ({detail})",
                hint="the server wants an API key: pass --api-key-env VAR with VAR set to it",
            )
        status = r.status_code
        if status == 404 and isinstance(body, dict) and "model" in body:
            raise HttpError(
                f"{path}: 404, model {body['model']!r} is unknown to the server ({detail})",
                status=status,
                detail=detail,
                hint="check the names /v1/models lists",
            )
        if status >= 500:
            raise HttpError(
                f"{path}: server error {status} ({detail})", status=status, detail=detail, hint="read the server's log"
            )
        raise HttpError(f"{path}: HTTP {status} ({detail})", status=status, detail=detail)

    def json_of(self, r: requests.Response, path: str) -> dict:
        """The JSON object a response carries; anything else (an HTML error page from a proxy that answered
        200, an empty body) is an error that says what came back and from where."""
        try:
            body = r.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise EndpointError(
                f"{r.request.method if r.request else 'GET'} {redact_url(self.url)}{path} answered HTTP "
                f"{r.status_code} with something that is not a JSON object ({_describe_body(r)})",
                hint=_NOT_VLLM_HINT,
            )
        return body

    def unexpected(self, path: str, body: object, wanted: str) -> LoraDeployError:
        """The error for a JSON answer without the fields an OpenAI-compatible server sends."""
        return EndpointError(
            f"{redact_url(self.url)}{path} answered JSON without {wanted}: {str(body)[:200]}",
            hint=_NOT_VLLM_HINT,
        )

    def post(self, path: str, body: dict, **kw) -> dict:
        """POST a JSON body and return the JSON answer (raising on HTTP errors and on non-JSON answers)."""
        return self.json_of(self.request("POST", path, json=body, **kw), path)

    def models(self, **kw) -> list[ServedModel]:
        """What ``/v1/models`` lists, with each adapter's parent and root."""
        body = self.json_of(self.request("GET", "/v1/models", **kw), "/v1/models")
        data = body.get("data")
        if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in data):
            raise self.unexpected("/v1/models", body, "a 'data' list of models with ids")
        return [ServedModel(m["id"], m.get("parent"), m.get("root")) for m in data]

    def ready(self, expected: list[str] | tuple[str, ...], timeout: float = 5.0) -> list[str]:
        """One quick look, never raising: the expected models not yet served (all of them while it is down)."""
        try:
            if requests.get(self.url + "/health", timeout=timeout, allow_redirects=False).status_code != 200:
                return list(expected)
            listed = requests.get(self.url + "/v1/models", headers=self.headers, timeout=timeout, allow_redirects=False)
            if listed.status_code != 200:
                return list(expected)
            ids = {m["id"] for m in listed.json().get("data", [])}
        except (requests.RequestException, ValueError, KeyError, TypeError, AttributeError):
            return list(expected)
        return [m for m in expected if m not in ids]

    def complete(self, model: str, prompt: str, max_tokens: int = 16, **extra) -> dict:
        """A greedy completion's first choice."""
        answer = self.post(
            "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
        )
        try:
            choice = answer["choices"][0]
            if isinstance(choice, dict) and isinstance(choice["text"], str):
                return choice
        except (KeyError, IndexError, TypeError):
            pass
        raise self.unexpected("/v1/completions", answer, "choices[0].text")

    def chat(self, model: str, messages: list[dict], max_tokens: int = 16, **extra) -> str:
        """A greedy chat completion's text."""
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}
        answer = self.post("/v1/chat/completions", body)
        try:
            return answer["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise self.unexpected("/v1/chat/completions", answer, "choices[0].message.content") from None


def api_key_from_env(var: str | None) -> str | None:
    """The API key held in environment variable ``var`` (keys never travel on a command line)."""
    import os

    if not var:
        return None
    key = os.environ.get(var)
    if not key:
        from lora_deploy.errors import InputError

        raise InputError(
            f"--api-key-env {var}: that environment variable is empty or unset",
            hint=f"export {var}=<the server's API key>, or drop --api-key-env",
        )
    return key

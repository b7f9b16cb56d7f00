"""Smoke-test any OpenAI-compatible endpoint: does every model answer, and answer as itself?

Checks: /health; /v1/models lists the base and each expected adapter with the base as parent; a
greedy completion from every model; a chat completion where a chat template exists; streaming gives
the non-streaming text; every adapter answers differently from the base on the probe prompt (a
server that silently answers with the base fails); all models queried at once answer as they do one
at a time (mixed-batch corruption fails); per-model latency. Bounded retries and timeouts throughout.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import requests

from .errors import LoraDeployError

DEFAULT_PROMPT = "Customer: I lost my password.\nAgent:"
EXIT_SMOKE = 8


@dataclass(frozen=True)
class Check:
    """One smoke check's verdict."""

    name: str
    passed: bool
    detail: str = ""
    model: str | None = None
    skipped: bool = False


@dataclass(frozen=True)
class ModelResult:
    """What one model answered, and how fast."""

    model: str
    parent: str | None
    answer: str
    stream_answer: str
    concurrent_answer: str
    ttft_s: float
    total_s: float
    chat_answer: str | None = None


@dataclass(frozen=True)
class SmokeReport:
    """Everything the smoke test saw; ``passed`` only when every check passed."""

    url: str
    base_model: str | None
    models: list[ModelResult]
    checks: list[Check]
    prompt: str
    seconds: float
    passed: bool = field(default=False)


class _Client:
    def __init__(self, url: str, api_key: str | None, timeout: float, retries: int):
        self.url = url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.retries = retries

    def request(self, method: str, path: str, **kw) -> requests.Response:
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                r = requests.request(method, self.url + path, headers=self.headers, timeout=self.timeout, **kw)
            except requests.ConnectionError as e:
                last = e
                time.sleep(min(2.0, 0.5 * (attempt + 1)))
                continue
            except requests.Timeout as e:
                raise LoraDeployError(f"{method} {self.url}{path} timed out after {self.timeout:.0f} s",
                                      exit_code=EXIT_SMOKE,
                                      hint="the server is overloaded or stuck; raise --timeout") from e
            if r.status_code >= 500 and attempt < self.retries:
                time.sleep(0.5 * (attempt + 1))
                continue
            self._raise_for_status(r, path, kw.get("json"))
            return r
        raise LoraDeployError(f"cannot connect to {self.url} ({last.__class__.__name__}: connection refused or "
                              "host unreachable)", exit_code=EXIT_SMOKE,
                              hint="is the server running, and is --url right (scheme, host, port)?")

    def _raise_for_status(self, r: requests.Response, path: str, body: dict | None) -> None:
        if r.status_code < 400:
            return
        detail = _error_text(r)
        if r.status_code == 401:
            raise LoraDeployError(f"{path}: 401 Unauthorized ({detail})", exit_code=EXIT_SMOKE,
                                  hint="the server wants an API key: pass --api-key-env VAR with VAR set to it")
        if r.status_code == 404 and body and "model" in body:
            raise LoraDeployError(f"{path}: 404, model {body['model']!r} is unknown to the server ({detail})",
                                  exit_code=EXIT_SMOKE, hint="check the names /v1/models lists")
        if r.status_code >= 500:
            raise LoraDeployError(f"{path}: server error {r.status_code} ({detail})", exit_code=EXIT_SMOKE,
                                  hint="read the server's log")
        raise LoraDeployError(f"{path}: HTTP {r.status_code} ({detail})", exit_code=EXIT_SMOKE)


def _error_text(r: requests.Response) -> str:
    try:
        body = r.json()
        err = body.get("error", body)
        return str(err.get("message", err) if isinstance(err, dict) else err)[:300]
    except ValueError:
        return r.text[:300]


def run_smoke(url: str, *, models: list[str] | None = None, base_model: str | None = None,
              api_key: str | None = None, prompt: str = DEFAULT_PROMPT, max_tokens: int = 16,
              timeout: float = 60.0, retries: int = 3, chat: bool = True, rounds: int = 3) -> SmokeReport:
    """Run every check against ``url``; ``models`` are the names that must be served (default: all listed)."""
    start = time.monotonic()
    client = _Client(url, api_key, timeout, retries)
    checks: list[Check] = []
    health = client.request("GET", "/health")
    checks.append(Check("health", health.status_code == 200, f"HTTP {health.status_code}"))
    listed = client.request("GET", "/v1/models").json().get("data", [])
    parents = {m["id"]: m.get("parent") for m in listed}
    roots = [m for m, p in parents.items() if not p]
    base = base_model or (roots[0] if len(roots) == 1 else None)
    wanted = list(models) if models else list(parents)
    if base and base not in wanted:
        wanted.insert(0, base)
    missing = [m for m in wanted if m not in parents]
    checks.append(Check("models listed", not missing, "missing: " + ", ".join(missing) if missing
                        else f"{len(parents)} model(s): " + ", ".join(parents)))
    adapters = [m for m in wanted if m != base]
    if base and adapters:
        wrong_parent = [m for m in adapters if m in parents and parents[m] != base]
        checks.append(Check("adapters' parent", not wrong_parent,
                            "parent is not " + base + ": " + ", ".join(wrong_parent) if wrong_parent
                            else f"all adapters report {base}"))
    present = [m for m in wanted if m in parents]

    def complete(model: str) -> str:
        r = client.request("POST", "/v1/completions", json={"model": model, "prompt": prompt,
                                                             "max_tokens": max_tokens, "temperature": 0})
        return r.json()["choices"][0]["text"]

    answers = {m: complete(m) for m in present}  # one at a time
    results = []
    for m in present:
        stream_text, ttft, total = _stream(client, m, prompt, max_tokens)
        results.append([m, stream_text, ttft, total])
    # all at once, twice each, in a few rounds: mixed batches form, and a batch that corrupts one model's
    # rows (a wrong LoRA slot for base requests, say) shows as an answer that differs from its solo answer
    together = {m: answers[m] for m in present}
    burst = present * 2
    with ThreadPoolExecutor(max_workers=max(1, len(burst))) as pool:
        for _ in range(rounds):
            for m, text in zip(burst, pool.map(complete, burst)):
                if text != answers[m]:
                    together[m] = text
    chat_answers: dict[str, str | None] = {m: None for m in present}
    if chat and present:
        try:
            for m in present:
                r = client.request("POST", "/v1/chat/completions", json={
                    "model": m, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                    "temperature": 0})
                chat_answers[m] = r.json()["choices"][0]["message"]["content"] or ""
            checks.append(Check("chat completion", all(isinstance(v, str) for v in chat_answers.values()),
                                "every model answered a chat request"))
        except LoraDeployError as e:
            if "chat template" in e.message.lower() or "chat_template" in e.message.lower():
                checks.append(Check("chat completion", True, "skipped: the tokenizer has no chat template",
                                    skipped=True))
            else:
                checks.append(Check("chat completion", False, e.message))
    models_out = []
    for m, stream_text, ttft, total in results:
        checks.append(Check("greedy completion", bool(answers[m].strip()), repr(answers[m]), m))
        checks.append(Check("stream = non-stream", stream_text == answers[m],
                            "same text" if stream_text == answers[m] else f"stream gave {stream_text!r}", m))
        checks.append(Check("concurrent = sequential", together[m] == answers[m],
                            "same text" if together[m] == answers[m] else
                            f"in a mixed batch: {together[m]!r} (alone: {answers[m]!r})", m))
        models_out.append(ModelResult(m, parents.get(m), answers[m], stream_text, together[m], ttft, total,
                                      chat_answers.get(m)))
    if base in answers:
        for m in adapters:
            if m in answers:
                differs = answers[m] != answers[base]
                checks.append(Check("adapter differs from base", differs,
                                    "differs" if differs else "answers exactly like the base: is it applied?", m))
    passed = all(c.passed for c in checks)
    return SmokeReport(client.url, base, models_out, checks, prompt, round(time.monotonic() - start, 3), passed)


def iter_sse(response: requests.Response):
    """The JSON chunks of an OpenAI-style server-sent-event stream, up to `data: [DONE]`."""
    for line in response.iter_lines(decode_unicode=True):
        if not line or not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def _stream(client: _Client, model: str, prompt: str, max_tokens: int) -> tuple[str, float, float]:
    start = time.monotonic()
    ttft = None
    parts = []
    r = client.request("POST", "/v1/completions", stream=True, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True})
    with r:
        for chunk in iter_sse(r):
            text = chunk["choices"][0].get("text", "") if chunk.get("choices") else ""
            if text and ttft is None:
                ttft = time.monotonic() - start
            parts.append(text)
    total = time.monotonic() - start
    return "".join(parts), round(ttft if ttft is not None else total, 4), round(total, 4)


def format_report(report: SmokeReport) -> str:
    lines = [f"Smoke test of {report.url} (prompt {report.prompt!r})", ""]
    width = max((len(m.model) for m in report.models), default=5)
    lines.append(f"{'model'.ljust(width)}  {'parent'.ljust(12)}  {'TTFT':>7}  {'total':>7}  answer")
    for m in report.models:
        lines.append(f"{m.model.ljust(width)}  {str(m.parent or '-')[:12].ljust(12)}  {m.ttft_s * 1000:>5.0f}ms  "
                     f"{m.total_s * 1000:>5.0f}ms  {m.answer!r}")
    lines.append("")
    for c in report.checks:
        mark = "SKIP" if c.skipped else ("PASS" if c.passed else "FAIL")
        lines.append(f"  {mark}  {c.name}{f' [{c.model}]' if c.model else ''}: {c.detail}")
    lines.append("")
    lines.append(f"{'PASSED' if report.passed else 'FAILED'}: {sum(c.passed for c in report.checks)} of "
                 f"{len(report.checks)} checks in {report.seconds:.1f} s")
    return "\n".join(lines)

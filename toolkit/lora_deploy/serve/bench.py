"""Concurrent load against an OpenAI-compatible endpoint: TTFT, inter-token latency, throughput per model.

A fixed pool of workers streams completions (``ignore_eos`` so every answer has the same length,
the way `vllm bench serve` measures); requests are spread round-robin over the given models, so a
multi-adapter server is measured under mixed batches. The number of requests and the run time are
bounded; nothing here runs unless asked.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests

from lora_deploy.errors import LoraDeployError
from lora_deploy.prompts import DEFAULT_PROMPT
from lora_deploy.serve.client import Endpoint, iter_sse


@dataclass(frozen=True, kw_only=True)
class ModelStats:
    """Latency and throughput of one model under the shared load."""

    model: str
    requests: int  # answered in full
    failures: int  # sent and failed (HTTP error, refused connection, broken stream, timeout)
    not_sent: int  # never sent: the run's time limit (``max_seconds``) came first
    output_tokens: int
    ttft_p50_ms: float | None  # None: no request of this model was answered
    ttft_p90_ms: float | None
    itl_p50_ms: float | None
    itl_p90_ms: float | None
    e2e_p50_ms: float | None
    tokens_per_s: float
    failure_reasons: dict[str, int]  # error message -> how many requests failed with it


@dataclass(frozen=True, kw_only=True)
class BenchReport:
    """The whole run: settings, wall time, and per-model and overall numbers."""

    url: str
    concurrency: int
    max_tokens: int
    seconds: float
    models: list[ModelStats]
    total_tokens_per_s: float
    requests_per_s: float
    passed: bool  # at least one answer, and no request failed

    @property
    def failures(self) -> int:
        return sum(m.failures for m in self.models)

    @property
    def not_sent(self) -> int:
        return sum(m.not_sent for m in self.models)


def _pct(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank), or None when nothing was measured (never NaN: ``--json`` stays JSON)."""
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[k]


def _one(server: Endpoint, model: str, prompt: str, max_tokens: int):
    start = time.monotonic()
    stamps: list[float] = []
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    tokens = 0
    with server.request("POST", "/v1/completions", json=body, stream=True, retries=0) as r:
        for chunk in iter_sse(r):
            if chunk.get("usage"):
                tokens = chunk["usage"].get("completion_tokens", tokens)
            if chunk.get("choices"):  # one chunk per decoding step (ignored EOS steps may carry empty text)
                stamps.append(time.monotonic())
    end = time.monotonic()
    ttft = (stamps[0] - start) if stamps else end - start
    tokens = tokens or len(stamps)
    # inter-token latency per request, as vLLM's own benchmark defines TPOT: chunks can arrive in bursts,
    # so gaps between single chunks say little; the decode time spread over the tokens does
    itl = (end - start - ttft) / (tokens - 1) if tokens > 1 else float("nan")
    return ttft, itl, end - start, tokens


def run_load(
    url: str,
    models: list[str],
    *,
    concurrency: int = 8,
    requests_per_model: int = 16,
    max_tokens: int = 32,
    prompt: str = DEFAULT_PROMPT,
    api_key: str | None = None,
    timeout: float = 120.0,
    max_seconds: float = 600.0,
) -> BenchReport:
    """Send ``requests_per_model`` streamed requests per model, ``concurrency`` at a time."""
    server = Endpoint(url, api_key, timeout=timeout)
    url = server.url
    _one(server, models[0], prompt, 4)  # warm-up: first-request costs are not load
    jobs = [m for _ in range(requests_per_model) for m in models]
    results: dict[str, list] = {m: [] for m in models}
    reasons: dict[str, Counter] = {m: Counter() for m in models}
    not_sent = {m: 0 for m in models}
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds

    def work(model: str) -> None:
        if time.monotonic() > deadline:
            with lock:
                not_sent[model] += 1
            return
        try:
            res = _one(server, model, prompt, max_tokens)
        except (requests.RequestException, LoraDeployError) as e:
            with lock:
                reasons[model][str(getattr(e, "message", e)).split("\n")[0][:200]] += 1
            return
        with lock:
            results[model].append(res)

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(work, jobs))
    wall = time.monotonic() - start
    stats = []
    for m in models:
        rs = results[m]
        ttfts = [r[0] * 1000 for r in rs]
        itls = [r[1] * 1000 for r in rs if r[1] == r[1]]
        e2e = [r[2] * 1000 for r in rs]
        toks = sum(r[3] for r in rs)
        stats.append(
            ModelStats(
                model=m,
                requests=len(rs),
                failures=sum(reasons[m].values()),
                not_sent=not_sent[m],
                output_tokens=toks,
                ttft_p50_ms=_ms(_pct(ttfts, 0.5)),
                ttft_p90_ms=_ms(_pct(ttfts, 0.9)),
                itl_p50_ms=_ms(_pct(itls, 0.5)),
                itl_p90_ms=_ms(_pct(itls, 0.9)),
                e2e_p50_ms=_ms(_pct(e2e, 0.5)),
                tokens_per_s=round(toks / wall, 2),
                failure_reasons=dict(reasons[m]),
            )
        )
    total = sum(s.output_tokens for s in stats)
    done = sum(s.requests for s in stats)
    passed = done > 0 and not any(s.failures for s in stats)
    return BenchReport(
        url=url,
        concurrency=concurrency,
        max_tokens=max_tokens,
        seconds=round(wall, 3),
        models=stats,
        total_tokens_per_s=round(total / wall, 2),
        requests_per_s=round(done / wall, 3),
        passed=passed,
    )


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _fmt_ms(value: float | None, width: int, digits: int = 0) -> str:
    return f"{'-':>{width}}  " if value is None else f"{value:>{width}.{digits}f}ms"


def format_bench(report: BenchReport) -> str:
    lines = [
        f"Load on {report.url}: {report.concurrency} concurrent, {report.max_tokens} tokens each, "
        f"{report.seconds:.1f} s",
        "",
        f"{'model':<18}{'ok':>5}{'fail':>5}{'unsent':>7}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p90':>10}"
        f"{'ITL p50':>9}{'ITL p90':>9}{'E2E p50':>9}",
    ]
    for s in report.models:
        lines.append(
            f"{s.model:<18}{s.requests:>5}{s.failures:>5}{s.not_sent:>7}{s.tokens_per_s:>9.1f}"
            f"{_fmt_ms(s.ttft_p50_ms, 8)}{_fmt_ms(s.ttft_p90_ms, 8)}{_fmt_ms(s.itl_p50_ms, 7, 1)}"
            f"{_fmt_ms(s.itl_p90_ms, 7, 1)}{_fmt_ms(s.e2e_p50_ms, 7)}"
        )
    lines.append(f"\ntotal: {report.total_tokens_per_s:.1f} output tokens/s, {report.requests_per_s:.2f} requests/s")
    for s in report.models:
        for reason, n in s.failure_reasons.items():
            lines.append(f"  {s.model}: {n} failed: {reason}")
    if report.not_sent:
        lines.append(f"  {report.not_sent} request(s) not sent: the run reached its time limit first")
    lines.append(
        "PASSED: every request answered"
        if report.passed
        else f"FAILED: {report.failures} request(s) failed"
        if report.failures
        else "FAILED: no request answered"
    )
    return "\n".join(lines)

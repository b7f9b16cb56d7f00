"""The serving half of `make demo`: serve the merged checkpoint, then the adapters dynamically, and compare.

    python -m lora_deploy.examples.demo --example example --merged demo-out/merged-classify

Both deployments are started by the same launcher as `lora-deploy merged --serve` and `lora-deploy
dynamic`, smoke-tested, asked the example's tickets, and stopped. For the real SmolLM2 example the
questions are chat completions through the official ``openai`` client, each with its task's system line;
for the tiny example, plain completions. The table at the end shows the merged model and the dynamically
served ``classify`` adapter giving the same answers (both float32, greedy).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, cast

from lora_deploy.errors import EXIT_SMOKE
from lora_deploy.serve.flags import ServeConfig, ServedAdapter
from lora_deploy.serve.launcher import ServeOptions, VllmServer, plan_launch
from lora_deploy.serve.settings import EngineSettings
from lora_deploy.serve.smoke import format_report, run_smoke


def _questions(real: bool) -> list[tuple[str, str]]:
    """(label, question) pairs: tickets for the real model's chat, prompts for the tiny model."""
    if real:
        from lora_deploy.examples.smollm2 import DEMO_TICKETS

        return [(t, t) for t in DEMO_TICKETS]
    from lora_deploy.examples.tiny import PROMPT_TEMPLATE, TICKETS

    return [(ms[1], PROMPT_TEMPLATE.format(message=ms[1])) for ms in TICKETS.values()]


def _answers(url: str, models: dict[str, str], questions: list[tuple[str, str]], real: bool) -> dict[str, list[str]]:
    """Each model's greedy answers; ``models`` maps a served name to its task (the system line it gets)."""
    from lora_deploy.serve.client import Endpoint

    if not real:
        server = Endpoint(url)
        return {m: [server.complete(m, q, 16)["text"] for _, q in questions] for m in models}
    from openai import OpenAI

    from lora_deploy.examples.smollm2 import messages

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=2)
    out: dict[str, list[str]] = {}
    for m, task in models.items():
        out[m] = [
            client.chat.completions.create(model=m, messages=cast(Any, messages(task, q)), max_tokens=16, temperature=0)
            .choices[0]
            .message.content
            or ""
            for _, q in questions
        ]
    return out


def _run(cfg: ServeConfig, log: Path, models: dict[str, str], questions, real: bool) -> dict[str, list[str]]:
    plan = plan_launch(cfg)
    print(f"\n== Serving {', '.join(plan.expected_models)} with {plan.install} (log: {log})", flush=True)
    start = time.monotonic()
    with VllmServer(plan, log_path=log) as server:
        server.wait_ready(ServeOptions().timeout)
        print(f"ready in {time.monotonic() - start:.0f} s", flush=True)
        report = run_smoke(plan.url, models=plan.expected_models, base_model=plan.expected_models[0])
        print(format_report(report), flush=True)
        if not report.passed:
            raise SystemExit(EXIT_SMOKE)
        return _answers(plan.url, models, questions, real)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--example", type=Path, default=Path("example"))
    ap.add_argument("--merged", type=Path, default=Path("demo-out/merged-classify"))
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args(argv)
    try:
        real = json.loads((args.example / "example.json").read_text()).get("model") == "smollm2"
    except (OSError, ValueError):
        real = False
    questions = _questions(real)
    logs = args.merged.parent
    base_name = "smollm2" if real else "support-base"
    merged = _run(
        ServeConfig(
            model=str(args.merged.resolve()),
            served_model_name="merged-classify",
            port=args.port,
            engine=EngineSettings(dtype="float32"),
        ),
        logs / "vllm-merged.log",
        {"merged-classify": "classify"},
        questions,
        real,
    )
    ranks = {"classify": 8, "reply": 16}
    adapters = tuple(ServedAdapter(n, str((args.example / "adapters" / n).resolve()), r) for n, r in ranks.items())
    dynamic = _run(
        ServeConfig(
            model=str((args.example / "base").resolve()),
            served_model_name=base_name,
            adapters=adapters,
            port=args.port,
            engine=EngineSettings(dtype="float32"),
        ),
        logs / "vllm-dynamic.log",
        {base_name: "classify", "classify": "classify", "reply": "reply"},
        questions,
        real,
    )
    kind = "chat completions through the openai client" if real else "completions"
    print(f"\n== Merged checkpoint vs the same adapter served dynamically (float32, greedy, {kind})")
    same = 0
    for i, (label, _) in enumerate(questions):
        m, d, b = merged["merged-classify"][i], dynamic["classify"][i], dynamic[base_name][i]
        same += m == d
        print(
            f"  {label:<34} base={b[:28]!r:<32} merged={m!r:<13} dynamic={d!r:<13} {'MATCH' if m == d else 'DIFFERENT'}"
        )
    if real:
        print("\n  reply adapter (dynamic):")
        for i, (label, _) in enumerate(questions):
            print(f"  {label:<34} {dynamic['reply'][i]!r}")
    differ = sum(dynamic[base_name][i] != dynamic["classify"][i] for i in range(len(questions)))
    print(
        f"\n{same} of {len(questions)} answers match between the merged and the dynamic deployment; "
        f"the adapter changes {differ} of {len(questions)} base answers."
    )
    return 0 if same == len(questions) else 1


if __name__ == "__main__":
    sys.exit(main())

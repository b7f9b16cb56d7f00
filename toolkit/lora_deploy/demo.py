"""The serving half of `make demo`: serve the merged checkpoint, then the adapters dynamically, and compare.

    python -m lora_deploy.demo --example example --merged demo-out/merged-classify

Both deployments are started by the same launcher as `lora-deploy merged --serve` and `lora-deploy
dynamic`, smoke-tested, asked the example's tickets, and stopped. The table at the end shows the
merged model and the dynamically served `classify` adapter giving the same answers (float32, so the
comparison is exact).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .client import Endpoint
from .errors import EXIT_SMOKE
from .example import PROMPT_TEMPLATE, TICKETS
from .launcher import ServeOptions, VllmServer, plan_launch
from .serving import ServeConfig, ServedAdapter
from .smoke import format_report, run_smoke

PROMPTS = [PROMPT_TEMPLATE.format(message=ms[1]) for ms in TICKETS.values()]


def _answers(server: Endpoint, models: list[str]) -> dict[str, list[str]]:
    return {m: [server.complete(m, p, 16)["text"] for p in PROMPTS] for m in models}


def _run(cfg: ServeConfig, log: Path) -> dict[str, list[str]]:
    plan = plan_launch(cfg)
    print(f"\n== Serving {', '.join(plan.expected_models)} with {plan.install} (log: {log})", flush=True)
    with VllmServer(plan, log_path=log) as server:
        server.wait_ready(ServeOptions().timeout)
        report = run_smoke(plan.url, models=plan.expected_models, base_model=plan.expected_models[0])
        print(format_report(report), flush=True)
        if not report.passed:
            raise SystemExit(EXIT_SMOKE)
        return _answers(server.endpoint(), plan.expected_models)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--example", type=Path, default=Path("example"))
    ap.add_argument("--merged", type=Path, default=Path("demo-out/merged-classify"))
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args(argv)
    logs = args.merged.parent
    merged = _run(ServeConfig(model=str(args.merged.resolve()), served_model_name="merged-classify",
                              port=args.port, dtype="float32"), logs / "vllm-merged.log")
    adapters = tuple(ServedAdapter(n, str((args.example / "adapters" / n).resolve()), r)
                     for n, r in (("classify", 8), ("reply", 16)))
    dynamic = _run(ServeConfig(model=str((args.example / "base").resolve()), served_model_name="support-base",
                               adapters=adapters, port=args.port, dtype="float32"), logs / "vllm-dynamic.log")
    print("\n== Merged checkpoint vs the same adapter served dynamically (float32, greedy)")
    same = 0
    for i, prompt in enumerate(PROMPTS):
        m, d = merged["merged-classify"][i], dynamic["classify"][i]
        same += m == d
        message = prompt.split("\n")[0].removeprefix("Customer: ")
        print(f"  {message:<40} base={dynamic['support-base'][i][:22]!r:<26} merged={m!r:<14} dynamic={d!r:<14} "
              f"{'MATCH' if m == d else 'DIFFERENT'}")
    print(f"\n{same} of {len(PROMPTS)} answers match between the merged and the dynamic deployment.")
    return 0 if same == len(PROMPTS) else 1


if __name__ == "__main__":
    sys.exit(main())

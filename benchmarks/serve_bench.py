"""Serving benchmark: the merged checkpoint vs the same adapter served dynamically, side by side.

On the built-in example (built if missing), this starts real vLLM three times in a row on this
machine, each with lora-deploy's launcher, and drives the same concurrent load through
`lora_deploy.serve.bench.run_load`:

  merged          the merged `classify` checkpoint, no LoRA
  dynamic         the base with --enable-lora, all requests to the `classify` adapter
  dynamic-mixed   the same server, requests spread over base, classify and reply

It prints a table and the merged/dynamic ratios, and writes a PNG plot next to the JSON results.

    .venv/bin/python benchmarks/serve_bench.py --out docs/serve-bench
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from lora_deploy.examples.tiny import build_example
from lora_deploy.merge import MergeConfig, run_merge
from lora_deploy.serve.bench import format_bench, run_load
from lora_deploy.serve.flags import ServeConfig, ServedAdapter
from lora_deploy.serve.launcher import VllmServer, plan_launch
from lora_deploy.serve.settings import EngineSettings


def measure(cfg: ServeConfig, models: list[str], args, log: Path):
    plan = plan_launch(cfg)
    with VllmServer(plan, log_path=log) as server:
        server.wait_ready(600)
        return run_load(
            plan.url, models, concurrency=args.concurrency, requests_per_model=args.requests, max_tokens=args.max_tokens
        )


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    names = list(results)
    tput = [results[n]["total_tokens_per_s"] for n in names]
    itl = [results[n]["models"][0]["itl_p50_ms"] for n in names]
    ttft = [results[n]["models"][0]["ttft_p50_ms"] for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    colors = ["#4c72b0", "#dd8452", "#55a868"][: len(names)]
    for ax, values, title in zip(
        axes,
        (tput, itl, ttft),
        ("output tokens/s (higher is better)", "inter-token latency p50, ms", "time to first token p50, ms"),
        strict=True,
    ):
        ax.bar(names, values, color=colors)
        ax.set_title(title, fontsize=10)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=9)
        ax.tick_params(axis="x", labelsize=9)
    fig.suptitle("vLLM (CPU build): merged checkpoint vs dynamic LoRA, tiny example model", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--example", type=Path, default=Path("example"))
    ap.add_argument("--out", type=Path, default=Path("docs/serve-bench"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=24, help="requests per model")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--port", type=int, default=8790)
    args = ap.parse_args()
    ex = build_example(args.example)
    args.out.mkdir(parents=True, exist_ok=True)
    merged_dir = args.out / "merged-classify"
    run_merge(
        MergeConfig(
            base=str(ex.base), adapters=(str(ex.adapters["classify"]),), output=merged_dir, dtype=args.dtype, force=True
        )
    )
    merged_cfg = ServeConfig(
        model=str(merged_dir.resolve()),
        served_model_name="merged",
        port=args.port,
        engine=EngineSettings(dtype=args.dtype),
    )
    dynamic_cfg = ServeConfig(
        model=str(ex.base.resolve()),
        served_model_name="base",
        port=args.port,
        engine=EngineSettings(dtype=args.dtype),
        adapters=(
            ServedAdapter("classify", str(ex.adapters["classify"].resolve()), 8),
            ServedAdapter("reply", str(ex.adapters["reply"].resolve()), 16),
        ),
    )
    results = {}
    results["merged"] = measure(merged_cfg, ["merged"], args, args.out / "vllm-merged.log")
    print(format_bench(results["merged"]), "\n", flush=True)
    plan = plan_launch(dynamic_cfg)
    with VllmServer(plan, log_path=args.out / "vllm-dynamic.log") as server:
        server.wait_ready(600)
        for name, models in (("dynamic", ["classify"]), ("dynamic-mixed", ["classify", "reply", "base"])):
            results[name] = run_load(
                plan.url,
                models,
                concurrency=args.concurrency,
                requests_per_model=args.requests,
                max_tokens=args.max_tokens,
            )
            print(format_bench(results[name]), "\n", flush=True)
    data = {k: asdict(v) for k, v in results.items()}
    (args.out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    m, d = data["merged"], data["dynamic"]
    print("merged vs dynamic (one adapter, same load):")
    print(
        f"  throughput  {m['total_tokens_per_s']:.1f} vs {d['total_tokens_per_s']:.1f} tok/s -> merged is "
        f"{m['total_tokens_per_s'] / d['total_tokens_per_s']:.2f}x"
    )
    print(
        f"  ITL p50     {m['models'][0]['itl_p50_ms']:.1f} vs {d['models'][0]['itl_p50_ms']:.1f} ms -> dynamic is "
        f"{d['models'][0]['itl_p50_ms'] / m['models'][0]['itl_p50_ms']:.2f}x slower per token"
    )
    print(f"  TTFT p50    {m['models'][0]['ttft_p50_ms']:.0f} vs {d['models'][0]['ttft_p50_ms']:.0f} ms")
    if plot(data, args.out / "serve-bench.png"):
        print(f"plot: {args.out / 'serve-bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

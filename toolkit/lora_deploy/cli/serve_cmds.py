"""`lora-deploy dynamic` and `check`: serve the base with every adapter on real vLLM, after pre-flight."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lora_deploy.cli._launch import launch, report_written
from lora_deploy.cli._options import (
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
from lora_deploy.output import out
from lora_deploy.serve.settings import EngineSettings, LoraSettings

DYNAMIC_EXAMPLES = """Examples:

```
lora-deploy dynamic --base ./base --adapter classify=./adapters/classify --adapter reply=./adapters/reply
lora-deploy dynamic --base meta-llama/Llama-3.1-8B --adapter sql=org/sql-lora --dry-run
lora-deploy dynamic --base ./base --adapter-store ./store --max-lora-rank 16   # then: adapters publish
LORA_DEPLOY_API_KEY=... lora-deploy dynamic --base ./base --adapter a=./a --allow-runtime-adapters \\
    --api-key-env LORA_DEPLOY_API_KEY -- --gpu-memory-utilization 0.85
```
"""


@settings_options(LoraSettings, before="served_model_name")
@settings_options(EngineSettings, before="served_model_name", flags={"dtype": ("--serve-dtype", "--dtype")})
def dynamic(
    ctx: typer.Context,
    base: Annotated[
        str, typer.Option(help="Base model: a local folder, hub id or s3://BUCKET/PREFIX (served untouched).")
    ],
    adapter: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME=PATH", help="NAME=PATH (folder, hub id or s3:// URL); repeat for several."),
    ] = None,
    adapter_store: Annotated[
        str | None,
        typer.Option(
            help="Also serve every adapter published into this folder, now or later, with no restart (vLLM's "
            "filesystem resolver; created if missing; see `adapters publish`)."
        ),
    ] = None,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    served_model_name: ServedNameOpt = None,
    allow_runtime_adapters: Annotated[
        bool,
        typer.Option(
            "--allow-runtime-adapters", help="Let API clients load/unload adapters at run time (needs --api-key-env)."
        ),
    ] = False,
    runtime_adapter_slots: Annotated[
        int, typer.Option(min=1, help="LoRA slots reserved for runtime adapters (with --allow-runtime-adapters).")
    ] = 1,
    api_key_env: ApiKeyEnvOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the exact vLLM command and environment, then exit.")
    ] = False,
    manifests: Annotated[
        Path | None,
        typer.Option(help="Write Kubernetes manifests for this deployment here (with --dry-run: nothing starts)."),
    ] = None,
    force: ForceOpt = False,
    no_smoke: NoSmokeOpt = False,
    exit_after_smoke: ExitAfterSmokeOpt = False,
    timeout: StartTimeoutOpt = 600.0,
    log: LogOpt = None,
    prompt: PromptOpt = None,
    json: JsonOpt = False,
    **settings: Any,  # the fields of LoraSettings and EngineSettings, one option each
) -> None:
    """Serve the base with vLLM --enable-lora and every adapter as its own model name.

    Every LoRA flag is derived from the adapters; pre-flight refuses what vLLM would reject or get
    wrong before anything starts; the endpoint is smoke-tested before "ready". Arguments after -- go
    to vLLM unchanged. Exit codes: 3 bad input, 4 adapter refused, 7 vLLM failed or port busy, 8 smoke test
    failed (the table: README, Exit codes).
    """
    out.set_mode(json_mode=json)
    from lora_deploy.hub import resolve_headers
    from lora_deploy.k8s.local import dynamic_spec, write_deployment
    from lora_deploy.serve.flows import parse_named_adapters, plan_dynamic

    if allow_runtime_adapters:
        out.warn(
            "runtime adapters are on: anyone holding the API key can make the server load any adapter path it can read"
        )
    deployment = plan_dynamic(
        resolve_headers(base, kind="base model"),  # resolved once, here: every step below takes the record
        parse_named_adapters(adapter or []),
        served_model_name=served_model_name,
        check_port=not dry_run,
        download=not dry_run,
        adapter_store=adapter_store,
        host=host,
        port=port,
        lora=settings_from(LoraSettings, settings),
        engine=settings_from(EngineSettings, settings),
        allow_runtime_adapters=allow_runtime_adapters,
        runtime_slots=runtime_adapter_slots,
        api_key_env=api_key_env,
        extra_args=tuple(ctx.args),
    )
    for note in deployment.preflight.notes:
        out.info(f"Note: {note}")
    for warning in deployment.warnings:
        out.warn(warning)
    if manifests is not None:
        report_written(write_deployment(dynamic_spec(base, deployment), manifests, force=force))
    launch(
        deployment.config,
        dry_run=dry_run,
        no_smoke=no_smoke,
        exit_after_smoke=exit_after_smoke,
        timeout=timeout,
        log=log,
        prompt=prompt,
        preflight=deployment.preflight,
    )


@settings_options(LoraSettings, before="json", only=("max_lora_rank",))
def check(
    base: Annotated[str, typer.Option(help="Base model: a local folder, hub id or s3://BUCKET/PREFIX.")],
    adapter: Annotated[
        list[str],
        typer.Option(metavar="NAME=PATH", help="NAME=PATH (folder, hub id or s3:// URL); repeat for several."),
    ],
    json: JsonOpt = False,
    **settings: Any,  # LoraSettings.max_lora_rank: the rank limit pre-flight checks against
) -> None:
    """Pre-flight only: would vLLM serve these adapters on this base, and correctly? Exit 0 yes; 3 when an adapter is
    unreadable or does not fit the base; 4 when it uses what vLLM cannot serve."""
    out.set_mode(json_mode=json)
    from lora_deploy.errors import EXIT_INPUT, EXIT_UNSUPPORTED
    from lora_deploy.serve.flows import parse_named_adapters
    from lora_deploy.serve.preflight import INPUT_RULES, check_adapters

    lora = settings_from(LoraSettings, settings)
    report = check_adapters(base, parse_named_adapters(adapter), max_lora_rank=lora.max_lora_rank)
    rows = [(a.name, f"OK  rank {a.rank}" + ("  (normalised copy)" if a.normalised else "")) for a in report.accepted]
    rows += [(r.adapter, f"REFUSED [{r.rule}] {r.message}\n{' ' * 4}fix: {r.fix}") for r in report.refusals]
    out.result(report, out.table(rows) + "\n" + ("\n".join(report.notes)))
    if not report.passed:
        broken = any(r.rule in INPUT_RULES for r in report.refusals)
        out.error(
            f"pre-flight refused {len({r.adapter for r in report.refusals})} adapter(s)"
            + (" (a broken or mismatched input)" if broken else "")
        )
        raise typer.Exit(EXIT_INPUT if broken else EXIT_UNSUPPORTED)

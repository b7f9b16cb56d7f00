"""`lora-deploy dynamic`, `check`, `smoke` and `adapters`: serve real vLLM and prove it answers."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import InputError
from ..output import out
from ._options import JsonOpt

DYNAMIC_EXAMPLES = """Examples:

```
lora-deploy dynamic --base ./base --adapter classify=./adapters/classify --adapter reply=./adapters/reply
lora-deploy dynamic --base meta-llama/Llama-3.1-8B --adapter sql=org/sql-lora --dry-run
LORA_DEPLOY_API_KEY=... lora-deploy dynamic --base ./base --adapter a=./a --allow-runtime-adapters \\
    --api-key-env LORA_DEPLOY_API_KEY -- --gpu-memory-utilization 0.85
```
"""

# Serving options shared by `dynamic` and `merged --serve`
HostOpt = Annotated[str, typer.Option(help="Address vLLM listens on.")]
PortOpt = Annotated[int, typer.Option(help="Port vLLM listens on.")]
ServeDtypeOpt = Annotated[str, typer.Option("--serve-dtype", "--dtype", help="vLLM --dtype: auto, float16, "
                                            "bfloat16 or float32.")]
MaxLorasOpt = Annotated[Optional[int], typer.Option(help="Adapters in one batch (default: derived).")]
MaxCpuLorasOpt = Annotated[Optional[int], typer.Option(help="Adapters cached in CPU memory (default: derived).")]
MaxRankOpt = Annotated[Optional[int], typer.Option(help="vLLM --max-lora-rank (default: smallest that fits).")]
MaxLenOpt = Annotated[Optional[int], typer.Option(help="vLLM --max-model-len (default: vLLM's; small on CPU).")]
ServedNameOpt = Annotated[Optional[str], typer.Option(help="Model name of the base on the API (default: from "
                                                      "the folder or hub id).")]
ApiKeyEnvOpt = Annotated[Optional[str], typer.Option(help="Environment variable holding the API key (never "
                                                     "pass a key on the command line).")]
DryRunOpt = Annotated[bool, typer.Option(help="Print the exact vLLM command and environment, then exit.")]
NoSmokeOpt = Annotated[bool, typer.Option("--no-smoke", help="Skip the smoke test after start-up.")]
ExitAfterSmokeOpt = Annotated[bool, typer.Option(help="Stop vLLM and exit once the smoke test has run (CI).")]
TimeoutOpt = Annotated[float, typer.Option(help="Seconds to wait for vLLM to serve every model.")]
LogOpt = Annotated[Optional[Path], typer.Option(help="vLLM's log file (default: a temporary file).")]
PromptOpt = Annotated[Optional[str], typer.Option(help="Probe prompt for the smoke test.")]


def parse_named(values: list[str]) -> dict[str, str]:
    named: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--adapter {v!r} is not NAME=PATH", hint="for example --adapter classify=./adapters/c")
        if name in named:
            raise InputError(f"adapter name {name!r} is given twice")
        named[name] = path
    return named


def default_served_name(base: str) -> str:
    p = Path(base)
    return p.resolve().name if p.exists() else base


def launch(cfg, *, dry_run: bool, no_smoke: bool, exit_after_smoke: bool, timeout: float, log: Optional[Path],
           prompt: Optional[str], preflight=None) -> None:
    """Shared by `dynamic` and `merged --serve`: dry-run or serve, then print the smoke report."""
    from ..launcher import ServeOptions, plan_launch, serve
    from ..serving import redact_env
    from ..smoke import format_report

    plan = plan_launch(cfg)
    for note in plan.notes:
        out.info(f"Note: {note}")
    command = " ".join(shlex.quote(a) for a in plan.argv)
    env_text = " ".join(f"{k}={shlex.quote(v)}" for k, v in redact_env(plan.env).items())
    if dry_run:
        data = {"argv": plan.argv, "env": redact_env(plan.env), "url": plan.url, "models": plan.expected_models,
                "vllm": plan.install, "notes": plan.notes}
        if preflight is not None:
            data["preflight"] = preflight
        out.result(data, f"# {plan.install}\n{env_text} \\\n  {command}")
        return

    def started(server) -> None:
        out.info(f"Started {plan.install} (process group {server.pgid}); log: {server.log_path}")
        out.info(f"Waiting for {plan.url}/health and /v1/models to list: {', '.join(plan.expected_models)}")

    def ready(report) -> None:
        if report is None:
            out.result({"url": plan.url, "models": plan.expected_models, "smoke": None},
                       f"Ready: {plan.url} serves {', '.join(plan.expected_models)} (smoke test skipped)")
        else:
            out.result({"url": plan.url, "models": plan.expected_models, "smoke": report}, format_report(report))
        if not exit_after_smoke and (report is None or report.passed):
            out.info(f"Serving at {plan.url}/v1 until Ctrl-C or SIGTERM.")

    code = serve(plan, ServeOptions(log_path=log, timeout=timeout, smoke=not no_smoke,
                                    exit_after_smoke=exit_after_smoke, prompt=prompt),
                 on_started=started, on_ready=ready)
    if code:
        raise typer.Exit(code)


def dynamic(
    ctx: typer.Context,
    base: Annotated[str, typer.Option(help="Base model: local folder or hub id (served untouched).")],
    adapter: Annotated[list[str], typer.Option(help="NAME=PATH (folder or hub id); repeat for several.")],
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    dtype: ServeDtypeOpt = "auto",
    max_loras: MaxLorasOpt = None,
    max_cpu_loras: MaxCpuLorasOpt = None,
    max_lora_rank: MaxRankOpt = None,
    max_model_len: MaxLenOpt = None,
    served_model_name: ServedNameOpt = None,
    allow_runtime_adapters: Annotated[bool, typer.Option(
        help="Let API clients load/unload adapters at run time (needs --api-key-env).")] = False,
    runtime_adapter_slots: Annotated[int, typer.Option(
        min=1, help="LoRA slots reserved for runtime adapters (with --allow-runtime-adapters).")] = 1,
    api_key_env: ApiKeyEnvOpt = None,
    dry_run: DryRunOpt = False,
    manifests: Annotated[Optional[Path], typer.Option(
        help="Write Kubernetes manifests for this deployment here (with --dry-run: nothing starts).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing manifests.")] = False,
    no_smoke: NoSmokeOpt = False,
    exit_after_smoke: ExitAfterSmokeOpt = False,
    timeout: TimeoutOpt = 600.0,
    log: LogOpt = None,
    prompt: PromptOpt = None,
    json: JsonOpt = False,
) -> None:
    """Serve the base with vLLM --enable-lora and every adapter as its own model name.

    Every LoRA flag is derived from the adapters; pre-flight refuses what vLLM would reject or get
    wrong before anything starts; the endpoint is smoke-tested before "ready". Arguments after -- go
    to vLLM unchanged. Exit codes: 3 bad input, 4 adapter refused, 7 vLLM failed or port busy, 8 smoke test
    failed (the table: README, Exit codes).
    """
    out.set_mode(json_mode=json)
    from ..preflight import check_adapters, require_passed
    from ..serving import ServeConfig

    named = parse_named(adapter)
    if not dry_run:
        from ..launcher import check_port_free

        check_port_free(host, port)  # before pre-flight: a busy port fails in a moment, not after vLLM loads
    if allow_runtime_adapters:
        out.warn("runtime adapters are on: anyone holding the API key can make the server load any adapter path "
                 "it can read")
    report = check_adapters(base, named, max_lora_rank=max_lora_rank)
    require_passed(report)
    for note in report.notes:
        out.info(f"Note: {note}")
    from ..hub import resolve_ref

    model = str(resolve_ref(base, kind="base model").path)
    cfg = ServeConfig(model=model, served_model_name=served_model_name or default_served_name(base),
                      adapters=tuple(a.served() for a in report.accepted), host=host, port=port, dtype=dtype,
                      max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_lora_rank=max_lora_rank,
                      max_model_len=max_model_len, allow_runtime_adapters=allow_runtime_adapters,
                      runtime_slots=runtime_adapter_slots, api_key_env=api_key_env, extra_args=tuple(ctx.args))
    if manifests is not None:
        from ..spec import spec_for_local_run
        from .merge_cmds import write_deployment

        local = Path(base).exists()
        write_deployment(spec_for_local_run(served_name=cfg.served_model_name, mode="dynamic", model=model if local
                                             else base, local_model=local,
                                             adapters=tuple((a.name, a.rank) for a in report.accepted),
                                             api_key=bool(api_key_env), runtime_adapters=allow_runtime_adapters,
                                             max_model_len=max_model_len), manifests, force=force)
    launch(cfg, dry_run=dry_run, no_smoke=no_smoke, exit_after_smoke=exit_after_smoke, timeout=timeout, log=log,
           prompt=prompt, preflight=report)


def check(
    base: Annotated[str, typer.Option(help="Base model: local folder or hub id.")],
    adapter: Annotated[list[str], typer.Option(help="NAME=PATH; repeat for several.")],
    max_lora_rank: MaxRankOpt = None,
    json: JsonOpt = False,
) -> None:
    """Pre-flight only: would vLLM serve these adapters on this base, and correctly? Exit 0 yes, 4 no."""
    out.set_mode(json_mode=json)
    from ..errors import EXIT_UNSUPPORTED
    from ..preflight import check_adapters

    report = check_adapters(base, parse_named(adapter), max_lora_rank=max_lora_rank)
    rows = [(a.name, f"OK  rank {a.rank}" + ("  (normalised copy)" if a.normalised else "")) for a in report.accepted]
    rows += [(r.adapter, f"REFUSED [{r.rule}] {r.message}\n{' ' * 4}fix: {r.fix}") for r in report.refusals]
    out.result(report, out.table(rows) + "\n" + ("\n".join(report.notes)))
    if not report.passed:
        raise typer.Exit(EXIT_UNSUPPORTED)


def smoke(
    url: Annotated[str, typer.Option(help="Server URL, e.g. http://127.0.0.1:8000")],
    model: Annotated[Optional[list[str]], typer.Option(help="A model that must be served; repeat. Default: "
                                                       "every listed model.")] = None,
    base_model: Annotated[Optional[str], typer.Option(help="The base model's name (default: the one listed "
                                                      "model without a parent).")] = None,
    api_key_env: ApiKeyEnvOpt = None,
    prompt: PromptOpt = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 16,
    timeout: Annotated[float, typer.Option(help="Seconds per request.")] = 60.0,
    json: JsonOpt = False,
) -> None:
    """Smoke-test an OpenAI-compatible endpoint: models listed, every model answers, streaming = non-streaming,
    each adapter's output distribution differs from the base's, and every answer in concurrent mixed
    batches is its own model's (judged by logprobs; text may differ only at near-ties). Exit 0 only when
    every check passed."""
    out.set_mode(json_mode=json)
    from ..smoke import DEFAULT_PROMPT, EXIT_SMOKE, format_report, run_smoke

    key = _api_key(api_key_env)
    report = run_smoke(url, models=model or None, base_model=base_model, api_key=key,
                       prompt=prompt or DEFAULT_PROMPT, max_tokens=max_tokens, timeout=timeout)
    out.result(report, format_report(report))
    if not report.passed:
        raise typer.Exit(EXIT_SMOKE)


def _api_key(var: Optional[str]) -> Optional[str]:
    if not var:
        return None
    key = os.environ.get(var)
    if not key:
        raise InputError(f"--api-key-env {var}: that environment variable is empty or unset")
    return key


adapters_app = typer.Typer(help="List, load or unload adapters on a running vLLM (confirmed via /v1/models).",
                           no_args_is_help=True)


@adapters_app.command("list")
def adapters_list(url: Annotated[str, typer.Option(help="Server URL.")], api_key_env: ApiKeyEnvOpt = None,
                  json: JsonOpt = False) -> None:
    """List the served models and adapters with their parents."""
    out.set_mode(json_mode=json)
    from ..admin import list_models

    models = list_models(url, _api_key(api_key_env))
    out.result(models, out.table([(m.id, f"parent={m.parent or '-'}  root={m.root}") for m in models]))


@adapters_app.command("load")
def adapters_load(name: Annotated[str, typer.Argument(help="Model name for the adapter.")],
                  path: Annotated[str, typer.Argument(help="Adapter folder as the server sees it.")],
                  url: Annotated[str, typer.Option(help="Server URL.")], api_key_env: ApiKeyEnvOpt = None,
                  no_preflight: Annotated[bool, typer.Option(
                      "--no-preflight", help="Skip pre-flight against the served base.")] = False,
                  json: JsonOpt = False) -> None:
    """Load an adapter at run time: pre-flight against the served base, then confirm it is listed and applied."""
    out.set_mode(json_mode=json)
    from ..admin import load_runtime_adapter

    load = load_runtime_adapter(url, name, path, _api_key(api_key_env), preflight=not no_preflight)
    if load.preflight != "passed":
        out.warn(f"pre-flight {load.preflight}")
    m = load.model
    out.result(load, f"loaded {m.id} (parent {m.parent}) from {m.root}; answers unlike the base "
                     f"(distance {load.distance_to_base} nats)")


@adapters_app.command("unload")
def adapters_unload(name: Annotated[str, typer.Argument(help="Adapter model name.")],
                    url: Annotated[str, typer.Option(help="Server URL.")], api_key_env: ApiKeyEnvOpt = None,
                    force: Annotated[bool, typer.Option("--force", help="Also unload an adapter served from the "
                                                        "start.")] = False,
                    json: JsonOpt = False) -> None:
    """Unload a runtime adapter and confirm it is gone from /v1/models."""
    out.set_mode(json_mode=json)
    from ..admin import unload_runtime_adapter

    unload_runtime_adapter(url, name, _api_key(api_key_env), force=force)
    out.result({"unloaded": name}, f"unloaded {name}")


def bench(
    url: Annotated[str, typer.Option(help="Server URL.")],
    model: Annotated[list[str], typer.Option(help="Model to load; repeat to spread requests over several.")],
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once.")] = 8,
    requests_per_model: Annotated[int, typer.Option(help="Requests sent to each model.")] = 16,
    max_tokens: Annotated[int, typer.Option(help="Output tokens per request (EOS ignored).")] = 32,
    prompt: PromptOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    json: JsonOpt = False,
) -> None:
    """Concurrent load against an endpoint: time to first token, inter-token latency, throughput per model."""
    out.set_mode(json_mode=json)
    from ..bench import format_bench, run_load
    from ..smoke import DEFAULT_PROMPT

    report = run_load(url, list(model), concurrency=concurrency, requests_per_model=requests_per_model,
                      max_tokens=max_tokens, prompt=prompt or DEFAULT_PROMPT, api_key=_api_key(api_key_env))
    out.result(report, format_bench(report))

"""`lora-deploy smoke`, `bench` and `adapters`: talk to a running OpenAI-compatible endpoint."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..client import api_key_from_env as _api_key
from ..output import out
from ._options import ApiKeyEnvOpt, JsonOpt, PromptOpt, UrlOpt


def smoke(
    url: UrlOpt,
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
    from ..errors import EXIT_SMOKE
    from ..smoke import DEFAULT_PROMPT, format_report, run_smoke

    key = _api_key(api_key_env)
    report = run_smoke(url, models=model or None, base_model=base_model, api_key=key,
                       prompt=prompt or DEFAULT_PROMPT, max_tokens=max_tokens, timeout=timeout)
    out.result(report, format_report(report))
    if not report.passed:
        raise typer.Exit(EXIT_SMOKE)


adapters_app = typer.Typer(help="List, load or unload adapters on a running vLLM (confirmed via /v1/models).",
                           no_args_is_help=True)


@adapters_app.command("list")
def adapters_list(url: UrlOpt, api_key_env: ApiKeyEnvOpt = None,
                  json: JsonOpt = False) -> None:
    """List the served models and adapters with their parents."""
    out.set_mode(json_mode=json)
    from ..admin import list_models

    models = list_models(url, _api_key(api_key_env))
    out.result(models, out.table([(m.id, f"parent={m.parent or '-'}  root={m.root}") for m in models]))


@adapters_app.command("load")
def adapters_load(name: Annotated[str, typer.Argument(help="Model name for the adapter.")],
                  path: Annotated[str, typer.Argument(help="Adapter folder as the server sees it.")],
                  url: UrlOpt, api_key_env: ApiKeyEnvOpt = None,
                  replace: Annotated[bool, typer.Option(
                      "--replace", help="Swap the weights behind an adapter name already served (vLLM "
                      "load_inplace): clients keep the name.")] = False,
                  no_preflight: Annotated[bool, typer.Option(
                      "--no-preflight", help="Skip pre-flight against the served base.")] = False,
                  json: JsonOpt = False) -> None:
    """Load an adapter at run time: pre-flight against the served base, then confirm it is listed and applied.

    Exit codes: 3 bad input (wrong base, missing files, no API key), 4 unsupported adapter, 9 the server
    refused or the load did not take effect (nothing is left half-loaded).
    """
    out.set_mode(json_mode=json)
    from ..admin import load_runtime_adapter

    load = load_runtime_adapter(url, name, path, _api_key(api_key_env), preflight=not no_preflight, replace=replace)
    if load.preflight != "passed":
        out.warn(f"pre-flight {load.preflight}")
    m = load.model
    if load.replaced is not None and load.replaced == m.root:
        out.warn(f"{name} was reloaded from the same path: vLLM keeps prefix-cache blocks computed with the old "
                 "weights; load changed weights from a new path")
    verb = f"replaced {m.id} (was {load.replaced})" if load.replaced is not None else f"loaded {m.id}"
    out.result(load, f"{verb} (parent {m.parent}) from {m.root}; answers unlike the base "
                     f"(distance {load.distance_to_base} nats)")


@adapters_app.command("unload")
def adapters_unload(name: Annotated[str, typer.Argument(help="Adapter model name.")],
                    url: UrlOpt, api_key_env: ApiKeyEnvOpt = None,
                    force: Annotated[bool, typer.Option("--force", help="Also unload an adapter served from the "
                                                        "start.")] = False,
                    json: JsonOpt = False) -> None:
    """Unload a runtime adapter and confirm it is gone from /v1/models."""
    out.set_mode(json_mode=json)
    from ..admin import unload_runtime_adapter

    unload_runtime_adapter(url, name, _api_key(api_key_env), force=force)
    out.result({"unloaded": name}, f"unloaded {name}")


def bench(
    url: UrlOpt,
    model: Annotated[list[str], typer.Option(help="Model to load; repeat to spread requests over several.")],
    concurrency: Annotated[int, typer.Option(help="Requests in flight at once.")] = 8,
    requests_per_model: Annotated[int, typer.Option(help="Requests sent to each model.")] = 16,
    max_tokens: Annotated[int, typer.Option(help="Output tokens per request (EOS ignored).")] = 32,
    prompt: PromptOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    json: JsonOpt = False,
) -> None:
    """Concurrent load against an endpoint: time to first token, inter-token latency, throughput per model.

    Exit 0 only when every request was answered; 8 when any failed (the reasons are listed, and in --json).
    Requests the time limit kept from being sent are counted as not sent."""
    out.set_mode(json_mode=json)
    from ..bench import format_bench, run_load
    from ..errors import EXIT_SMOKE
    from ..smoke import DEFAULT_PROMPT

    report = run_load(url, list(model), concurrency=concurrency, requests_per_model=requests_per_model,
                      max_tokens=max_tokens, prompt=prompt or DEFAULT_PROMPT, api_key=_api_key(api_key_env))
    out.result(report, format_bench(report))
    if not report.passed:
        raise typer.Exit(EXIT_SMOKE)

"""`lora-deploy smoke`, `bench` and `adapters`: talk to a running OpenAI-compatible endpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lora_deploy.cli._options import ApiKeyEnvOpt, JsonOpt, PromptOpt, UrlOpt
from lora_deploy.output import out
from lora_deploy.serve.client import api_key_from_env as _api_key


def smoke(
    url: UrlOpt,
    model: Annotated[
        list[str] | None, typer.Option(help="A model that must be served; repeat. Default: every listed model.")
    ] = None,
    base_model: Annotated[
        str | None, typer.Option(help="The base model's name (default: the one listed model without a parent).")
    ] = None,
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
    from lora_deploy.errors import EXIT_SMOKE
    from lora_deploy.prompts import DEFAULT_PROMPT
    from lora_deploy.serve.smoke import format_report, run_smoke

    key = _api_key(api_key_env)
    report = run_smoke(
        url,
        models=model or None,
        base_model=base_model,
        api_key=key,
        prompt=prompt or DEFAULT_PROMPT,
        max_tokens=max_tokens,
        timeout=timeout,
    )
    out.result(report, format_report(report))
    if not report.passed:
        raise typer.Exit(EXIT_SMOKE)


adapters_app = typer.Typer(
    help="Adapters on a running vLLM (list, load, unload; confirmed via /v1/models) and in an "
    "adapter store every replica serves from (publish, list --store, retire).",
    no_args_is_help=True,
    rich_markup_mode=None,  # plain click help, as the main app's (cli/_help.py)
)
StoreOpt = Annotated[str, typer.Option(help="The adapter store folder (as `dynamic --adapter-store` serves it).")]
EndpointOpt = Annotated[
    list[str] | None,
    typer.Option("--endpoint", help="A replica's URL to tell about the change; repeat for each replica."),
]
ReplicasOpt = Annotated[
    str | None,
    typer.Option(
        "--replicas",
        help="HOST:PORT that resolves to every replica (in Kubernetes: NAME-pods.NAMESPACE.svc:8000, the "
        "headless Service); each address is told like an --endpoint.",
    ),
]


def _endpoints(endpoint: list[str] | None, replicas: str | None) -> tuple[str, ...]:
    from lora_deploy.serve.store import replica_urls

    return tuple(endpoint or ()) + (replica_urls(replicas) if replicas else ())


@adapters_app.command("list")
def adapters_list(
    url: Annotated[str | None, typer.Option(help="A server's URL: list what it serves.")] = None,
    store: Annotated[str | None, typer.Option(help="An adapter store: list what it holds.")] = None,
    api_key_env: ApiKeyEnvOpt = None,
    json: JsonOpt = False,
) -> None:
    """List the models a server serves (--url), with their parents, or the adapters a store holds (--store)."""
    out.set_mode(json_mode=json)
    from lora_deploy.errors import InputError

    if (url is None) == (store is None):
        raise InputError("give either --url (a running server) or --store (an adapter store)")
    if store is not None:
        from lora_deploy.serve.store import list_store

        held = list_store(store)
        rows = [
            (
                a.name,
                (
                    f"rank {a.rank}  version {a.version}  from {a.source}"
                    if a.managed
                    else "copied in by hand" + (f": NOT SERVABLE, {a.problem}" if a.problem else "")
                ),
            )
            for a in held
        ]
        out.result(held, out.table(rows) if rows else f"{store} holds no adapters yet")
        return
    from lora_deploy.serve.admin import list_models

    assert url is not None  # exactly one of --url and --store, checked above
    models = list_models(url, _api_key(api_key_env))
    out.result(models, out.table([(m.id, f"parent={m.parent or '-'}  root={m.root}") for m in models]))


@adapters_app.command("publish")
def adapters_publish(
    adapter: Annotated[str, typer.Argument(help="The adapter: a folder, a hub id or s3://BUCKET/PREFIX.")],
    store: StoreOpt,
    name: Annotated[str | None, typer.Option(help="Its model name (default: the folder's name).")] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Publish a new version under an existing name.")] = False,
    endpoint: EndpointOpt = None,
    replicas: ReplicasOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    base: Annotated[
        str | None, typer.Option(help="Create a missing store: the servers' base (folder, hub id or s3:// URL).")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(metavar="PATH|ID", help="Create a missing store: the servers' --model string (default: --base)."),
    ] = None,
    served_model_name: Annotated[str | None, typer.Option(help="Create a missing store: the base's API name.")] = None,
    max_lora_rank: Annotated[
        int | None, typer.Option(help="Create a missing store: the servers' --max-lora-rank.")
    ] = None,
    served_from: Annotated[
        str | None, typer.Option(help="Create a missing store: its folder as the servers see it (default: --store).")
    ] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision of the adapter.")] = None,
    json: JsonOpt = False,
) -> None:
    """Publish an adapter into an adapter store: every replica serving the store answers for it on the next request
    that names it, with no restart.

    Pre-flight against the store's base and rank limit first; the adapter's base_model_name_or_path is set to the
    servers' --model (what vLLM's resolver compares); the switch is atomic. With --replace, each --endpoint replica
    that already loaded the adapter loads the new version. Exit codes: 3 bad input or name, 4 an adapter the
    servers could not serve, 5 the name exists (no --replace), 9 a replica could not be told.
    """
    out.set_mode(json_mode=json)
    from lora_deploy.hub import resolve_headers
    from lora_deploy.serve.flags import default_served_name
    from lora_deploy.serve.store import describe_server, publish

    create = None
    if base is not None:
        if max_lora_rank is None:
            from lora_deploy.errors import InputError

            raise InputError("--base describes a new store: it needs --max-lora-rank too")
        create = describe_server(
            resolve_headers(base, kind="base model"),
            model or base,
            served_model_name or default_served_name(model or base),
            max_lora_rank,
            served_from or str(Path(store).resolve()),
        )
    done = publish(
        adapter,
        store,
        name=name,
        replace=replace,
        endpoints=_endpoints(endpoint, replicas),
        api_key=_api_key(api_key_env),
        create=create,
        revision=revision,
    )
    for note in done.notes:
        out.info(f"Note: {note}")
    a = done.adapter
    told = "".join(f"\n  {r.url}: {r.action}" for r in done.endpoints)
    verb = (
        f"replaced {a.name} (was version {done.replaced_version})" if done.replaced_version else f"published {a.name}"
    )
    out.result(done, f"{verb}: version {a.version}, rank {a.rank}, at {done.path}{told}")


@adapters_app.command("retire")
def adapters_retire(
    name: Annotated[str, typer.Argument(help="The adapter's model name.")],
    store: StoreOpt,
    endpoint: EndpointOpt = None,
    replicas: ReplicasOpt = None,
    api_key_env: ApiKeyEnvOpt = None,
    json: JsonOpt = False,
) -> None:
    """Take an adapter out of a store: its name and every version leave the volume; each --endpoint replica that
    loaded it unloads it. Exit codes: 3 no such adapter, 9 a replica could not be told."""
    out.set_mode(json_mode=json)
    from lora_deploy.serve.store import retire

    done = retire(name, store, endpoints=_endpoints(endpoint, replicas), api_key=_api_key(api_key_env))
    for note in done.notes:
        out.info(f"Note: {note}")
    told = "".join(f"\n  {r.url}: {r.action}" for r in done.endpoints)
    out.result(done, f"retired {name} from {store}{told}")


@adapters_app.command("load")
def adapters_load(
    name: Annotated[str, typer.Argument(help="Model name for the adapter.")],
    path: Annotated[str, typer.Argument(help="Adapter folder as the server sees it.")],
    url: UrlOpt,
    api_key_env: ApiKeyEnvOpt = None,
    replace: Annotated[
        bool,
        typer.Option(
            "--replace",
            help="Swap the weights behind an adapter name already served (vLLM load_inplace): clients keep the name.",
        ),
    ] = False,
    no_preflight: Annotated[
        bool, typer.Option("--no-preflight", help="Skip pre-flight against the served base.")
    ] = False,
    json: JsonOpt = False,
) -> None:
    """Load an adapter at run time: pre-flight against the served base, then confirm it is listed and applied.

    Exit codes: 3 bad input (wrong base, missing files, no API key), 4 unsupported adapter, 9 the server
    refused or the load did not take effect (nothing is left half-loaded).
    """
    out.set_mode(json_mode=json)
    from lora_deploy.serve.admin import load_runtime_adapter

    load = load_runtime_adapter(url, name, path, _api_key(api_key_env), preflight=not no_preflight, replace=replace)
    if load.preflight != "passed":
        out.warn(f"pre-flight {load.preflight}")
    m = load.model
    if load.replaced is not None and load.replaced == m.root:
        out.warn(
            f"{name} was reloaded from the same path: vLLM keeps prefix-cache blocks computed with the old "
            "weights; load changed weights from a new path"
        )
    verb = f"replaced {m.id} (was {load.replaced})" if load.replaced is not None else f"loaded {m.id}"
    out.result(
        load,
        f"{verb} (parent {m.parent}) from {m.root}; answers unlike the base (distance {load.distance_to_base} nats)",
    )


@adapters_app.command("unload")
def adapters_unload(
    name: Annotated[str, typer.Argument(help="Adapter model name.")],
    url: UrlOpt,
    api_key_env: ApiKeyEnvOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Also unload an adapter served from the start.")] = False,
    json: JsonOpt = False,
) -> None:
    """Unload a runtime adapter and confirm it is gone from /v1/models."""
    out.set_mode(json_mode=json)
    from lora_deploy.serve.admin import unload_runtime_adapter

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
    from lora_deploy.errors import EXIT_SMOKE
    from lora_deploy.prompts import DEFAULT_PROMPT
    from lora_deploy.serve.bench import format_bench, run_load

    report = run_load(
        url,
        list(model),
        concurrency=concurrency,
        requests_per_model=requests_per_model,
        max_tokens=max_tokens,
        prompt=prompt or DEFAULT_PROMPT,
        api_key=_api_key(api_key_env),
    )
    out.result(report, format_bench(report))
    if not report.passed:
        raise typer.Exit(EXIT_SMOKE)

"""`lora-deploy manifests`: render a deploy spec into schema-valid Kubernetes manifests."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lora_deploy.cli._options import ForceOpt, JsonOpt
from lora_deploy.errors import EXIT_VERIFY
from lora_deploy.output import out

EXAMPLES = """Examples:

```
lora-deploy manifests deploy/support-bot-merged.yaml --output manifests/support-bot-merged
lora-deploy manifests deploy/support-adapters-dynamic.yaml --output manifests/support-adapters-dynamic --check
kubectl get crd leaderworkersets.leaderworkerset.x-k8s.io -o yaml > lws-crd.yaml
lora-deploy manifests deploy/llama-70b-multinode.yaml --crd lws-crd.yaml --force
lora-deploy crds && lora-deploy manifests deploy/support-fleet.yaml --crd ~/.cache/lora-deploy/crds --force
kubectl apply -k manifests/support-bot-merged
lora-deploy manifests deploy/big.yaml --size-for H100-80GB --base ./local-copy-of-the-model
```
"""


def manifests(
    spec_file: Annotated[Path, typer.Argument(metavar="SPEC", help="A deploy spec (deploy/NAME.yaml).")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Folder for the kustomize base (default: manifests/NAME for deploy/NAME.yaml)."
        ),
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Do not write: exit 6 if OUTPUT differs from a fresh render.")
    ] = False,
    crd: Annotated[
        list[Path] | None,
        typer.Option(
            "--crd",
            metavar="FILE|DIR",
            help="Validate custom resources against this CustomResourceDefinition file "
            "(or every .yaml in a folder) instead of the built-in check (repeatable), e.g. from `kubectl get crd NAME "
            "-o yaml`, or the published CRDs `lora-deploy crds` downloads.",
        ),
    ] = None,
    size_for: Annotated[
        str | None,
        typer.Option(
            help="Size what the spec does not say (GPUs, tensor parallelism, max model len, pod memory) from "
            "`lora-deploy plan` for this GPU type, e.g. H100-80GB."
        ),
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(
            help="With --size-for: a readable copy (folder or hub id) of the spec's model, when its path is a pod path."
        ),
    ] = None,
    force: ForceOpt = False,
    json: JsonOpt = False,
) -> None:
    """Render a deploy spec into hardened manifests, validated against the Kubernetes schemas before writing.

    Built-in kinds are checked against the Kubernetes OpenAPI schemas (strict: unknown fields fail), a KEDA
    ScaledObject and a PodMonitor against models of their published CRDs, a LeaderWorkerSet against its v1 API;
    InferencePool and HTTPRoute against the CRDs given with --crd (else for shape only, with a warning); invalid
    output is never written.
    """
    out.set_mode(json_mode=json)
    from lora_deploy.k8s.render import compare_with, render_manifests, write_manifests
    from lora_deploy.k8s.spec import load_spec
    from lora_deploy.k8s.validate import load_crds, schema_versions

    crds = load_crds(crd or ())
    spec = load_spec(spec_file)
    if base is not None and size_for is None:
        from lora_deploy.errors import InputError

        raise InputError("--base is only read to size the manifests", hint="add --size-for GPU-TYPE, or drop --base")
    if size_for is not None:
        from lora_deploy.k8s.sizing import request_for_spec, sized_spec
        from lora_deploy.k8s.spec import given_keys
        from lora_deploy.plan.capacity import plan_capacity

        spec, sized = sized_spec(
            spec, plan_capacity(request_for_spec(spec, base=base, gpu=size_for)), given_keys(spec_file)
        )
        for note in sized:
            out.info(f"Sized: {note}")
    rendered = render_manifests(spec)
    target = output or Path("manifests") / spec_file.stem
    if check:
        diffs = compare_with(rendered, target)
        out.result(
            {"output": str(target), "up_to_date": not diffs, "differs": diffs},
            f"{target}: up to date"
            if not diffs
            else f"{target}: out of date: {', '.join(diffs)}\n"
            f"re-render: lora-deploy manifests {spec_file} --output {target} --force",
        )
        if diffs:
            raise typer.Exit(EXIT_VERIFY)
        return
    files = write_manifests(rendered, target, force=force, crds=crds)
    for note in rendered.notes:
        out.info(f"Note: {note}")
    from lora_deploy.k8s.validate import unvalidated_files

    unchecked = unvalidated_files(rendered.files, crds)
    for item in unchecked:
        out.warn(f"not validated against a schema: {item}")
    versions = schema_versions(crds)
    out.result(
        {
            "output": str(target),
            "files": [f.name for f in files],
            "validated_against": versions,
            "not_schema_validated": unchecked,
            "kubernetes": versions["kubernetes"],
            "notes": list(rendered.notes),
        },
        f"Wrote {len(files)} files to {target} (valid for Kubernetes {versions['kubernetes']}):\n  "
        + "\n  ".join(f.name for f in files)
        + f"\nApply: kubectl apply -k {target}",
    )


CRDS_EXAMPLES = """Examples:

```
lora-deploy crds                                   # into ~/.cache/lora-deploy/crds (or $LORA_DEPLOY_CRDS)
lora-deploy crds --dir ./crds --json
lora-deploy crds --from /media/offline-copy        # an air-gapped copy, checked file by file
lora-deploy manifests deploy/support-fleet.yaml --crd ~/.cache/lora-deploy/crds --force
```
"""


def crds(
    folder: Annotated[
        Path | None,
        typer.Option(
            "--dir", metavar="DIR", help="Folder to fill (default: $LORA_DEPLOY_CRDS, else ~/.cache/lora-deploy/crds)."
        ),
    ] = None,
    source: Annotated[
        str | None,
        typer.Option(
            "--from",
            metavar="DIR|URL",
            help="Take the files by name from this folder or URL prefix (a mirror) "
            "instead of each project's release tag.",
        ),
    ] = None,
    json: JsonOpt = False,
) -> None:
    """Download the published CRDs that `manifests --crd` and the tests validate against, checking each sha256.

    Each file comes from its project's release tag (LeaderWorkerSet, KEDA, InferencePool, HTTPRoute,
    prometheus-operator, llm-d); a file whose sha256 is not the published one is refused and nothing of it is kept.
    Files already present with the right sha256 are not downloaded again.

    Exit codes: 0 ok, 3 a download failed or a file is not the published one, 5 the folder cannot be written.
    """
    out.set_mode(json_mode=json)
    from lora_deploy.k8s.crds import PUBLISHED_CRDS, fetch_crds

    report = fetch_crds(folder, source=source)
    out.result(
        report,
        f"{len(PUBLISHED_CRDS)} published CRDs in {report.folder} (sha256 checked): "
        f"{len(report.fetched)} downloaded, {len(report.present)} already there\n"
        f"Use: lora-deploy manifests SPEC --crd {report.folder}",
    )

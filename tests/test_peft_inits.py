"""Which PEFT initialisations rewrite the base, decided once (adapter.py) and held to what PEFT itself does.

For each `init_lora_weights` PEFT 0.21 accepts, PEFT builds an adapter on a tiny Llama; whether it changed any
`base_layer.weight` is the ground truth. An initialisation that rewrote the base must be refused by `merged` and
by the pre-flight of `check` (merging it into, or serving it on, the original base computes another model); one that
did not must merge, and the merge must compute PEFT's own model (the trained adapter on the untouched base).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from helpers import loaded_model, make_base, run_cli

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INITS = [True, False, "gaussian", "orthogonal", "mica", "eva", "olora", "pissa", "pissa_niter_4", "corda", "lora_ga"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(
        tmp_path_factory.mktemp("inits") / "base",
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
    )


def _peft_adapter(base_dir, init, out_dir):
    """PEFT builds the adapter with ``init`` (data-driven ones on a few random batches), its LoRA tensors are
    nudged as training would, and it is saved; returns (the PeftModel, whether PEFT rewrote any base weight)."""
    from peft import LoraConfig, get_peft_model, initialize_lora_eva_weights, preprocess_loraga
    from peft.tuners.lora.config import CordaConfig, EvaConfig, LoraGAConfig
    from peft.tuners.lora.corda import preprocess_corda
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, (4, 16), generator=g) for _ in range(4)]
    kw = dict(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if init == "corda":  # CorDA's covariance hook wants batches of one
            config = LoraConfig(**kw, corda_config=CordaConfig(corda_method="ipm"))
            preprocess_corda(
                model, config, run_model=lambda: [model(input_ids=b[i : i + 1]) for b in batches for i in range(4)]
            )
        elif init == "lora_ga":
            config = LoraConfig(**kw, lora_ga_config=LoraGAConfig())
            preprocess_loraga(
                model, config, train_step=lambda: [model(input_ids=b, labels=b).loss.backward() for b in batches]
            )
        else:
            config = LoraConfig(**kw, eva_config=EvaConfig(rho=1.0, tau=0.5) if init == "eva" else None)
        peft_model = get_peft_model(model, config)
        if init == "eva":
            initialize_lora_eva_weights(
                peft_model,
                dataloader=[{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in batches],
                show_progress_bar=False,
            )
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        peft_model.save_pretrained(out_dir)
    rewritten = False
    for n, p in peft_model.named_parameters():
        if ".base_layer." in n:
            plain = n.removeprefix("base_model.model.").replace(".base_layer.", ".")
            rewritten |= not torch.equal(p.detach(), original[plain])
    return peft_model.eval(), rewritten


@pytest.mark.parametrize("init", INITS, ids=str)
def test_refused_exactly_when_peft_rewrote_the_base(base, tmp_path, init):
    peft_model, rewritten = _peft_adapter(base, init, tmp_path / "adapter")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["init_lora_weights"]
    assert written == init  # what PEFT records is what lora-deploy reads
    code, out, err = run_cli("check", "--base", str(base), "--adapter", f"a={tmp_path / 'adapter'}", "--json")
    refused_rules = [r["rule"] for r in json.loads(out)["refusals"]] if out else []
    code_m, _, err_m = run_cli(
        "merged",
        "--base",
        str(base),
        "--adapter",
        str(tmp_path / "adapter"),
        "--output",
        str(tmp_path / "merged"),
        "--dtype",
        "float32",
    )
    if rewritten:
        assert code == 4 and "initialisation" in refused_rules, (code, out, err)
        assert code_m == 4 and "rewrites the base weights" in err_m and not (tmp_path / "merged").exists()
    else:
        assert code == 0, (out, err)
        assert code_m == 0, err_m
        with torch.no_grad():  # the adapter on the untouched base: what the merge must compute
            ids = torch.tensor([[1, 5, 17, 99, 250, 3, 42, 7]]) % peft_model.config.vocab_size
            reference = peft_model(input_ids=ids).logits
        ours = loaded_model(tmp_path / "merged")(input_ids=ids).logits.detach()
        assert float((ours - reference).abs().max()) < 1e-4 * max(float(reference.abs().max()), 1.0)


def test_the_peft_model_of_a_base_rewriting_init_differs_from_the_original_base_merge(base, tmp_path):
    """Why the refusal matters: a PiSSA adapter put on the ORIGINAL base (what a merge without conversion, or vLLM,
    computes) is not the fine-tuned model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    trained, rewritten = _peft_adapter(base, "pissa", tmp_path / "adapter")
    assert rewritten
    ids = torch.tensor([[1, 5, 17, 99, 3, 42, 7]])
    original = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    # as vLLM and a plain merge read it: the saved factors on the original base (PEFT's loader would otherwise run
    # the PiSSA initialisation again on load and rewrite the base itself)
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "init_lora_weights": True}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on_original = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "adapter").eval()
    with torch.no_grad():
        diff = float((on_original(input_ids=ids).logits - trained(input_ids=ids).logits).abs().max())
    assert diff > 1e-2, diff

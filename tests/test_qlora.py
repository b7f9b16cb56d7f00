"""QLoRA merges: the oracle is the QLoRA model itself, the base loaded in 4-bit by bitsandbytes with the adapter.

bitsandbytes (CPU build, installed by `make test`) is the oracle for the 4-bit arithmetic too: lora-deploy
re-implements NF4/FP4 quantization in plain PyTorch (merge/nf4.py), and these tests hold it to
bitsandbytes' own codes, statistics and dequantized values.
"""

from __future__ import annotations

import json
import shutil
import warnings

import bitsandbytes.functional as bnb_functional  # the test extra installs it: the oracle, never skipped
import pytest
import torch

from helpers import loaded_model, logits_of, make_adapter, make_base, run_cli


def _unpack(packed, n):
    u = packed.view(torch.uint8).reshape(-1)
    idx = torch.empty(u.numel() * 2, dtype=torch.uint8)
    idx[::2], idx[1::2] = u >> 4, u & 0xF
    return idx[:n]


def _code_times_absmax(indices, absmax, quant_type: str, blocksize: int, shape):
    """What bitsandbytes' 4-bit format means: each value is its code book entry (bitsandbytes' own table) times its
    block's absmax, in float32."""
    code = bnb_functional.get_4bit_type(quant_type, device="cpu").float()
    values = code[indices.long()]
    return (values * absmax.float().repeat_interleave(blocksize)[: values.numel()]).reshape(shape)


def _absmax(state):
    """A quant state's float32 absmax per block (double quantization undone with bitsandbytes' own function)."""
    if state.nested:
        return bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return state.absmax


def _bitsandbytes_agrees(theirs, expected, what: str) -> bool:
    """Whether bitsandbytes' dequantized values are code x absmax; where they are not (bitsandbytes 0.50's CPU
    kernel on AVX512/AMX machines, rows not a multiple of the block size), say so instead of failing or passing."""
    if torch.equal(theirs, expected):
        return True
    share = float((theirs != expected).float().mean())
    warnings.warn(
        f"bitsandbytes' dequantize_4bit on this CPU is not code x absmax for {what} ({share:.0%} of the "
        "values differ): it is not used as the oracle there",
        stacklevel=2,
    )
    return False


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize(
    "dtype,shape", [("float32", (96, 80)), ("bfloat16", (130, 77)), ("float16", (64, 33)), ("float32", (64, 128))]
)
def test_4bit_codes_statistics_and_values_are_bitsandbytes_own(quant_type, blocksize, dtype, shape):
    """Every 4-bit code and every absmax equals bitsandbytes' (odd sizes, last partial block, an outlier); every
    dequantized value is bitsandbytes' code x absmax, in float32 and in the weight's dtype; and equals bitsandbytes'
    own dequantize_4bit wherever that passes the same self-check on this CPU."""
    from lora_deploy.merge.nf4 import Bnb4bit, dequantize_4bit, quantize_4bit, roundtrip_4bit

    torch.manual_seed(blocksize)
    t = (torch.randn(*shape) * 0.05).to(getattr(torch, dtype))
    t.view(-1)[3] = 0.4
    packed, state = bnb_functional.quantize_4bit(t, blocksize=blocksize, quant_type=quant_type)
    ours = quantize_4bit(t, Bnb4bit(quant_type, blocksize))
    assert torch.equal(ours.indices, _unpack(packed, t.numel()))
    assert torch.equal(ours.absmax, state.absmax)
    expected = _code_times_absmax(ours.indices, state.absmax, quant_type, blocksize, shape)
    assert torch.equal(dequantize_4bit(ours, quant_type, blocksize), expected)
    assert torch.equal(roundtrip_4bit(t, Bnb4bit(quant_type, blocksize)).to(t.dtype), expected.to(t.dtype))
    theirs_in_dtype = bnb_functional.dequantize_4bit(packed, state)
    state.dtype = torch.float32  # bitsandbytes' float32 product, before any cast
    theirs = bnb_functional.dequantize_4bit(packed, state)
    if _bitsandbytes_agrees(theirs, expected, f"{quant_type} {tuple(shape)} block {blocksize}"):
        assert torch.equal(theirs_in_dtype, expected.to(t.dtype))


def test_the_layer_oracle_uses_bitsandbytes_values_only_where_they_are_code_times_absmax():
    """A loaded 4-bit layer's float32 weight (what `--verify` computes the QLoRA model with) is code x absmax of
    bitsandbytes' own codes and statistics, and reports whether bitsandbytes' dequantize_4bit agreed: on a shape its
    CPU kernel gets right everywhere (rows a multiple of the block size) it must agree."""
    import bitsandbytes as bnb

    from lora_deploy.merge.nf4 import dequantize_bnb_layer

    torch.manual_seed(0)
    for shape, must_agree in (((64, 128), True), ((96, 80), False)):
        layer = bnb.nn.Linear4bit(shape[1], shape[0], bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(
            torch.randn(*shape) * 0.05, requires_grad=False, quant_type="nf4", blocksize=64
        )
        layer = layer.to("cpu")  # quantizes
        state = layer.weight.quant_state
        weight, agrees = dequantize_bnb_layer(layer.weight)
        expected = _code_times_absmax(_unpack(layer.weight.data, weight.numel()), _absmax(state), "nf4", 64, shape)
        assert torch.equal(weight, expected)
        assert agrees or not must_agree


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quantization_follows_the_reference_kernel(quant_type):
    """Double quantization: the 4-bit codes, absmax offset and second-level scales are bitsandbytes'; the 8-bit
    absmax codes are the nearest dynamic-map value (bitsandbytes' reference kernel), which bitsandbytes' CPU C
    kernel agrees with except for a few it rounds to the farther neighbour; and our dequantizer turns
    bitsandbytes' own double-quantized state into exactly bitsandbytes' values."""
    from lora_deploy.merge.nf4 import Bnb4bit, Quantized4bit, dequantize_4bit, dynamic_code, quantize_4bit

    torch.manual_seed(7)
    t = torch.randn(256, 640) * 0.03
    packed, state = bnb_functional.quantize_4bit(t, blocksize=64, quant_type=quant_type, compress_statistics=True)
    ours = quantize_4bit(t, Bnb4bit(quant_type, 64, double_quant=True))
    assert torch.equal(ours.indices, _unpack(packed, t.numel()))
    assert torch.equal(ours.absmax2, state.state2.absmax) and ours.offset == float(state.offset)
    code = dynamic_code()
    assert torch.equal(code, bnb_functional.create_dynamic_map())
    agree = (ours.absmax == state.absmax).float().mean()
    assert agree > 0.98, f"only {agree:.1%} of the 8-bit absmax codes agree with bitsandbytes"
    # ours is the nearest code to every scaled absmax (bitsandbytes' CPU kernel is not, for a few)
    absmax = t.reshape(-1, 64).abs().max(dim=-1)[0] - float(state.offset)
    scaled = (absmax.reshape(-1, 256) * (1.0 / ours.absmax2.view(-1, 1))).reshape(-1, 1)
    dist = (scaled - code.view(1, -1)).abs()
    assert torch.all(dist.gather(1, ours.absmax.long().view(-1, 1)).squeeze(1) <= dist.min(1).values + 1e-7)
    theirs = Quantized4bit(
        indices=_unpack(packed, t.numel()),
        absmax=state.absmax,
        shape=tuple(t.shape),
        absmax2=state.state2.absmax,
        offset=float(state.offset),
    )
    state.dtype = torch.float32
    assert torch.equal(dequantize_4bit(theirs, quant_type, 64), bnb_functional.dequantize_4bit(packed, state))


# ---------------------------------------------------------------- whole-model merges against the QLoRA model


@pytest.fixture(scope="module")
def qlora_case(tmp_path_factory):
    """A tiny Llama, an adapter on attention and MLP, and the same base saved in 4-bit (NF4, double quant)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    root = tmp_path_factory.mktemp("qlora")
    base = make_base(root / "base", "llama", tokenizer=True, hidden_size=128, intermediate_size=256)
    adapter = make_adapter(base, root / "adapter", target_modules=["q_proj", "v_proj", "down_proj"])
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        AutoModelForCausalLM.from_pretrained(
            base, quantization_config=config, dtype=torch.float32, device_map="cpu"
        ).save_pretrained(root / "base-4bit")
    for f in base.glob("tokenizer*"):
        shutil.copy2(f, root / "base-4bit" / f.name)
    return base, adapter, root / "base-4bit"


def qlora_model(base, adapter, *, double_quant=False, prequantized=False):
    """The QLoRA model in float32: the base loaded in 4-bit by bitsandbytes, each 4-bit layer replaced by a float32
    Linear holding bitsandbytes' dequantized weight (checked to be code x absmax of its codes and statistics; where
    this CPU's kernel is not, code x absmax itself), and the adapter unmerged on top. Not bitsandbytes' 4-bit
    forward: on AMX/AVX512-FP16 CPUs it computes in lower precision even with a float32 compute dtype, which would
    make the oracle, not the merge, inexact."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = (
        {}
        if prequantized
        else {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=double_quant,
                bnb_4bit_compute_dtype=torch.float32,
            )
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, device_map="cpu", **kwargs)
    for name, module in list(model.named_modules()):
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        state = module.weight.quant_state
        theirs = bnb_functional.dequantize_4bit(module.weight.data, state).float()
        expected = _code_times_absmax(
            _unpack(module.weight.data, theirs.numel()), _absmax(state), state.quant_type, state.blocksize, theirs.shape
        )
        # where bitsandbytes' CPU dequantize kernel is not code x absmax (bitsandbytes 0.50 on some AVX512/AMX CPUs),
        # the oracle is what its stored codes and statistics mean: code x absmax, from bitsandbytes' own code book
        # (the test above holds that to bitsandbytes' kernel wherever the kernel is right); never a skip
        if not _bitsandbytes_agrees(theirs, expected, name):
            theirs = expected
        linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(theirs)
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(model, adapter).eval()


def test_merge_into_dequantized_computes_the_qlora_model(qlora_case, tmp_path):
    """Merged into the dequantized NF4 weights (float32), the checkpoint computes the QLoRA model's logits; merged
    into the original weights it does not. Every quantized layer is rewritten, not only the adapter's targets."""
    from lora_deploy.merge import MergeConfig, run_merge
    from lora_deploy.merge.nf4 import Bnb4bit

    base, adapter, _ = qlora_case
    reference = logits_of(qlora_model(base, adapter))
    peak = float(reference.abs().max())
    diffs = {}
    for into in ("dequantized", "original"):
        report = run_merge(
            MergeConfig(
                base=str(base),
                adapters=(str(adapter),),
                output=tmp_path / into,
                dtype="float32",
                qlora=Bnb4bit("nf4"),
                merge_into=into,
            )
        )
        diffs[into] = float((logits_of(loaded_model(tmp_path / into)) - reference).abs().max())
        provenance = json.loads((tmp_path / into / "lora_deploy_merge.json").read_text())
        assert provenance["merge_into"] == into and provenance["qlora"]["quant_type"] == "nf4"
        if into == "dequantized":  # 2 layers x 7 linear layers, of which the adapter targets 3 per layer
            assert report.tensors_changed == 14
    assert diffs["dequantized"] < 1e-5 * max(peak, 1.0), diffs
    assert diffs["original"] > 1e3 * diffs["dequantized"], diffs


def test_a_4bit_checkpoint_base_is_dequantized_exactly(qlora_case, tmp_path):
    """A bitsandbytes 4-bit checkpoint (NF4, double quant) as --base: the merge reads its packed weights and
    statistics and writes a plain checkpoint that loads without bitsandbytes and computes the QLoRA model's
    logits. Its original 16-bit weights are not in it, so --merge-into original is refused."""
    _, adapter, base4 = qlora_case
    reference = logits_of(qlora_model(base4, adapter, prequantized=True))
    code, out, err = run_cli(
        "merged",
        "--base",
        str(base4),
        "--adapter",
        str(adapter),
        "--output",
        str(tmp_path / "m"),
        "--dtype",
        "float32",
        "--json",
    )
    assert code == 0, err
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = loaded_model(tmp_path / "m")
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert float((logits_of(merged) - reference).abs().max()) < 1e-5 * max(float(reference.abs().max()), 1.0)
    code, _, err = run_cli(
        "merged",
        "--base",
        str(base4),
        "--adapter",
        str(adapter),
        "--output",
        str(tmp_path / "o"),
        "--merge-into",
        "original",
    )
    assert code == 4 and "--qlora" in err and not (tmp_path / "o").exists()


def test_verify_reports_both_choices_and_passes_double_quant(qlora_case, tmp_path):
    """`--verify` of a QLoRA merge (double quantization, settings read from the 4-bit base's config) compares with
    the QLoRA model, passes, and reports both choices: the dequantized merge is the closer one."""
    base, adapter, base4 = qlora_case
    code, out, err = run_cli(
        "merged",
        "--base",
        str(base),
        "--adapter",
        str(adapter),
        "--qlora",
        str(base4),
        "--output",
        str(tmp_path / "m"),
        "--dtype",
        "float32",
        "--verify",
        "--json",
    )
    assert code == 0, err
    verify = json.loads(out)["verify"]
    assert verify["passed"] and verify["oracle"].startswith("QLoRA model")
    choices = {c["merge_into"]: c for c in verify["qlora_choices"]}
    assert choices["dequantized"]["max_logit_diff"] < 1e-5 < choices["original"]["max_logit_diff"]
    assert choices["dequantized"]["mean_kl"] < choices["original"]["mean_kl"]


def test_verify_catches_a_merge_into_the_wrong_base(qlora_case, tmp_path):
    """The broken direction: a checkpoint merged into the original weights, verified as a merge into the
    dequantized ones, fails against the QLoRA model."""
    from lora_deploy.merge import MergeConfig, plan_merge, run_merge
    from lora_deploy.merge.nf4 import Bnb4bit
    from lora_deploy.merge.verify import verify_merge

    base, adapter, _ = qlora_case

    def config(merge_into: str) -> MergeConfig:
        return MergeConfig(
            base=str(base),
            adapters=(str(adapter),),
            output=tmp_path / "m",
            dtype="float32",
            qlora=Bnb4bit("nf4"),
            merge_into=merge_into,
            force=True,
        )

    plan_report = run_merge(config("original"))
    # the folder holds the merge into the original base; verified as the merge into the dequantized one it is not
    report = verify_merge(plan_merge(config("dequantized")))
    assert plan_report.tensors_changed and not report.passed
    assert any("QLoRA model" in p for p in report.problems)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--merge-into", "dequantized"], "--qlora nf4"),
        (["--qlora", "nf3"], "neither nf4, fp4"),
        (["--qlora-double-quant"], "--qlora is not given"),
        (["--qlora", "nf4", "--merge-into", "both"], "not one of original, dequantized"),
    ],
)
def test_bad_qlora_options_are_input_errors(qlora_case, tmp_path, args, needle):
    base, adapter, _ = qlora_case
    code, _, err = run_cli(
        "merged", "--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "m"), *args
    )
    assert code == 3 and needle in err, err
    assert not (tmp_path / "m").exists()


def test_inspect_says_what_base_an_adapter_was_trained_on(qlora_case, tmp_path):
    """From the base's own quantization_config (a readable 4-bit folder), from PEFT's model-card block, as a
    guess from the base's name, and nothing for a plain adapter; with the merge options that reproduce it."""
    base, adapter, base4 = qlora_case

    def inspect(base_ref, card=None):
        copy = tmp_path / f"a{len(list(tmp_path.iterdir()))}"
        shutil.copytree(adapter, copy)
        config = json.loads((copy / "adapter_config.json").read_text())
        (copy / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base_ref}))
        if card:
            (copy / "README.md").write_text(card)
        code, out, err = run_cli("inspect", str(copy), "--json")
        assert code == 0, err
        return json.loads(out)["trained_on_quantized_base"]

    got = inspect(str(base4))
    assert got["certain"] and "NF4" in got["method"] and "double quant" in got["method"]
    assert got["merge_options"] == f"--qlora {base4}"
    card = (
        "## Training procedure\n\n\nThe following `bitsandbytes` quantization config was used during training:\n"
        "- quant_method: bitsandbytes\n- load_in_8bit: False\n- load_in_4bit: True\n"
        "- llm_int8_skip_modules: None\n- bnb_4bit_quant_type: fp4\n- bnb_4bit_use_double_quant: False\n"
        "- bnb_4bit_compute_dtype: bfloat16\n\n### Framework versions\n"
    )
    got = inspect("someorg/never-downloaded", card)
    assert got["certain"] and got["merge_options"] == "--qlora fp4"
    old_card = (
        card.replace("- quant_method: bitsandbytes\n", "")
        .replace("fp4", "nf4")
        .replace("use_double_quant: False", "use_double_quant: True")
    )  # PEFT cards before transformers 4.31
    got = inspect("someorg/never-downloaded", old_card)
    assert got["merge_options"] == "--qlora nf4 --qlora-double-quant"
    got = inspect("unsloth/llama-3-8b-bnb-4bit")
    assert not got["certain"] and not got["merge_options"]
    assert inspect(str(base)) is None


def test_dequantized_merge_computes_the_qlora_model_on_the_real_model(real, tmp_path):
    """On SmolLM2-135M (tied embeddings, grouped-query attention, 49k vocabulary, real weight magnitudes): the
    classify adapter merged into the dequantized NF4 weights computes the logits of bitsandbytes' 4-bit SmolLM2
    with the adapter; merged into the original weights it does not."""
    from lora_deploy.merge import MergeConfig, run_merge
    from lora_deploy.merge.nf4 import Bnb4bit

    adapter = real.adapters["classify"]
    reference = logits_of(qlora_model(real.base, adapter), vocab=49152)
    got = {}
    for into in ("dequantized", "original"):
        run_merge(
            MergeConfig(
                base=str(real.base),
                adapters=(str(adapter),),
                output=tmp_path / into,
                dtype="float32",
                qlora=Bnb4bit("nf4"),
                merge_into=into,
            )
        )
        got[into] = float((logits_of(loaded_model(tmp_path / into), vocab=49152) - reference).abs().max())
    peak = float(reference.abs().max())
    assert got["dequantized"] < 1e-4 * peak < got["original"], (got, peak)

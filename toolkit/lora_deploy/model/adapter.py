"""Read and validate a PEFT LoRA adapter folder (``adapter_config.json`` + weights).

The tensor keys, not ``target_modules``, are the truth about what was trained: every key is
classified into a LoRA module (A/B pair, optional bias and DoRA magnitude), a full replacement
tensor (``modules_to_save``, saved embeddings, ``bias="all"|"lora_only"``) or replacement rows
(``trainable_token_indices``). Every problem is collected before anything is raised.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TypeGuard

from lora_deploy._files import contained_file, read_json_object
from lora_deploy.errors import InputError, UnsupportedError
from lora_deploy.hub import ResolvedRef, local_config, resolve_ref
from lora_deploy.model.shards import TensorEntry, read_header

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."
# The one list of PEFT initialisations that rewrite the base weights when the adapter is created, so that the saved
# adapter reproduces the fine-tune only on that rewritten base: W + dW on the original base (a merge, or vLLM serving
# it dynamically) is wrong until the adapter is converted (save_pretrained(path_initial_model_for_weight_conversion)).
# PEFT 0.21, peft/tuners/lora/layer.py: olora_init, pissa_init (and "pissa_niter_N"), corda_init and lora_ga_init
# subtract scale * B0 @ A0 from the base weight; loftq_init replaces it with its quantised copy. The others leave the
# base untouched: True/False, "gaussian", "orthogonal", "mica", and "eva" (EVA initialises lora_A from activations
# and sets lora_B to zero). tests/test_peft_inits.py holds this list to adapters PEFT itself builds with each one.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.txt",
    "spiece.model",
    "tokenizer.tiktoken",
)

# Any one of these makes a folder's tokenizer loadable by AutoTokenizer (the configs alone do not).
_TOKENIZER_VOCABS = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
    "tokenizer.tiktoken",
    "vocab.txt",
)


def has_tokenizer(folder: str | Path) -> bool:
    """Whether ``folder`` holds a tokenizer's vocabulary (what ``AutoTokenizer.from_pretrained`` needs)."""
    return any((Path(folder) / name).is_file() for name in _TOKENIZER_VOCABS)


_LORA_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "B_bias",
    ".lora_embedding_A": "A",
    ".lora_embedding_B": "B",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
}
_TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"


@dataclass(frozen=True, kw_only=True)
class LoraModule:
    """One adapted module: its A/B tensors, resolved rank/alpha/scale, and optional bias and DoRA magnitude."""

    name: str  # module path inside the base model, e.g. model.layers.0.self_attn.q_proj
    embedding: bool  # lora_embedding_A/B (an nn.Embedding), else a Linear/Conv1D pair
    rank: int
    alpha: float
    scale: float
    a_key: str
    b_key: str
    bias_key: str | None = None  # lora_B.bias (lora_bias=True): bias += scale * lora_B.bias
    magnitude_key: str | None = None  # DoRA magnitude vector
    # target_parameters (LoRA on fused MoE expert parameters): the candidate parameter names of this module, and
    # how deep its keys sit (PEFT nests one wrapper per parameter: `.base_layer.` once per outer wrapper).
    # rank is then the stacked rank (r x experts) and scale is resolved per parameter when planning.
    parameters: tuple[str, ...] = ()
    depth: int = 0

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"


@dataclass(frozen=True)
class Replacement:
    """A full tensor saved by the adapter that replaces the base tensor of the same name."""

    target: str  # base tensor name, e.g. lm_head.weight
    key: str  # key in the adapter file
    reason: str  # modules_to_save (a separate copy of one module) | embedding (its shared base value) | bias


@dataclass(frozen=True)
class TokenRows:
    """Rows of an embedding-like weight replaced by ``trainable_token_indices`` training."""

    target: str  # e.g. model.embed_tokens.weight
    key: str
    indices: tuple[int, ...]


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# lora_alpha is a scale (alpha / r, typically 1 to 4): one of 1e308 overflows every merged or served weight
MAX_ALPHA = 1e6


def _is_alpha(v: object) -> bool:
    return _is_number(v) and abs(v) <= MAX_ALPHA


def _is_str_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_pattern(check: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda v: isinstance(v, dict) and all(isinstance(k, str) and check(x) for k, x in v.items())


# adapter_config.json keys that lora-deploy reads -> (does a value have PEFT's type, that type in words). None is
# PEFT's "not set" for every key and is always accepted.
_CONFIG_TYPES: dict[str, tuple] = {
    "peft_type": (lambda v: isinstance(v, str), 'a string such as "LORA"'),
    "r": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "lora_alpha": (_is_alpha, f"a number of magnitude at most {MAX_ALPHA:g} (it scales every update by alpha / r)"),
    "target_modules": (lambda v: isinstance(v, str) or _is_str_list(v), "a list of module names or a regex string"),
    "rank_pattern": (
        _is_pattern(lambda x: _is_int(x) and x > 0),
        "a mapping of module patterns to positive integer ranks",
    ),
    "alpha_pattern": (
        _is_pattern(_is_alpha),
        f"a mapping of module patterns to numbers of magnitude at most {MAX_ALPHA:g}",
    ),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "use_qalora": (lambda v: isinstance(v, bool), "true or false"),
    "use_bdlora": (lambda v: isinstance(v, (bool, dict)), "true, false or a mapping"),
    "lora_bias": (lambda v: isinstance(v, bool), "true or false"),
    "bias": (lambda v: v in ("none", "all", "lora_only"), 'one of "none", "all", "lora_only"'),
    "modules_to_save": (_is_str_list, "a list of module names"),
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)), "true, false or an initialisation name"),
    "target_parameters": (_is_str_list, "a list of parameter names"),
    "layers_to_transform": (
        lambda v: _is_int(v) or (isinstance(v, list) and all(_is_int(x) for x in v)),
        "a layer index or a list of them",
    ),
    "trainable_token_indices": (
        lambda v: (isinstance(v, list) and all(_is_int(x) for x in v))
        or _is_pattern(lambda x: isinstance(x, list) and all(_is_int(i) for i in x))(v),
        "a list of token ids or a mapping of module names to lists of token ids",
    ),
    "base_model_name_or_path": (lambda v: isinstance(v, str), "a model path or hub id"),
}


def check_config_types(config: dict, source: str = CONFIG_FILE) -> None:
    """Raise an :class:`InputError` naming every key of ``config`` whose value does not have PEFT's type."""
    bad = [
        f"{key}: {config[key]!r} is not {words}"
        for key, (ok, words) in _CONFIG_TYPES.items()
        if config.get(key) is not None and not ok(config[key])
    ]
    if bad:
        listing = "\n".join(f"  - {b}" for b in bad)
        raise InputError(
            f"{source} has values of the wrong type:\n{listing}",
            hint="fix those keys (PEFT's LoraConfig writes them), or save the adapter again with "
            "PeftModel.save_pretrained()",
        )


@dataclass(frozen=True, kw_only=True)
class LoraSettings:
    """``adapter_config.json`` parsed once into the facts every rule reads (merge, pre-flight, inspect).

    Missing keys take PEFT's defaults; ``missing`` names the required keys the file lacks (``r``,
    ``lora_alpha``, ``target_modules``), so each caller decides whether that matters on its path.
    """

    peft_type: str
    r: int | None
    lora_alpha: float | None
    target_modules: tuple[str, ...] | str | None
    rank_pattern: dict
    alpha_pattern: dict
    use_rslora: bool
    use_dora: bool
    use_qalora: bool
    use_bdlora: bool
    bias: str
    lora_bias: bool
    modules_to_save: tuple[str, ...]
    init_lora_weights: bool | str
    layer_replication: bool
    alora: bool
    trainable_token_indices: bool
    target_parameters: tuple[str, ...]
    layers_to_transform: bool
    base_model: str | None
    missing: tuple[str, ...]

    @classmethod
    def from_config(cls, config: dict, source: str = CONFIG_FILE) -> LoraSettings:
        """Parse a config; a value of the wrong type (``"r": "four"``) is an :class:`InputError` (exit 3) that
        names every such key and the type PEFT expects, raised here so every reader of adapters inherits it."""
        check_config_types(config, source)
        targets = config.get("target_modules")
        return cls(
            peft_type=str(config.get("peft_type", "")).upper(),
            r=None if config.get("r") is None else int(config["r"]),
            lora_alpha=None if config.get("lora_alpha") is None else float(config["lora_alpha"]),
            target_modules=targets if targets is None or isinstance(targets, str) else tuple(targets),
            rank_pattern=dict(config.get("rank_pattern") or {}),
            alpha_pattern=dict(config.get("alpha_pattern") or {}),
            use_rslora=bool(config.get("use_rslora")),
            use_dora=bool(config.get("use_dora")),
            use_qalora=bool(config.get("use_qalora")),
            use_bdlora=bool(config.get("use_bdlora")),
            bias=str(config.get("bias") or "none"),
            lora_bias=bool(config.get("lora_bias")),
            modules_to_save=tuple(config.get("modules_to_save") or ()),
            init_lora_weights=config.get("init_lora_weights", True),
            layer_replication=bool(config.get("layer_replication")),
            alora=bool(config.get("alora_invocation_tokens")),
            trainable_token_indices=bool(config.get("trainable_token_indices")),
            target_parameters=tuple(config.get("target_parameters") or ()),
            layers_to_transform=config.get("layers_to_transform") is not None,
            base_model=config.get("base_model_name_or_path"),
            missing=tuple(k for k in ("r", "lora_alpha", "target_modules") if config.get(k) is None),
        )

    @property
    def base_changing_init(self) -> str | None:
        """An initialisation that rewrote the base weights during training (PiSSA, OLoRA...), else None."""
        init = self.init_lora_weights
        return init if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS) else None

    @property
    def features(self) -> tuple[str, ...]:
        """The config features beyond plain LoRA, as `inspect` lists them."""
        found = (
            ("use_rslora", self.use_rslora),
            ("use_dora", self.use_dora),
            ("rank_pattern", self.rank_pattern),
            ("alpha_pattern", self.alpha_pattern),
            ("layers_to_transform", self.layers_to_transform),
            ("regex target_modules", isinstance(self.target_modules, str)),
            ("modules_to_save", self.modules_to_save),
            ("trainable_token_indices", self.trainable_token_indices),
            ("lora_bias", self.lora_bias),
            ("target_parameters (MoE experts)", self.target_parameters),
            (f"bias={self.bias}", self.bias != "none"),
        )
        return tuple(name for name, present in found if present)


@dataclass(frozen=True, kw_only=True)
class AdapterInfo:
    """What an adapter is, as read from its folder: config facts, classified tensors and every problem found.

    ``problems`` are reasons the adapter cannot be merged at all (empty when mergeable); shape checks
    against a particular base happen later, when the merge is planned.
    """

    ref: ResolvedRef
    config: dict
    weights_file: Path
    tensors: dict[str, TensorEntry]
    modules: tuple[LoraModule, ...]
    replacements: tuple[Replacement, ...]
    token_rows: tuple[TokenRows, ...]
    features: tuple[str, ...]
    problems: tuple[str, ...] = field(default=())

    @property
    def path(self) -> Path:
        return self.ref.path

    @cached_property
    def settings(self) -> LoraSettings:
        """The config, parsed once."""
        return LoraSettings.from_config(self.config)

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "LORA"))

    @property
    def base_model(self) -> str | None:
        return self.settings.base_model

    @property
    def ranks(self) -> list[int]:
        """Ranks per module (per expert for target_parameters: the saved factors stack one pair per expert)."""
        ranks = {m.rank for m in self.modules if not m.parameters}
        ranks |= {lora_scale(self.config, f"{m.name}.{p}")[0] for m in self.modules for p in m.parameters}
        return sorted(ranks)

    @property
    def max_rank(self) -> int:
        return max(self.ranks, default=0)

    @property
    def alphas(self) -> list[float]:
        return sorted({lora_scale(self.config, n)[1] for n in self._lora_names()})

    @property
    def scales(self) -> list[float]:
        return sorted({lora_scale(self.config, n)[2] for n in self._lora_names()})

    def _lora_names(self) -> list[str]:
        return [n for m in self.modules for n in ([f"{m.name}.{p}" for p in m.parameters] or [m.name])]

    @property
    def target_names(self) -> list[str]:
        """Short module names (q_proj, lm_head...) the adapter changes; experts.<parameter> for target_parameters."""
        names = {m.name.rsplit(".", 1)[-1] for m in self.modules if not m.parameters}
        names |= {f"{m.name.rsplit('.', 1)[-1]}.{'|'.join(m.parameters)}" for m in self.modules if m.parameters}
        names |= {r.target.rsplit(".", 2)[-2] if r.target.count(".") else r.target for r in self.replacements}
        names |= {t.target.rsplit(".", 2)[-2] for t in self.token_rows}
        return sorted(names)

    @property
    def size_bytes(self) -> int:
        return self.weights_file.stat().st_size

    @property
    def mergeable(self) -> bool:
        return not self.problems

    def tokenizer_files(self) -> list[Path]:
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]

    def summary(self) -> dict:
        """A JSON-ready description (what `lora-deploy inspect` prints)."""
        return {
            "path": str(self.path),
            "source": self.ref.source,
            "revision": self.ref.revision,
            "peft_type": self.peft_type,
            "base_model": self.base_model,
            "weights_file": self.weights_file.name,
            "size_bytes": self.size_bytes,
            "ranks": self.ranks,
            "alphas": self.alphas,
            "scales": self.scales,
            "use_rslora": bool(self.config.get("use_rslora")),
            "targets": self.target_names,
            "lora_modules": len(self.modules),
            "replaced_tensors": [r.target for r in self.replacements],
            "trainable_token_rows": {t.target: len(t.indices) for t in self.token_rows},
            "features": list(self.features),
            "mergeable": self.mergeable,
            "problems": list(self.problems),
            "trained_on_quantized_base": trained_quantization(self),
        }


@dataclass(frozen=True)
class TrainedQuantization:
    """What is known about the base being quantized while the adapter trained (QLoRA), and where it was read.

    ``merge_options`` are the ``lora-deploy merged`` options that reproduce the trained function (empty when
    lora-deploy cannot: a method other than bitsandbytes 4-bit, or a guess from the base's name).
    """

    method: str
    evidence: str
    certain: bool
    merge_options: str = ""


_CARD_BLOCK = re.compile(r"bitsandbytes` quantization config was used during training:\s*\n((?:\s*- [^\n]*\n?)+)")
_QUANTIZED_NAME = re.compile(r"bnb|4bit|4-bit|nf4|gptq|awq|int4|int8|fp8", re.IGNORECASE)


def trained_quantization(info: AdapterInfo) -> TrainedQuantization | None:
    """Whether ``info`` was trained on a quantized base: from the base's own ``quantization_config`` (when the base
    is readable here without a download), else the bitsandbytes block PEFT's model card records, else a hint in
    the base's name. None when nothing says so."""
    config_file = local_config(info.base_model)
    if config_file is not None:
        try:
            qc = json.loads(config_file.read_text()).get("quantization_config")
        except (OSError, ValueError, AttributeError):
            qc = None
        if isinstance(qc, dict):
            return _from_quantization_config(
                qc, f"quantization_config of the base ({config_file})", f"--qlora {config_file.parent}"
            )
    card = info.path / "README.md"
    text = card.read_text(errors="replace") if card.is_file() else ""
    block = _CARD_BLOCK.search(text)
    if block:
        import ast

        qc = {"quant_method": "bitsandbytes"}  # cards written before transformers 4.31 have no quant_method line
        for line in block.group(1).splitlines():
            key, _, value = line.strip()[2:].partition(":")
            try:
                qc[key.strip()] = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                qc[key.strip()] = value.strip()
        return _from_quantization_config(qc, f"the bitsandbytes block of the model card ({card.name})", None)
    if info.base_model and _QUANTIZED_NAME.search(info.base_model):
        return TrainedQuantization(
            f"probably quantized (the base's name {info.base_model!r})", "the base model's name", False
        )
    return None


def _from_quantization_config(qc: dict, evidence: str, folder_option: str | None) -> TrainedQuantization:
    method = str(qc.get("quant_method", "unknown"))
    if method == "bitsandbytes" and qc.get("load_in_4bit"):
        from lora_deploy.model.quantization import Bnb4bit

        try:
            s = Bnb4bit.from_quantization_config(qc)
        except InputError:
            return TrainedQuantization(f"bitsandbytes 4-bit ({qc.get('bnb_4bit_quant_type')})", evidence, True)
        options = folder_option or (f"--qlora {s.quant_type}" + (" --qlora-double-quant" if s.double_quant else ""))
        return TrainedQuantization(f"bitsandbytes 4-bit {s.describe()}", evidence, True, options)
    if method == "bitsandbytes":
        return TrainedQuantization("bitsandbytes 8-bit", evidence, True)
    return TrainedQuantization(method, evidence, True)


def adapter_is_moe_experts(folder: str | Path) -> bool | None:
    """Whether an adapter folder holds LoRA on fused MoE expert parameters (from its config alone); None when the
    folder or its config cannot be read here, so callers say they could not tell instead of guessing."""
    from lora_deploy.errors import LoraDeployError

    try:
        config = json.loads((Path(folder) / CONFIG_FILE).read_text())
        return isinstance(config, dict) and bool(LoraSettings.from_config(config).target_parameters)
    except (OSError, ValueError, TypeError, LoraDeployError):
        return None


def strip_prefix(key: str) -> str:
    return key[len(PREFIX) :] if key.startswith(PREFIX) else key


# An adapter config's regexes (rank_pattern, alpha_pattern, target_modules) are the adapter author's: each match gets
# this long before it is an input error (a catastrophic pattern held `inspect` past 90 s with Python's re)
PATTERN_SECONDS = 1.0


def _user_match(pattern: str, text: str, *, full: bool, what: str) -> bool:
    """PEFT's ``re.match``/``re.fullmatch`` of an adapter config's pattern, bounded in time (the ``regex`` module,
    which transformers installs, runs re's syntax with a timeout); a pattern that does not compile or runs too long
    is an InputError naming it."""
    import regex

    if _nested_repetition(pattern):
        raise InputError(
            f"adapter_config.json: {what} {pattern!r} repeats a repetition (such as (a+)+): Python's re, "
            "which PEFT and vLLM match it with, can take exponential time on it",
            hint="simplify the pattern (no nested repetition)",
        )
    try:
        found = (regex.fullmatch if full else regex.match)(pattern, text, timeout=PATTERN_SECONDS)
    except regex.error as e:
        raise InputError(
            f"adapter_config.json: {what} {pattern!r} is not a valid regular expression ({e})",
            hint="fix the pattern (PEFT matches it with Python's re)",
        ) from None
    except TimeoutError:
        raise InputError(
            f"adapter_config.json: {what} {pattern!r} took over {PATTERN_SECONDS:g} s to match "
            f"{text!r}: refused as a pattern that cannot be matched in bounded time",
            hint="simplify the pattern (no nested repetition such as (a+)+)",
        ) from None
    return found is not None


def _nested_repetition(pattern: str) -> bool:
    """Whether ``pattern`` holds a repetition inside a repetition (``(a+)+``, ``(.*)*``, ``([a-z]+){2,}``): the
    classic form that backtracks exponentially in Python's re. A pattern that does not parse is left to the matcher,
    which reports it."""
    try:
        from re import _constants as c  # type: ignore[attr-defined]  # Python's own regex parser (sre_parse)
        from re import _parser as parser  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_constants as c
        import sre_parse as parser
    repeats = {c.MAX_REPEAT, c.MIN_REPEAT} | ({c.POSSESSIVE_REPEAT} if hasattr(c, "POSSESSIVE_REPEAT") else set())

    def walk(items, inside: bool) -> bool:
        for op, av in items:
            if op in repeats:
                low, high, sub = av
                many = high is c.MAXREPEAT or high > 1
                if (inside and many) or walk(sub, inside or many):
                    return True
            elif op is c.SUBPATTERN and walk(av[-1], inside):
                return True
            elif op is c.BRANCH and any(walk(b, inside) for b in av[1]):
                return True
            elif op in (c.ASSERT, c.ASSERT_NOT) and walk(av[1], inside):
                return True
        return False

    try:
        return walk(parser.parse(pattern), False)
    except Exception:  # noqa: BLE001 - unparsable: the matcher names the error
        return False


def pattern_key(patterns: dict, module_name: str) -> str | None:
    """PEFT's rule: the first pattern k with re.match(rf"(.*\\.)?({k})$", module_name) wins."""
    for k in patterns:
        if _user_match(rf"(.*\.)?({k})$", module_name, full=False, what="rank/alpha pattern"):
            return k
    return None


def target_matches(config: dict, module_name: str) -> bool:
    """Whether ``target_modules`` (list or regex string) selects ``module_name``, as PEFT decides it."""
    targets = config.get("target_modules")
    if targets is None:
        return True
    if isinstance(targets, str):
        return _user_match(targets, module_name, full=True, what="target_modules")
    return any(module_name == t or module_name.endswith("." + t) for t in targets) or "all-linear" in targets


def load_adapter(
    ref: str | Path | ResolvedRef, *, revision: str | None = None, allow_pickle: bool = False
) -> AdapterInfo:
    """Read an adapter folder (or hub id, or ``s3://`` URL, or the record one was resolved to), classify every
    tensor, and collect every problem. A headers-only record (:func:`lora_deploy.hub.resolve_headers`) is read from
    its configs and safetensors headers: everything but the weights' values.

    Raises :class:`InputError` when the folder cannot be read at all (no config, bad JSON, no or
    corrupt weights). Features that cannot be merged are returned in ``problems`` so that
    ``inspect`` can still describe the adapter; :func:`require_mergeable` turns them into an error.
    """
    resolved = (
        ref
        if isinstance(ref, ResolvedRef)
        else resolve_ref(ref, kind="adapter", revision=revision, allow_pickle=allow_pickle)
    )
    folder = resolved.path
    _refuse_links_out(folder)
    config = _read_config(folder)
    weights_file, tensors = _read_weights(folder, allow_pickle=allow_pickle)
    problems: list[str] = []
    features: list[str] = []

    settings = LoraSettings.from_config(config, str(folder / CONFIG_FILE))
    if settings.peft_type != "LORA":
        problems.append(
            f"peft_type is {config.get('peft_type')!r}; only LoRA adapters can be merged "
            "(IA3, prefix tuning, prompt tuning and others change the forward pass, not the weights)"
        )
    missing = [k for k in settings.missing if k != "target_modules"]
    if missing:
        problems.append(f"{CONFIG_FILE} lacks {', '.join(missing)}")
    if settings.base_changing_init:
        problems.append(
            f"init_lora_weights={settings.init_lora_weights!r} rewrites the base weights during "
            "training, so merging into the original base is wrong; convert the adapter to a plain LoRA "
            "first (PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    if settings.layer_replication:
        problems.append(
            "layer_replication duplicates base layers; the merged model would need a different "
            "architecture, which no standard checkpoint can express"
        )
    if settings.alora:
        problems.append(
            "aLoRA (alora_invocation_tokens) activates only after an invocation sequence and "
            "cannot be folded into the weights"
        )
    features.extend(settings.features)

    modules: list[LoraModule] = []
    replacements: list[Replacement] = []
    token_rows: list[TokenRows] = []
    if not missing:
        modules, replacements, token_rows = _classify(config, tensors, problems)
    if any(m.embedding for m in modules):
        features.append("embedding LoRA")
    if any(r.reason == "embedding" for r in replacements):
        features.append("saved embeddings")
    if weights_file.suffix == ".bin":
        features.append("pickle weights")
    if not modules and not replacements and not token_rows and not problems:
        problems.append(f"{weights_file.name} holds no LoRA tensors")
    return AdapterInfo(
        ref=resolved,
        config=config,
        weights_file=weights_file,
        tensors=tensors,
        modules=tuple(modules),
        replacements=tuple(replacements),
        token_rows=tuple(token_rows),
        features=tuple(features),
        problems=tuple(problems),
    )


def require_mergeable(info: AdapterInfo) -> None:
    if info.problems:
        listing = "\n".join(f"  - {p}" for p in info.problems)
        raise UnsupportedError(f"adapter {info.ref.source} cannot be merged:\n{listing}")


def _refuse_links_out(folder: Path) -> None:
    """Every file of an adapter folder is read or copied somewhere (a checkpoint, a shared store): a symbolic link that
    leaves the folder is refused before anything is read, naming each one."""
    bad = []
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink() and not entry.is_dir():
            try:
                contained_file(entry, folder)
            except InputError as e:
                bad.append(e.message)
    if bad:
        raise InputError(
            f"adapter folder {folder} links outside itself:\n" + "\n".join(f"  - {b}" for b in bad),
            hint="replace each link with the file itself (cp --dereference) if you trust it, or remove "
            "it; nothing was read or written",
        )


def _read_config(folder: Path) -> dict:
    return read_json_object(
        folder / CONFIG_FILE,
        missing=f"{folder} is not a PEFT adapter folder",
        hint="pass the folder written by PeftModel.save_pretrained()",
    )


def _read_weights(folder: Path, *, allow_pickle: bool) -> tuple[Path, dict[str, TensorEntry]]:
    st = folder / SAFETENSORS_FILE
    if st.is_file():
        entries, _ = read_header(st)
        return st, entries
    pkl = folder / PICKLE_FILE
    if pkl.is_file():
        if not allow_pickle:
            raise InputError(
                f"{pkl} is a pickle file; loading pickles can run arbitrary code",
                hint="re-save the adapter with safetensors (save_pretrained(..., safe_serialization="
                "True)), or pass --allow-pickle if you trust its author",
            )
        return pkl, _pickle_entries(pkl)
    raise InputError(
        f"{folder} has {CONFIG_FILE} but no {SAFETENSORS_FILE}",
        hint="copy the adapter's weights file next to its config",
    )


def _pickle_entries(path: Path) -> dict[str, TensorEntry]:
    """Describe a (trusted, opted-in) pickle adapter's tensors; their data is loaded by load_adapter_tensors."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(f"{path}: cannot be loaded ({e})") from e
    from lora_deploy.model.shards import st_dtype

    return {
        k: TensorEntry(
            name=k, file=path, dtype=st_dtype(v.dtype), shape=tuple(v.shape), start=0, end=v.numel() * v.element_size()
        )
        for k, v in state.items()
    }


def _classify(
    config: dict, tensors: dict[str, TensorEntry], problems: list[str]
) -> tuple[list[LoraModule], list[Replacement], list[TokenRows]]:
    parts: dict[str, dict[str, str]] = {}
    embedding_modules: set[str] = set()
    replacements: list[Replacement] = []
    token_rows: list[TokenRows] = []
    for key in tensors:
        name = strip_prefix(key)
        for suffix, role in _LORA_SUFFIXES.items():
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                if re.search(r"\.lora_(A|B|embedding_A|embedding_B)\.", module + "."):
                    break  # e.g. lora_A.<adapter name>.weight: handled below as unknown
                parts.setdefault(module, {})[role] = key
                if "embedding" in suffix:
                    embedding_modules.add(module)
                break
        else:
            if name.endswith(_TOKENS_SUFFIX):
                module = name[: -len(_TOKENS_SUFFIX)]
                indices = _token_indices(config, module)
                if indices is None:
                    problems.append(f"{key}: trainable token rows without trainable_token_indices in the config")
                else:
                    token_rows.append(TokenRows(f"{module}.weight", key, tuple(indices)))
            elif ".lora_" in name or ".token_adapter." in name:
                problems.append(f"tensor {key!r} is not a LoRA tensor this tool understands")
            elif name.endswith((".base_layer.weight", ".base_layer.bias", ".original_module.weight")):
                # the module's own (possibly resized) base value, shared by both sides of tied embeddings
                module, _, leaf = name.rpartition(".base_layer." if ".base_layer." in name else ".original_module.")
                reason = "bias" if leaf == "bias" else "embedding"
                replacements.append(Replacement(f"{module}.{leaf}", key, reason))
            elif name.endswith(".modules_to_save.weight"):
                replacements.append(Replacement(name.replace(".modules_to_save.", "."), key, "modules_to_save"))
            elif name.endswith((".weight", ".bias")) or "." not in name:
                module = name.rpartition(".")[0]
                if name.endswith(".bias"):
                    reason = "bias"
                elif f"{PREFIX}{module}.modules_to_save.weight" in tensors:
                    continue  # the same values as the explicit modules_to_save copy
                elif _in_modules_to_save(config, module):
                    reason = "modules_to_save"
                else:
                    reason = "embedding"  # save_embedding_layers: the full (resized) layer, not a separate copy
                replacements.append(Replacement(name, key, reason))
            else:
                problems.append(f"tensor {key!r} is not a LoRA tensor this tool understands")

    modules: list[LoraModule] = []
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    for module, roles in sorted(parts.items()):
        if "A" not in roles or "B" not in roles:
            have = ", ".join(sorted(roles))
            problems.append(f"module {module}: incomplete LoRA pair (has {have}; needs lora_A and lora_B)")
            continue
        a, b = tensors[roles["A"]], tensors[roles["B"]]
        embedding = module in embedding_modules
        if len(a.shape) != 2 or len(b.shape) != 2:
            problems.append(
                f"module {module}: only 2-D LoRA factors can be merged (convolution LoRA is not "
                f"supported); got A{list(a.shape)} B{list(b.shape)}"
            )
            continue
        r = a.shape[0]  # A is (r, in) for Linear and (r, vocab) for embeddings
        if b.shape[1] != r:
            problems.append(f"module {module}: lora_A has rank {r} but lora_B has {b.shape[1]} columns")
            continue
        params = _target_parameters(config, module)
        if params:
            # target_parameters (PEFT's ParamWrapper): one rank-r pair per expert, stacked (rank r * experts);
            # which parameter, its r and the number of experts are settled against the base when planning
            depth = 0
            while module.endswith(".base_layer"):
                module, depth = module[: -len(".base_layer")], depth + 1
            plain_r, plain_alpha, plain_scale = lora_scale(config, module)
            if not any(r % lora_scale(config, f"{module}.{p}")[0] == 0 for p in params) and r != plain_r:
                problems.append(
                    f"module {module}: rank {r} is not a multiple of the configured rank of any "
                    f"targeted parameter ({', '.join(params)})"
                )
                continue
            # rank/alpha/scale hold the plain-module reading, used if no parameter fits (a bare entry such as
            # "down_proj" in target_parameters also matches Linear modules that PEFT adapted as modules)
            modules.append(
                LoraModule(
                    name=module,
                    embedding=False,
                    rank=r,
                    alpha=plain_alpha,
                    scale=plain_scale,
                    a_key=roles["A"],
                    b_key=roles["B"],
                    parameters=params,
                    depth=depth,
                )
            )
            continue
        rk = pattern_key(rank_pattern, module)
        expected_r = int(rank_pattern[rk]) if rk is not None else int(config["r"])
        if expected_r != r:
            problems.append(
                f"module {module}: tensors have rank {r} but the config says {expected_r}"
                + (f" (rank_pattern {rk!r})" if rk else "")
            )
            continue
        ak = pattern_key(alpha_pattern, module)
        alpha = float(alpha_pattern[ak]) if ak is not None else float(config["lora_alpha"])
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules.append(
            LoraModule(
                name=module,
                embedding=embedding,
                rank=r,
                alpha=alpha,
                scale=scale,
                a_key=roles["A"],
                b_key=roles["B"],
                bias_key=roles.get("B_bias"),
                magnitude_key=roles.get("magnitude"),
            )
        )
    for module, roles in parts.items():
        if "magnitude" in roles and not config.get("use_dora"):
            problems.append(f"module {module}: DoRA magnitude vector present but use_dora is false")
    if config.get("use_dora"):
        for m in modules:
            if m.magnitude_key is None:
                problems.append(f"module {m.name}: use_dora is true but lora_magnitude_vector is missing")
    return modules, replacements, token_rows


def lora_scale(config: dict, name: str) -> tuple[int, float, float]:
    """(r, alpha, scale) of the LoRA on ``name`` (a module, or a target_parameters parameter), as PEFT resolves them."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rk, ak = pattern_key(rank_pattern, name), pattern_key(alpha_pattern, name)
    r = int(rank_pattern[rk]) if rk is not None else int(config["r"])
    alpha = float(alpha_pattern[ak]) if ak is not None else float(config["lora_alpha"])
    return r, alpha, (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)


def _target_parameters(config: dict, module: str) -> tuple[str, ...]:
    """The parameter names of ``module`` (``X`` or a nested ``X.base_layer...``) that target_parameters selects."""
    targets = config.get("target_parameters") or []
    while module.endswith(".base_layer"):
        module = module[: -len(".base_layer")]
    found = []
    for t in targets:
        owner, _, leaf = t.rpartition(".")
        if not owner or module == owner or module.endswith("." + owner):
            found.append(leaf)
    return tuple(dict.fromkeys(found))


def _in_modules_to_save(config: dict, module: str) -> bool:
    names = config.get("modules_to_save") or []
    return any(module == n or module.endswith("." + n) for n in names)


def _token_indices(config: dict, module: str) -> list[int] | None:
    spec = config.get("trainable_token_indices")
    if spec is None:
        return None
    if isinstance(spec, list):
        return [int(i) for i in spec]
    for k, v in spec.items():
        if module == k or module.endswith("." + k):
            return [int(i) for i in v]
    return None


_MEMORY_HINT = (
    "run it on a machine (or pod) with more memory; an adapter this large is usually not a LoRA adapter "
    "(check the tensors `lora-deploy inspect` lists)"
)


def load_adapter_tensors(info: AdapterInfo) -> dict:
    """Load every adapter tensor as float32 (adapters are small; the base is what must stream).

    The bytes that takes are known from the header before anything is read; an adapter that cannot fit in the
    memory this process may still allocate (a pod's limit included) is refused with exit 3 instead of dying
    halfway through the read."""
    import torch

    from lora_deploy._files import require_memory
    from lora_deploy.model.shards import load_tensor

    if info.weights_file.suffix == ".bin":
        require_memory(2 * info.weights_file.stat().st_size, what=f"reading {info.weights_file}", hint=_MEMORY_HINT)
        state = torch.load(info.weights_file, map_location="cpu", weights_only=True)
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    entries = list(info.tensors.values())
    require_memory(
        sum(map(_float32_bytes, entries)) + max([e.nbytes for e in entries], default=0),
        what=f"reading the {len(entries)} tensors of {info.weights_file}",
        hint=_MEMORY_HINT,
    )
    out = {}
    for k, entry in info.tensors.items():
        t = load_tensor(entry)
        out[k] = t.float() if t.is_floating_point() else t
    return out


def _float32_bytes(entry: TensorEntry) -> int:
    """What a tensor takes in memory once :func:`load_adapter_tensors` holds it (floats as float32)."""
    numel = math.prod(entry.shape)
    return numel * 4 if entry.dtype.startswith(("F", "BF")) else entry.nbytes


def nonfinite_tensors(info: AdapterInfo) -> list[str]:
    """The adapter's floating-point tensors that hold a NaN or an Inf (a diverged training run), read one at a time:
    vLLM would load them without a word and answer garbage (or NaN logits) for that adapter only."""
    import torch

    from lora_deploy._files import require_memory
    from lora_deploy.model.shards import TensorReader

    if info.weights_file.suffix == ".bin":
        return [k for k, t in load_adapter_tensors(info).items() if t.is_floating_point() and not t.isfinite().all()]
    largest = max(info.tensors.values(), key=lambda e: e.nbytes, default=None)
    if largest is not None:
        require_memory(
            largest.nbytes + _float32_bytes(largest), what=f"reading tensor {largest.name}", hint=_MEMORY_HINT
        )
    bad = []
    with TensorReader() as reader:
        for key, entry in info.tensors.items():
            if entry.dtype.startswith(("F", "BF")):
                t = reader.read(entry, reuse=True)
                if not bool(torch.isfinite(t.float() if entry.dtype.startswith("F8") else t).all()):
                    bad.append(key)
    return bad

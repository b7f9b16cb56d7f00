"""Plan a merge: resolve the inputs, validate everything, and freeze what each output tensor becomes.

Nothing here reads tensor data: shapes come from the safetensors headers of the base and the adapters,
so a plan for a 70B model costs milliseconds and every problem is reported before the first byte is
written. The frozen :class:`MergePlan` carries everything :mod:`.execute` needs.

The oracle is the unmerged PEFT model. Each operation is assigned to the tensor the unmerged model
applies it to, which matters where PEFT's own ``merge_and_unload()`` is wrong: a LoRA on one side of
tied input/output embeddings changes only that side in the unmerged model, while PEFT's merge writes
it into the shared storage and so changes both. We write both sides (untied) and say so.

``ensure_weight_tying`` (LoraConfig) makes the unmerged model keep the tie: one ``modules_to_save`` copy serves
both sides, and the head's LoRA factors are the input embedding's, transposed. Those merges stay tied, except
for DoRA, whose magnitudes rescale the shared matrix per column for the input and per row for the head, so
the two sides differ and are written untied.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from lora_deploy._files import check_output_free
from lora_deploy.errors import InputError, UnsupportedError
from lora_deploy.hub import ResolvedRef, resolve_ref
from lora_deploy.merge.nf4 import Bnb4bit, Stored4bit, quantized_linear_modules, split_stored_4bit
from lora_deploy.merge.quantize import SCALE_SUFFIX, OutputQuantization, plan_quantization
from lora_deploy.model.adapter import AdapterInfo, LoraModule, load_adapter, lora_scale, require_mergeable
from lora_deploy.model.layout import (
    CheckpointNames,
    CheckpointPart,
    ModelLayout,
    expected_tensors,
    read_config,
    read_layout,
)
from lora_deploy.model.shards import DTYPE_SIZES, FLOAT_CODES, TORCH_TO_CODE, ShardIndex, TensorEntry, parse_size

DTYPE_NAMES = {
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}
MERGE_INTO = ("original", "dequantized")
# A saved (resized) embedding may add rows for new tokens; no tokenizer has a million (the largest vocabularies in use
# are about 256k): more is a crafted header that would have every row read into memory
MAX_EMBEDDING_ROWS = 1 << 20


@dataclass(frozen=True, kw_only=True)
class MergeConfig:
    """Everything a merge needs; built by the CLI or by Python callers."""

    base: str
    adapters: tuple[str, ...]
    output: Path
    weights: tuple[float, ...] | None = None  # one per adapter; default 1.0 each
    dtype: str = "float16"
    shard_size: str | int = "5GB"
    force: bool = False
    allow_pickle: bool = False
    base_revision: str | None = None
    hash_inputs: bool = True
    # QLoRA: how the base was quantized in training, and which weights to merge into: the ``original``
    # 16-bit ones, or the ``dequantized`` 4-bit ones the adapter was trained against (see merge/nf4.py)
    qlora: Bnb4bit | None = None
    merge_into: str | None = None  # default: dequantized for a QLoRA merge, else original
    quantize: str | None = None  # write a compressed-tensors checkpoint: fp8-dynamic | w8a8-int8


@dataclass(frozen=True, kw_only=True)
class ModuleMerge:
    """How one adapter changed one module: the resolved rank, alpha, scale and the user's weight."""

    adapter: int
    module: str
    kind: str  # linear | conv1d | embedding | experts
    rank: int
    alpha: float
    scale: float
    weight: float
    dora: bool = False
    experts: int = 0  # > 0 for a LoRA on fused expert parameters (rank is per expert)


@dataclass(frozen=True, kw_only=True)
class LowRankUpdate:
    """w * s * (B @ A) added to one output tensor, in that tensor's storage orientation.

    ``kind`` says how B @ A lies in storage: ``linear`` as is, ``conv1d``/``embedding`` transposed,
    ``experts`` one rank-r pair per expert of a fused 3-D parameter (see :func:`.compute.expert_delta`).
    ``part`` selects the slice of the module's delta this tensor holds, when the checkpoint stores the
    in-memory parameter in several tensors (per-expert 2-D files of a fused 3-D parameter).
    """

    adapter: int
    module: str
    kind: str
    a_key: str
    b_key: str
    scale: float
    weight: float
    experts: int = 0
    transposed: bool = False  # experts stored [E, in, out]
    part: CheckpointPart | None = None  # the piece of the parameter's delta this tensor holds


@dataclass(frozen=True)
class BiasUpdate:
    """``lora_bias``: bias += w * s * lora_B.bias."""

    adapter: int
    key: str
    scale: float
    weight: float


@dataclass(frozen=True)
class RowReplacement:
    """``trainable_token_indices``: these rows of the tensor are replaced by the adapter's rows."""

    adapter: int
    key: str
    indices: tuple[int, ...]


@dataclass(frozen=True)
class SameValues:
    """Two adapter tensors PEFT keeps in one storage (tied embeddings), so a consistent file holds them equal.

    The merge reads only one of them (``key``) for both sides of the tie; :mod:`.execute` refuses a file whose
    copy (``copy``, transposed when ``transposed``) differs, since the unmerged model would then depend on
    which of the two PEFT happens to load last.
    """

    adapter: int
    key: str
    copy: str
    transposed: bool = False


@dataclass(frozen=True, kw_only=True)
class TensorPlan:
    """What one output tensor becomes: its starting value, then the adapters' operations in order.

    The starting value is the base tensor ``source`` or, when an adapter saved the full tensor, that
    tensor (``replacement``: adapter index and key). ``dtype`` is the safetensors dtype written.
    """

    name: str
    source: TensorEntry | None
    shape: tuple[int, ...]
    dtype: str
    replacement: tuple[int, str] | None = None
    rows: tuple[RowReplacement, ...] = ()
    deltas: tuple[LowRankUpdate, ...] = ()
    biases: tuple[BiasUpdate, ...] = ()
    dora: tuple[LowRankUpdate, str] | None = None  # (the update, the magnitude key)
    fourbit: Bnb4bit | Stored4bit | None = None
    quantize: str | None = None  # written in 8 bits with this scheme (merge/quantize.py); dtype is the 8-bit one
    scale_of: str | None = None  # this tensor is the per-channel scale of that quantized weight

    @property
    def touched(self) -> bool:
        return bool(
            self.replacement
            or self.rows
            or self.deltas
            or self.biases
            or self.dora
            or self.fourbit
            or self.quantize
            or self.scale_of
        )

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES

    @property
    def base_entry(self) -> TensorEntry:
        """The base tensor this output starts from; only a tensor an adapter saved whole (``replacement``) or one
        the base leaves implicit (a tied head) has none, and those are never read from the base."""
        if self.source is None:
            raise RuntimeError(f"{self.name}: planned without a base tensor, yet read from the base")
        return self.source

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * DTYPE_SIZES[self.dtype]

    def value_key(self) -> tuple:
        """Two plans with equal keys compute identical values (used to keep tied embeddings tied)."""
        start = self.replacement if self.replacement is not None else (self.source.name if self.source else None)
        return (start, self.shape, self.rows, self.deltas, self.biases, self.dora, self.fourbit)


@dataclass(frozen=True, kw_only=True)
class MergePlan:
    """A validated merge: every output tensor's plan, the config to write, and what each adapter changes."""

    base: ResolvedRef
    base_index: ShardIndex
    layout: ModelLayout
    adapters: tuple[AdapterInfo, ...]
    weights: tuple[float, ...]
    dtype: str
    tensors: tuple[TensorPlan, ...]
    config: dict
    modules: tuple[ModuleMerge, ...]
    max_shard_bytes: int
    output: Path
    force: bool = False
    hash_inputs: bool = True
    warnings: tuple[str, ...] = ()
    peft_differs: tuple[str, ...] = ()  # where PEFT's merge_and_unload() disagrees with its unmerged model
    qlora: Bnb4bit | None = None
    merge_into: str = "original"
    quantization: OutputQuantization | None = None
    same_values: tuple[SameValues, ...] = ()  # tied copies the adapter file must hold equal

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def changed_tensors(self) -> list[str]:
        """Tensors a LoRA delta changes (what verification expects to differ from the base)."""
        return sorted(p.name for p in self.tensors if p.deltas or p.dora)

    @property
    def new_or_reshaped(self) -> set[str]:
        """Tensors the base checkpoint does not hold with this shape (resized or untied embeddings)."""
        base = self.base_index.tensors
        return {p.name for p in self.tensors if p.name not in base or p.shape != base[p.name].shape}


def normalize_dtype(dtype: str) -> str:
    key = str(dtype).lower().replace("torch.", "")
    if key not in DTYPE_NAMES:
        raise InputError(f"unknown dtype {dtype!r}", hint="use float16, bfloat16 or float32")
    return DTYPE_NAMES[key]


def plan_merge(cfg: MergeConfig) -> MergePlan:
    """Resolve inputs and validate the whole merge without writing anything; raise listing every bad input."""
    dtype = normalize_dtype(cfg.dtype)
    max_shard = parse_size(cfg.shard_size)
    if not cfg.adapters:
        raise InputError("no adapter given", hint="pass --adapter PATH (repeat it to merge several)")
    weights = tuple(cfg.weights) if cfg.weights is not None else (1.0,) * len(cfg.adapters)
    if len(weights) != len(cfg.adapters):
        raise InputError(
            f"--weights has {len(weights)} value(s) for {len(cfg.adapters)} adapter(s)",
            hint="give one weight per --adapter, in the same order, e.g. --weights 0.7,0.3",
        )
    if any(w != w or w in (float("inf"), float("-inf")) for w in weights):
        raise InputError("--weights must be finite numbers")
    if cfg.merge_into not in (None, *MERGE_INTO):
        raise InputError(f"--merge-into {cfg.merge_into!r} is not one of {', '.join(MERGE_INTO)}")
    check_output_free(cfg.output, cfg.force)

    base = resolve_ref(cfg.base, kind="base model", revision=cfg.base_revision)
    config = read_config(base.path)
    index = ShardIndex.from_folder(base.path)
    qlora = cfg.qlora
    stored: dict = {}
    if config.get("quantization_config"):
        qc = config["quantization_config"]
        method = str(qc.get("quant_method", "quantized"))
        if method.lower() != "bitsandbytes" or not qc.get("load_in_4bit"):
            raise UnsupportedError(
                f"base {cfg.base} is {method}-quantized; lora-deploy merges into 16-bit weights "
                "or bitsandbytes 4-bit ones",
                hint="merge into the original fp16/bf16 base instead",
            )
        if cfg.merge_into == "original":
            raise UnsupportedError(
                f"base {cfg.base} is a bitsandbytes 4-bit checkpoint: its original 16-bit weights are not in it",
                hint=f"pass the original 16-bit base as --base, with --qlora {base.path} for the 4-bit settings",
            )
        # the QLoRA base itself: merge into exactly the weights the adapter was trained against
        qlora = Bnb4bit.from_quantization_config(qc)
        index, stored = split_stored_4bit(index)
        config = {k: v for k, v in config.items() if k != "quantization_config"}
    merge_into = cfg.merge_into or ("dequantized" if qlora is not None else "original")
    if merge_into == "dequantized" and qlora is None:
        raise InputError(
            "--merge-into dequantized needs to know how the base was quantized in training",
            hint="add --qlora nf4 (or fp4, or the folder of the bitsandbytes 4-bit base the adapter was trained on)",
        )
    layout = read_layout(base.path, index.tensors)
    adapters = tuple(load_adapter(a, allow_pickle=cfg.allow_pickle) for a in cfg.adapters)
    for info in adapters:
        require_mergeable(info)
    planner = _Planner(base, index=index, layout=layout, adapters=adapters, weights=weights, dtype=dtype)
    planner.run()
    if planner.problems:
        listing = "\n".join(f"  - {p}" for p in planner.problems[:40])
        more = f"\n  ... and {len(planner.problems) - 40} more" if len(planner.problems) > 40 else ""
        raise InputError(f"the adapter(s) do not fit base {base.source}:\n{listing}{more}")
    if merge_into == "dequantized" and qlora is not None:  # None was refused above
        planner.dequantize(qlora, stored)
    tensors, out_config = planner.finish(config)
    _check_complete(index, config, tensors, out_config)
    quantization = None
    if cfg.quantize:
        quantization = plan_quantization(cfg.quantize, planner.names, dtype)
        tensors = _quantized_tensors(tensors, quantization, TORCH_TO_CODE[dtype])
        out_config["quantization_config"] = quantization.config()
    return MergePlan(
        base=base,
        base_index=index,
        layout=layout,
        adapters=adapters,
        weights=weights,
        dtype=dtype,
        tensors=tensors,
        config=out_config,
        modules=tuple(planner.modules),
        max_shard_bytes=max_shard,
        output=Path(cfg.output),
        force=cfg.force,
        hash_inputs=cfg.hash_inputs,
        warnings=tuple(planner.warnings),
        peft_differs=tuple(planner.peft_differs),
        qlora=qlora,
        merge_into=merge_into,
        quantization=quantization,
        same_values=tuple(planner.same_values),
    )


def _quantized_tensors(
    tensors: tuple[TensorPlan, ...], q: OutputQuantization, scale_dtype: str
) -> tuple[TensorPlan, ...]:
    """Each quantized weight in its 8-bit dtype, followed by its per-channel scale ``<name>_scale`` [out, 1]."""
    out = []
    for p in tensors:
        if p.name not in q.weights:
            out.append(p)
            continue
        out.append(replace(p, dtype=q.weight_dtype, quantize=q.scheme))
        out.append(
            TensorPlan(
                name=p.name + SCALE_SUFFIX, source=None, shape=(p.shape[0], 1), dtype=scale_dtype, scale_of=p.name
            )
        )
    return tuple(out)


def _check_complete(index: ShardIndex, base_config: dict, tensors: tuple[TensorPlan, ...], out_config: dict) -> None:
    """Refuse a plan whose checkpoint transformers would load with missing or unexpected tensors.

    A missing head with ``tie_word_embeddings=false`` loads as a randomly initialised head with only a log
    line, so this is checked against the architecture's own expectations (a meta-device model of the config
    to write, after transformers' tying and renaming rules), before anything is written. Only plans that
    change the set of tensors, the tie or the vocabulary are checked: otherwise the output holds exactly the
    base's tensors under the base's config, and the check would cost seconds for nothing.
    """
    names = [p.name for p in tensors]
    same = set(names) == set(index.tensors) and all(
        out_config.get(k) == base_config.get(k) for k in ("tie_word_embeddings", "vocab_size")
    )
    if same:
        return
    expected = expected_tensors(out_config)
    if expected is None:
        return  # transformers cannot build this architecture; nothing to compare with (the layout warned)
    problems = expected.problems(names)
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems[:20])
        raise UnsupportedError(
            f"the merged checkpoint would not load completely in transformers ({len(problems)} problem(s)):\n{listing}",
            hint="this adapter changes the model's tensor set in a way lora-deploy cannot write; "
            "please report it with the adapter_config.json, and serve the adapter unmerged (lora-deploy dynamic)",
        )


def _ties_weights(info: AdapterInfo) -> bool:
    """Whether the adapter was trained with ``ensure_weight_tying`` (PEFT then keeps tied embeddings tied)."""
    return bool(info.config.get("ensure_weight_tying"))


def fit_problems(base: ResolvedRef, info: AdapterInfo) -> list[str]:
    """Why ``info`` does not fit ``base`` (modules it lacks, shapes that differ); empty when it fits."""
    index = ShardIndex.from_folder(base.path)
    planner = _Planner(
        base,
        index=index,
        layout=read_layout(base.path, index.tensors),
        adapters=(info,),
        weights=(1.0,),
        dtype="float32",
    )
    planner.run()
    return planner.problems


@dataclass(kw_only=True)
class _Draft:
    """A tensor plan while it is being built (frozen into a :class:`TensorPlan` at the end)."""

    name: str
    source: TensorEntry | None
    shape: tuple[int, ...]
    in_base: bool = True  # False for an output that the base checkpoint leaves implicit (a tied head)
    replacement: tuple[int, str] | None = None
    rows: list[RowReplacement] = field(default_factory=list)
    deltas: list[LowRankUpdate] = field(default_factory=list)
    biases: list[BiasUpdate] = field(default_factory=list)
    dora: tuple[LowRankUpdate, str] | None = None
    fourbit: Bnb4bit | Stored4bit | None = None

    def freeze(self, dtype: str) -> TensorPlan:
        src_dtype = self.source.dtype if self.source is not None else "F32"
        out = TORCH_TO_CODE[dtype] if src_dtype in FLOAT_CODES else src_dtype
        return TensorPlan(
            name=self.name,
            source=self.source,
            shape=tuple(self.shape),
            dtype=out,
            replacement=self.replacement,
            rows=tuple(self.rows),
            deltas=tuple(self.deltas),
            biases=tuple(self.biases),
            dora=self.dora,
            fourbit=self.fourbit,
        )


class _Planner:
    """Assigns every adapter operation to the checkpoint tensor(s) it changes, collecting every problem."""

    def __init__(
        self,
        base: ResolvedRef,
        *,
        index: ShardIndex,
        layout: ModelLayout,
        adapters: tuple[AdapterInfo, ...],
        weights: tuple[float, ...],
        dtype: str,
    ):
        self.base, self.index, self.layout = base, index, layout
        self.adapters, self.weights, self.dtype = adapters, weights, dtype
        self.names: CheckpointNames = layout.checkpoint_names(index.tensors)
        self.drafts: dict[str, _Draft] = {n: _Draft(name=n, source=e, shape=e.shape) for n, e in index.tensors.items()}
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.peft_differs: list[str] = []
        self.modules: list[ModuleMerge] = []
        self.same_values: list[SameValues] = []
        # tied outputs, in checkpoint names: {output weight: input weight}. Both sides are planned separately
        # (a checkpoint usually stores only the input side); equal plans are written once, tied, at the end.
        self.tied: dict[str, str] = {}
        for head, emb in layout.tied.items():
            e = self.names.single(emb)
            if e is None:
                continue
            h = self.names.single(head) or head
            self.tied[h] = e
            # a tied model computes its head from the input embedding, whatever the checkpoint stores for it
            self.drafts[h] = _Draft(
                name=h, source=index.tensors[e], shape=index.tensors[e].shape, in_base=h in index.tensors
            )

    # ------------------------------------------------------------ helpers
    def _problem(self, info: AdapterInfo, text: str) -> None:
        self.problems.append(f"adapter {info.ref.source}: {text}")

    def _draft(self, name: str, info: AdapterInfo, what: str) -> _Draft | None:
        ck = name if name in self.drafts else self.names.single(name)
        if ck is None or ck not in self.drafts:
            self._problem(
                info,
                f"{what} targets {name}, which the base model {self.base.source} does not have "
                "(is this adapter for another base model?)",
            )
            return None
        return self.drafts[ck]

    def _tie_partner(self, draft: _Draft) -> _Draft | None:
        for h, e in self.tied.items():
            if draft.name == h:
                return self.drafts[e]
            if draft.name == e:
                return self.drafts[h]
        return None

    def _sides(self, draft: _Draft, shared: bool) -> list[_Draft]:
        """The tensors an operation on ``draft`` changes: both sides of a tie when the model shares it."""
        partner = self._tie_partner(draft) if shared else None
        return [draft] if partner is None else [draft, partner]

    # ------------------------------------------------------------ the passes
    def run(self) -> None:
        if not self.layout.known:
            self.warnings.append(
                f"transformers does not know architecture {self.layout.architecture}; Conv1D "
                "orientation taken from each adapter's fan_in_fan_out flag"
            )
        for i, info in enumerate(self.adapters):
            self._replacements(i, info)
            self._token_rows(i, info)
            for m in info.modules:
                self._module(i, info, m)

    def _replacements(self, i: int, info: AdapterInfo) -> None:
        """Full tensors saved by the adapter: they define the starting value (and possibly a new shape).

        Shared values first, each tie's input side last among them (a tied model computes its head from the
        input embedding), then the separate ``modules_to_save`` copies of single modules. Under
        ``ensure_weight_tying`` a ``modules_to_save`` copy of either side of a tie is the shared value: PEFT
        points the head's copy at the input embedding's, and saves that one storage under both names.
        """
        heads = set(self.tied)
        tie_sides = heads | set(self.tied.values())
        ties = _ties_weights(info)

        def shared(r) -> bool:
            """Whether ``r`` is the value of both sides of a tie (a saved embedding, or ensure_weight_tying's copy)."""
            return r.reason != "modules_to_save" or (ties and (self.names.single(r.target) or r.target) in tie_sides)

        def order(r) -> int:
            if not shared(r):
                return 2
            return 0 if (self.names.single(r.target) or r.target) in heads else 1

        holds: dict[str, str] = {}  # tensor -> the adapter key of the shared value it holds so far
        for r in sorted(info.replacements, key=order):
            draft = self._draft(r.target, info, r.reason)
            if draft is None:
                continue
            new = tuple(info.tensors[r.key].shape)
            old = tuple(draft.shape)
            if len(new) != len(old) or (new != old and r.reason == "bias") or new[1:] != old[1:]:
                self._problem(info, f"{r.key} has shape {list(new)} but base tensor {draft.name} has {list(old)}")
                continue
            if new[0] > max(old[0], MAX_EMBEDDING_ROWS):
                self._problem(
                    info,
                    f"{r.key} has {new[0]} rows, more than any vocabulary ({MAX_EMBEDDING_ROWS}; "
                    f"base tensor {draft.name} has {old[0]})",
                )
                continue
            # a saved embedding (resized vocabulary) is the tied pair's shared value; modules_to_save is a
            # separate copy of one side, exactly as the unmerged PEFT model holds it (unless ensure_weight_tying)
            for side in self._sides(draft, shared=shared(r)):
                if side.replacement is not None and side.replacement[0] != i:
                    self._problem(
                        info,
                        f"{side.name} is also replaced by adapter "
                        f"{self.adapters[side.replacement[0]].ref.source}; merge them separately",
                    )
                    continue
                if shared(r):
                    earlier = holds.get(side.name)
                    same = SameValues(i, r.key, earlier) if earlier is not None and earlier != r.key else None
                    if same is not None and same not in self.same_values:
                        self.same_values.append(same)  # two names for one storage: the input side's is used
                    holds[side.name] = r.key
                side.replacement, side.shape = (i, r.key), new

    def _token_rows(self, i: int, info: AdapterInfo) -> None:
        for t in info.token_rows:
            draft = self._draft(t.target, info, "trainable_token_indices")
            if draft is None:
                continue
            rows = info.tensors[t.key].shape
            if rows[0] != len(t.indices) or tuple(rows[1:]) != tuple(draft.shape[1:]):
                self._problem(
                    info,
                    f"{t.key} has shape {list(rows)} for {len(t.indices)} token rows of "
                    f"{draft.name} {list(draft.shape)}",
                )
            elif max(t.indices, default=0) >= draft.shape[0] or min(t.indices, default=0) < 0:
                self._problem(info, f"trainable token index out of range for {draft.name} with {draft.shape[0]} rows")
            else:
                for side in self._sides(draft, shared=True):  # PEFT applies token rows to the tied head too
                    side.rows.append(RowReplacement(i, t.key, t.indices))

    def _parameter_module(self, i: int, info: AdapterInfo, m: LoraModule) -> None:
        """LoRA on (fused MoE expert) parameters: find the parameter it fits, then the checkpoint tensors holding it.

        The checkpoint may store the fused in-memory parameter as it is, renamed, or as per-expert 2-D tensors
        (the layout most hub MoE checkpoints have); :class:`CheckpointNames` knows which pieces lie where.
        """
        a, b = info.tensors[m.a_key].shape, info.tensors[m.b_key].shape
        fits = []
        for param in m.parameters:
            name = f"{m.name}.{param}"
            shape = self.names.memory_shape(name)
            if shape is None or len(shape) not in (2, 3):
                continue
            r, alpha, scale = lora_scale(info.config, name)
            experts = shape[0] if len(shape) == 3 else 1
            transposed = len(shape) == 3 and self.names.is_transposed(m.name)
            out_d, in_d = (shape[-1], shape[-2]) if transposed else (shape[-2], shape[-1])
            if tuple(a) == (r * experts, in_d) and tuple(b) == (out_d, r * experts):
                fits.append((name, shape, r, alpha, scale, experts, transposed))
        if not fits and m.depth == 0 and f"{m.name}.weight" in self.drafts | self.names.tensors:
            if m.rank != lora_scale(info.config, m.name)[0]:
                self._problem(
                    info,
                    f"module {m.name}: tensors have rank {m.rank} but the config says "
                    f"{lora_scale(info.config, m.name)[0]}",
                )
                return
            self._module(i, info, replace(m, parameters=()))  # a plain module LoRA after all
            return
        if len(fits) != 1:
            found = "none" if not fits else "more than one (" + ", ".join(f[0] for f in fits) + ")"
            self._problem(
                info,
                f"the target_parameters LoRA {m.a_key} (A{list(a)}, B{list(b)}) fits {found} of "
                f"{m.name}'s parameters {', '.join(m.parameters)} (is this adapter for another base model?)",
            )
            return
        name, shape, r, alpha, scale, experts, transposed = fits[0]
        parts = self.names.parts(name)
        if not parts:
            self._problem(
                info,
                f"{name}: the base checkpoint {self.base.source} stores this parameter in a layout "
                "transformers' conversion mapping does not describe",
            )
            return
        kind = "experts" if len(shape) == 3 else "linear"
        for part in parts:
            draft = self.drafts[part.name]
            if tuple(draft.shape) != part.shape:
                self._problem(
                    info, f"{part.name} has shape {list(draft.shape)}, but holds {list(part.shape)} of {name}"
                )
                return
            whole = part.dims == tuple(range(len(shape))) and part.shape == tuple(shape)
            draft.deltas.append(
                LowRankUpdate(
                    adapter=i,
                    module=name,
                    kind=kind,
                    a_key=m.a_key,
                    b_key=m.b_key,
                    scale=scale,
                    weight=self.weights[i],
                    experts=experts,
                    transposed=transposed,
                    part=None if whole else part,
                )
            )
        self.modules.append(
            ModuleMerge(
                adapter=i,
                module=name,
                kind=kind,
                rank=r,
                alpha=alpha,
                scale=scale,
                weight=self.weights[i],
                dora=False,
                experts=experts,
            )
        )

    def _module(self, i: int, info: AdapterInfo, m: LoraModule) -> None:
        if m.parameters:
            self._parameter_module(i, info, m)
            return
        w = self.weights[i]
        draft = self._draft(m.weight_name, info, "LoRA")
        if draft is None:
            return
        kind = self._kind(m, info)
        a, b = info.tensors[m.a_key].shape, info.tensors[m.b_key].shape
        expected = {"linear": (b[0], a[1]), "conv1d": (a[1], b[0]), "embedding": (a[1], b[0])}[kind]
        if tuple(draft.shape) != expected:
            self._problem(
                info,
                f"{m.name} ({kind}) gives a delta of shape {list(expected)} but base tensor "
                f"{draft.name} has {list(draft.shape)} (is this adapter for another base model?)",
            )
            return
        update = LowRankUpdate(
            adapter=i, module=m.name, kind=kind, a_key=m.a_key, b_key=m.b_key, scale=m.scale, weight=w
        )
        partner = self._tie_partner(draft)
        shared = _ties_weights(info) and partner is not None
        sides = self._tied_module(i, info, m, draft, partner) if shared and partner is not None else [draft]
        if not sides:
            return
        if partner is not None and not shared:
            self.peft_differs.append(
                f"{m.name}: LoRA on one side of tied embeddings; the unmerged PEFT model applies it to "
                f"{draft.name} only, PEFT's merge_and_unload() to both {draft.name} and {partner.name}. "
                f"Written as the unmerged model computes: {partner.name} keeps the base values, untied"
            )
        if m.magnitude_key is not None:
            mag = info.tensors[m.magnitude_key].shape
            want = draft.shape[1] if kind in ("embedding", "conv1d") else draft.shape[0]
            if tuple(mag) != (want,):
                self._problem(info, f"DoRA magnitude of {m.name} has shape {list(mag)}, expected [{want}]")
                return
            if len(self.adapters) > 1 or w != 1.0:
                self._problem(
                    info,
                    f"uses DoRA ({m.name}); a DoRA merge rescales the whole weight, so it cannot "
                    "be combined with other adapters or weighted",
                )
                return
            for side in sides:
                side.dora = (update, m.magnitude_key)
        else:
            for side in sides:
                side.deltas.append(update)
        if m.bias_key is not None:
            bias_name = draft.name[: -len(".weight")] + ".bias"
            bias = self.drafts.get(bias_name)
            if bias is None:
                self._problem(info, f"{m.name} has a LoRA bias (lora_bias=True) but the base has no {bias_name}")
            elif tuple(info.tensors[m.bias_key].shape) != tuple(bias.shape):
                self._problem(
                    info,
                    f"lora_B.bias of {m.name} has shape {list(info.tensors[m.bias_key].shape)}, "
                    f"base bias {list(bias.shape)}",
                )
            else:
                bias.biases.append(BiasUpdate(i, m.bias_key, m.scale, w))
        self.modules.append(
            ModuleMerge(
                adapter=i,
                module=m.name,
                kind=kind,
                rank=m.rank,
                alpha=m.alpha,
                scale=m.scale,
                weight=w,
                dora=m.magnitude_key is not None,
            )
        )

    def _tied_module(self, i: int, info: AdapterInfo, m: LoraModule, draft: _Draft, partner: _Draft) -> list[_Draft]:
        """The tensors a LoRA on one side of a tie changes under ``ensure_weight_tying`` (empty: nothing more to do).

        PEFT injects the input embedding's LoRA into the head as well, the head's factors being the embedding's,
        transposed (one storage, saved under both names). A plain LoRA is thus one delta on the shared weight,
        applied once, from the input side, to both sides; PEFT's merge adds it twice. DoRA keeps a magnitude per
        side, which rescales the input embedding per column and the head per row: each side takes its own
        module's DoRA, and the two sides differ (written untied).
        """
        head = draft.name in self.tied
        other = next(
            (
                o
                for o in info.modules
                if o is not m
                and not o.parameters
                and (o.weight_name if o.weight_name in self.drafts else self.names.single(o.weight_name))
                == partner.name
            ),
            None,
        )
        emb_m, head_m = (other, m) if head else (m, other)
        # the head's factors are the embedding's, transposed: must agree
        if emb_m is not None and head_m is not None and emb_m.embedding:
            for same in (
                SameValues(i, emb_m.b_key, head_m.a_key, True),
                SameValues(i, emb_m.a_key, head_m.b_key, True),
            ):
                if same not in self.same_values:
                    self.same_values.append(same)
        if m.magnitude_key is None:
            if head and other is not None:
                self.peft_differs.append(
                    f"{m.name}: ensure_weight_tying ties this LoRA to {partner.name}'s; PEFT's merge_and_unload() "
                    "adds the delta to the shared weight twice, the unmerged model once. Written once, tied"
                )
                return []
            return [draft, partner]
        if other is None or other.magnitude_key is None:
            self._problem(
                info,
                f"{m.name} uses DoRA with ensure_weight_tying, but the adapter holds no DoRA "
                f"magnitude for the tied {partner.name} (PEFT saves one per side), so what the unmerged "
                f"model computes for {partner.name} is undefined; re-save the adapter with PEFT's "
                "save_pretrained()",
            )
            return []
        if head:
            self.peft_differs.append(
                f"{m.name}: DoRA with ensure_weight_tying; the unmerged PEFT model shares the LoRA factors with "
                f"{partner.name} but rescales the input embedding per column and the head per row, each with its "
                "own magnitude, so the two sides differ. PEFT's merge_and_unload() merges the head's DoRA on top of "
                "the embedding's into the one shared weight and keeps the tie (wrong for both sides). Written as the "
                "unmerged model computes: both sides, untied"
            )
        return [draft]

    def _kind(self, m: LoraModule, info: AdapterInfo) -> str:
        if m.embedding:
            return "embedding"
        if m.name in self.layout.conv1d:
            return "conv1d"
        if not self.layout.known and info.config.get("fan_in_fan_out"):
            return "conv1d"
        return "linear"

    def dequantize(self, s: Bnb4bit, stored: dict[str, Stored4bit]) -> None:
        """Start every weight bitsandbytes quantized in training from its dequantized 4-bit value (QLoRA merge).

        All of them, not only the adapter's targets: the QLoRA model computed every quantized layer with the
        dequantized weight, so reproducing its function means writing those values everywhere. A 4-bit
        checkpoint says which weights it holds packed; for a 16-bit base, transformers' rules say (nf4.py).
        """
        if stored:
            for name, packed in stored.items():
                self.drafts[name].fourbit = packed
            self.warnings.append(
                f"dequantizing the 4-bit base ({s.describe()}): {len(stored)} linear weights are "
                "written as the QLoRA model computed with them"
            )
            return
        model = self.names.meta_model()
        if model is None:
            raise UnsupportedError(
                f"transformers cannot build {self.layout.architecture}, so which of its layers "
                "bitsandbytes quantized is unknown",
                hint="use --merge-into original",
            )
        found = 0
        for module in quantized_linear_modules(model, s):
            single = self.names.single(f"{module}.weight")
            draft = self.drafts.get(single) if single else None
            if draft is None or draft.replacement is not None or draft.source is None:
                continue  # a saved full tensor (modules_to_save) was trained unquantized
            draft.fourbit = s
            found += 1
        if not found:
            raise UnsupportedError(
                f"no layer of {self.base.source} is one bitsandbytes quantizes", hint="use --merge-into original"
            )
        self.warnings.append(
            f"merging into the dequantized 4-bit base ({s.describe()}): {found} linear weights "
            "are written as the QLoRA model computed with them, not as the original base holds them"
        )

    # ------------------------------------------------------------ the result
    def finish(self, config: dict) -> tuple[tuple[TensorPlan, ...], dict]:
        """Frozen tensor plans in checkpoint order, and the config.json to write."""
        out_config = dict(config)
        out_config["dtype"] = self.dtype
        if "torch_dtype" in out_config:
            out_config["torch_dtype"] = self.dtype
        drop: set[str] = set()
        untied = []
        for h, e in self.tied.items():
            head, emb = self.drafts[h], self.drafts[e]
            if head.freeze(self.dtype).value_key() != emb.freeze(self.dtype).value_key():
                untied.append(h)
            elif not head.in_base:
                drop.add(h)  # both sides equal: keep the tie, and no needless copy of the head
        if untied:
            out_config["tie_word_embeddings"] = False
            self.warnings.append(
                f"the tied input/output embeddings differ after the merge ({', '.join(untied)}); "
                "writing both and setting tie_word_embeddings=false"
            )
        # the input embedding's final row count is the vocabulary size (a saved, resized embedding changes it)
        inputs = set(self.tied.values()) or {
            n for n in self.drafts if n.endswith(("embed_tokens.weight", "wte.weight"))
        }
        for emb_name in sorted(inputs):
            rows = self.drafts[emb_name].shape[0]
            if "vocab_size" in out_config and out_config["vocab_size"] != rows:
                self.warnings.append(
                    f"vocabulary resized by the adapter: vocab_size {out_config['vocab_size']} -> {rows}"
                )
                out_config["vocab_size"] = rows
        ordered = [self.drafts[n] for n in self.index.tensors]
        ordered += [d for n, d in self.drafts.items() if n not in self.index.tensors and n not in drop]
        return tuple(d.freeze(self.dtype) for d in ordered), out_config

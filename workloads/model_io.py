"""Reading model specifications: built-in names, Hugging Face ``config.json`` files, YAML specs.

``load_model`` is the one entry point (``--model NAME|PATH`` in the CLI).  Built-in models are data
files in ``workloads/configs/`` (HF ``config.json`` format where the model is on the Hugging Face
Hub, a YAML ``ModelSpec`` otherwise), each with its source in a ``_source`` key; keys that start
with ``_`` are ignored by the readers.

HF field names are mapped per family (``model_type``):

* Llama / Mistral / Qwen2 (gated SiLU MLP, RMSNorm, RoPE, untied unless ``tie_word_embeddings``;
  Qwen2 has QKV biases); Mixtral adds ``num_local_experts`` and ``num_experts_per_tok``.
* Qwen2-MoE: ``num_experts``, ``moe_intermediate_size``, ``decoder_sparse_step``; the shared expert
  of width ``shared_expert_intermediate_size`` is counted as that width / ``moe_intermediate_size``
  experts of the routed width (same parameters and FLOPs; its 1-wide sigmoid gate is left out).
* DeepSeek-MoE (``model_type: deepseek``): ``n_routed_experts``, ``n_shared_experts``,
  ``moe_intermediate_size``, ``first_k_dense_replace`` (multi-head latent attention of V2/V3 is
  not supported).
* GPT-2: ``n_embd``, ``n_layer``, ``n_head``, ``n_inner`` (None → 4h), ``n_positions``; GELU,
  LayerNorm, learned positions, biases, tied embeddings.
* GPT-NeoX: LayerNorm, biases, rotary, untied; ``use_parallel_residual`` changes neither
  parameters nor FLOPs and is ignored.

A gated MLP is recorded as ``mlp: swiglu`` whatever its activation (GeGLU has the same three
matrices and FLOPs); ``mlp: gelu`` means the two-matrix MLP of GPT.
"""
from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import yaml

from .models import ModelError, ModelSpec

_CONFIG_PACKAGE = "plansim.workloads"
_CONFIG_DIR = "configs"
_SUFFIXES = (".json", ".yaml", ".yml")


# --- public API -----------------------------------------------------------------------------
def builtin_models() -> list[str]:
    """Names of the built-in models (file stems in ``workloads/configs/``), sorted."""
    return sorted(_builtin_files())


def load_model(name_or_path: str | Path | ModelSpec) -> ModelSpec:
    """A ``ModelSpec`` from a built-in name, an HF ``config.json`` (or a directory holding one)
    or a YAML spec with ``ModelSpec``'s field names.  Raises ``ModelError`` with one line."""
    if isinstance(name_or_path, ModelSpec):
        return name_or_path
    text = str(name_or_path)
    builtins = _builtin_files()
    if text in builtins:
        resource = builtins[text]
        return _load_text(resource.read_text(encoding="utf-8"), f"{_CONFIG_DIR}/{resource.name}",
                          Path(resource.name).suffix, name=text)
    path = Path(text).expanduser()
    looks_like_path = path.suffix.lower() in _SUFFIXES or "/" in text or "\\" in text
    if not path.exists():
        if looks_like_path:
            raise ModelError(f"{text}: model file not found")
        raise ModelError(f"unknown model {text!r}; built-in: {', '.join(builtin_models())}; "
                         "or give a path to an HF config.json or a YAML spec")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{text}: directory has no config.json")
        path = path / "config.json"
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise ModelError(f"{text}: unknown model file type {path.suffix!r}; allowed: .json (HF config), "
                         ".yaml/.yml (ModelSpec fields)")
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{text}: cannot read ({e.__class__.__name__}: {e})") from None
    default_name = path.parent.name if path.name == "config.json" and path.parent.name else path.stem
    return _load_text(content, text, suffix, name=default_name or "model")


def list_models() -> pd.DataFrame:
    """One row per built-in model, for ``plansim models list``."""
    rows = []
    for name in builtin_models():
        spec = load_model(name)
        rows.append({
            "name": name,
            "params_b": round(spec.num_params / 1e9, 2),
            "active_params_b": round(spec.num_active_params / 1e9, 2),
            "layers": spec.num_layers,
            "hidden": spec.hidden,
            "heads": spec.num_heads,
            "kv_heads": spec.num_kv_heads,
            "ffn": spec.moe_ffn_hidden if spec.is_moe else spec.ffn_hidden,  # per expert for MoE
            "vocab": spec.vocab,
            "experts": f"{spec.num_experts} (top {spec.top_k})" if spec.is_moe else "-",
            "source": _builtin_source(name),
        })
    return pd.DataFrame(rows)


def model_from_hf_config(cfg: dict[str, Any], name: str = "model", where: str = "config.json") -> ModelSpec:
    """A ``ModelSpec`` from the dict of an HF ``config.json``; ``where`` names it in errors."""
    if not isinstance(cfg, dict):
        raise ModelError(f"{where}: top level must be a JSON object, got {type(cfg).__name__}")
    family = _hf_family(cfg, where)
    reader = _HF_READERS[family]
    fields = reader(_Fields(cfg, where))
    return _build(dict(fields, name=name), where)


def model_from_dict(data: dict[str, Any], name: str = "model", where: str = "spec") -> ModelSpec:
    """A ``ModelSpec`` from a dict with its field names (a YAML spec); keys starting with ``_`` are
    comments (``_source``)."""
    if not isinstance(data, dict):
        raise ModelError(f"{where}: top level must be a mapping of ModelSpec fields, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if not str(k).startswith("_")}
    fields = {f.name: f for f in dataclasses.fields(ModelSpec)}
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise ModelError(f"{where}: unknown field {unknown[0]!r}; allowed: {', '.join(fields)}")
    data.setdefault("name", name)
    required = [f.name for f in fields.values()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [f for f in required if f not in data]
    if missing:
        raise ModelError(f"{where}: {missing[0]} missing (required: {', '.join(required)})")
    return _build(data, where)


# --- helpers ----------------------------------------------------------------------------------
def _builtin_files() -> dict[str, Any]:
    root = resources.files(_CONFIG_PACKAGE).joinpath(_CONFIG_DIR)
    return {Path(f.name).stem: f for f in root.iterdir()
            if f.is_file() and Path(f.name).suffix in _SUFFIXES}


def _builtin_source(name: str) -> str:
    resource = _builtin_files()[name]
    data = _parse(resource.read_text(encoding="utf-8"), resource.name, Path(resource.name).suffix)
    return str(data.get("_source", "")) if isinstance(data, dict) else ""


def _parse(content: str, where: str, suffix: str) -> Any:
    if suffix == ".json":
        try:
            return json.loads(content)
        except json.JSONDecodeError as e:
            raise ModelError(f"{where}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    try:
        return yaml.safe_load(content)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ModelError(f"{where}: not valid YAML ({at}{getattr(e, 'problem', None) or e})") from None


def _load_text(content: str, where: str, suffix: str, name: str) -> ModelSpec:
    data = _parse(content, where, suffix.lower())
    if suffix.lower() == ".json":
        return model_from_hf_config(data, name=name, where=where)
    return model_from_dict(data, name=name, where=where)


def _build(fields: dict[str, Any], where: str) -> ModelSpec:
    try:
        return ModelSpec(**fields)
    except ModelError as e:
        raise ModelError(f"{where}: {e}") from None
    except TypeError as e:  # a value of the wrong type where ModelSpec compares or divides
        raise ModelError(f"{where}: {e}") from None


class _Fields:
    """Typed access to the fields of one HF config, with one-line errors naming file and field."""

    def __init__(self, cfg: dict[str, Any], where: str) -> None:
        self.cfg, self.where = cfg, where

    def has(self, key: str) -> bool:
        return self.cfg.get(key) is not None

    def int(self, key: str, default: int | None = None, minimum: int = 1) -> int:
        v = self.cfg.get(key)
        if v is None:
            if default is None:
                raise ModelError(f"{self.where}: {key} missing")
            return default
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
            kind = "a positive" if minimum == 1 else "a non-negative"
            raise ModelError(f"{self.where}: {key} must be {kind} integer, got {v!r}")
        return v

    def any_positive(self, *keys: str, default: float = 0.0) -> bool:
        """Whether any of ``keys`` (probabilities such as dropout rates) is above zero."""
        for key in keys:
            v = self.cfg.get(key, default)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
                return True
        return False

    def bool(self, key: str, default: bool) -> bool:
        v = self.cfg.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise ModelError(f"{self.where}: {key} must be true or false, got {v!r}")
        return v

    def divides(self, heads_key: str, heads: int, hidden_key: str, hidden: int) -> None:
        if hidden % heads:
            raise ModelError(f"{self.where}: {heads_key} {heads} must divide {hidden_key} {hidden} "
                             f"(or give head_dim)")


def _attention(f: _Fields, hidden: int) -> dict[str, Any]:
    heads = f.int("num_attention_heads")
    kv_heads = f.int("num_key_value_heads", default=heads)
    if heads % kv_heads:
        raise ModelError(f"{f.where}: num_key_value_heads {kv_heads} must divide num_attention_heads {heads}")
    head_dim = f.int("head_dim") if f.has("head_dim") else None
    if head_dim is None:
        f.divides("num_attention_heads", heads, "hidden_size", hidden)
    return {"num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim}


def _read_llama(f: _Fields, max_seq_default: int = 4096, qkv_bias: bool = False) -> dict[str, Any]:
    """Llama 1/2/3, Mistral, Qwen2 and the dense part of the MoE families."""
    act = f.cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):  # the gated MLP is modelled as SwiGLU; another gate is another model
        raise ModelError(f"{f.where}: hidden_act {act!r} not supported for this family; allowed: silu (SwiGLU)")
    hidden = f.int("hidden_size")
    return dict(
        num_layers=f.int("num_hidden_layers"),
        hidden=hidden,
        **_attention(f, hidden),
        ffn_hidden=f.int("intermediate_size"),
        vocab=f.int("vocab_size"),
        mlp="swiglu", norm="rmsnorm", position="rope",
        max_seq_len=f.int("max_position_embeddings", default=max_seq_default),
        tied_embeddings=f.bool("tie_word_embeddings", False),
        qkv_bias=qkv_bias or f.bool("attention_bias", False),
        bias=f.bool("mlp_bias", False) and f.bool("attention_bias", False),
    )


def _read_mixtral(f: _Fields) -> dict[str, Any]:
    fields = _read_llama(f, max_seq_default=4096 * 32)
    experts = f.int("num_local_experts", default=8)
    return dict(fields, num_experts=experts, top_k=f.int("num_experts_per_tok", default=2))


def _read_qwen2(f: _Fields) -> dict[str, Any]:
    return _read_llama(f, max_seq_default=32768, qkv_bias=True)


def _read_qwen2_moe(f: _Fields) -> dict[str, Any]:
    fields = _read_qwen2(f)
    if f.cfg.get("mlp_only_layers"):
        raise ModelError(f"{f.where}: mlp_only_layers {f.cfg['mlp_only_layers']!r} not supported; allowed: []")
    width = f.int("moe_intermediate_size")
    shared_width = f.int("shared_expert_intermediate_size", default=0, minimum=0)
    if shared_width % width:
        raise ModelError(f"{f.where}: shared_expert_intermediate_size {shared_width} must be a multiple of "
                         f"moe_intermediate_size {width}")
    return dict(fields, num_experts=f.int("num_experts"), top_k=f.int("num_experts_per_tok"),
                moe_ffn_hidden=width, shared_experts=shared_width // width,
                moe_layer_freq=f.int("decoder_sparse_step", default=1))


def _read_deepseek(f: _Fields) -> dict[str, Any]:
    """DeepSeek-MoE, and DeepSeek-V2/V3 with multi-head latent attention (``kv_lora_rank``;
    ``q_lora_rank`` null: queries projected straight from the hidden state).  V3's
    multi-token-prediction module (``num_nextn_predict_layers``) is not modelled."""
    if "kv_lora_rank" in f.cfg:  # query/key heads of qk_nope + qk_rope, values of v_head_dim
        nope, rope = f.int("qk_nope_head_dim"), f.int("qk_rope_head_dim")
        f = _Fields({**f.cfg, "head_dim": nope + rope}, f.where)
    fields = _read_llama(f, max_seq_default=4096)
    if f.int("moe_layer_freq", default=1) != 1:
        raise ModelError(f"{f.where}: moe_layer_freq {f.cfg['moe_layer_freq']!r} not supported; allowed: 1")
    if "kv_lora_rank" in f.cfg:
        fields.update(kv_lora_rank=f.int("kv_lora_rank"), qk_rope_head_dim=f.int("qk_rope_head_dim"),
                      v_head_dim=f.int("v_head_dim"),
                      q_lora_rank=0 if f.cfg.get("q_lora_rank") is None else f.int("q_lora_rank"))
    return dict(fields, num_experts=f.int("n_routed_experts"), top_k=f.int("num_experts_per_tok"),
                moe_ffn_hidden=f.int("moe_intermediate_size"),
                shared_experts=f.int("n_shared_experts", default=0, minimum=0),
                first_dense_layers=f.int("first_k_dense_replace", default=0, minimum=0))


def _read_gpt2(f: _Fields) -> dict[str, Any]:
    hidden = f.int("n_embd")
    heads = f.int("n_head")
    f.divides("n_head", heads, "n_embd", hidden)
    return dict(
        num_layers=f.int("n_layer"), hidden=hidden, num_heads=heads, num_kv_heads=heads,
        ffn_hidden=f.int("n_inner", default=4 * hidden), vocab=f.int("vocab_size"),
        mlp="gelu", norm="layernorm", position="learned",
        max_seq_len=f.int("n_positions", default=1024),
        tied_embeddings=f.bool("tie_word_embeddings", True), bias=True,
        # GPT-2 trains with dropout (HF defaults 0.1) unless the config turns it off
        dropout=f.any_positive("resid_pdrop", "attn_pdrop", "embd_pdrop", default=0.1),
    )


def _read_gpt_neox(f: _Fields) -> dict[str, Any]:
    hidden = f.int("hidden_size")
    heads = f.int("num_attention_heads")
    f.divides("num_attention_heads", heads, "hidden_size", hidden)
    return dict(
        num_layers=f.int("num_hidden_layers"), hidden=hidden, num_heads=heads, num_kv_heads=heads,
        ffn_hidden=f.int("intermediate_size"), vocab=f.int("vocab_size"),
        mlp="gelu", norm="layernorm", position="rope",
        max_seq_len=f.int("max_position_embeddings", default=2048),
        tied_embeddings=f.bool("tie_word_embeddings", False), bias=True,
    )


_HF_READERS: dict[str, Callable[[_Fields], dict[str, Any]]] = {
    "llama": _read_llama,
    "mistral": lambda f: _read_llama(f, max_seq_default=4096 * 32),
    "mixtral": _read_mixtral,
    "qwen2": _read_qwen2,
    "qwen2_moe": _read_qwen2_moe,
    "deepseek": _read_deepseek,
    "deepseek_v2": _read_deepseek,
    "deepseek_v3": _read_deepseek,
    "gpt2": _read_gpt2,
    "gpt_neox": _read_gpt_neox,
}


def _hf_family(cfg: dict[str, Any], where: str) -> str:
    model_type = cfg.get("model_type")
    if model_type is None:  # infer from the field names
        if "n_embd" in cfg or "n_layer" in cfg:
            return "gpt2"
        if "use_parallel_residual" in cfg or "rotary_pct" in cfg:
            return "gpt_neox"
        if "n_routed_experts" in cfg:
            return "deepseek"
        if "num_local_experts" in cfg:
            return "mixtral"
        if "num_experts" in cfg and "moe_intermediate_size" in cfg:
            return "qwen2_moe"
        return "llama"
    if model_type not in _HF_READERS:
        raise ModelError(f"{where}: model_type {model_type!r} not supported; allowed: {', '.join(_HF_READERS)}")
    return model_type

"""Published reference data (``validation/reference/``), read into DataFrames.

These are other people's numbers with their citations (see ``validation/reference/README.md``),
used to check predictions; they are not calibration inputs.
"""
from __future__ import annotations

import dataclasses
import functools
from importlib import resources
from typing import Any, Mapping

import pandas as pd
import yaml

from plansim.workloads.models import ModelSpec

_PACKAGE = "plansim.validation"
MEGATRON_A100_PEAK_FLOPS = 312e12  # the peak Narayanan et al. use for "% of peak" (A100 16-bit dense)


def load_megatron_table1() -> pd.DataFrame:
    """Table 1 of Narayanan et al., SC'21 (arXiv:2104.04473): 10 GPT models, 1.7 B to 1 T parameters.

    ``layers_per_virtual_stage`` is a nullable integer (``<NA>``: no interleaving); a column
    ``virtual_stages`` (v = layers / (pp · layers_per_virtual_stage), 1 without interleaving)
    is added for convenience.
    """
    path = resources.files(_PACKAGE).joinpath("reference", "megatron_table1.csv")
    with path.open("r", encoding="utf-8") as fh:
        df = pd.read_csv(fh)
    df["layers_per_virtual_stage"] = df["layers_per_virtual_stage"].astype("Int64")
    lpvs = df["layers_per_virtual_stage"]
    df["virtual_stages"] = [
        1 if pd.isna(n) else layers // (pp * int(n))
        for layers, pp, n in zip(df["layers"], df["pp"], lpvs)
    ]
    return df


def load_korthikanti2022() -> pd.DataFrame:
    """Measured Megatron-LM iteration times of Korthikanti et al. 2022 (arXiv:2205.05198): four
    GPT models, full recomputation vs sequence parallelism + selective recomputation."""
    path = resources.files(_PACKAGE).joinpath("reference", "korthikanti2022.csv")
    with path.open("r", encoding="utf-8") as fh:
        return pd.read_csv(fh)


def megatron_model_flops_per_iteration(row: Mapping[str, Any]) -> float:
    """Model FLOPs per iteration, no recomputation: 72·B·s·l·h²·(1 + s/(6h) + V/(12·l·h))
    (Korthikanti et al. 2022 §6, the numerator of their MFU)."""
    b, s, l, h, v = (float(row[k]) for k in ("global_batch", "seq_len", "layers", "hidden", "vocab"))
    return 72.0 * b * s * l * h * h * (1.0 + s / (6.0 * h) + v / (12.0 * l * h))


def megatron_gpt_spec(row: Mapping[str, Any]) -> ModelSpec:
    """The GPT model of one Table 1 row: GELU MLP 4h, LayerNorm, learned positions, biases, dropout,
    tied embeddings, vocabulary 51,200, sequence 2048 (the paper's setup)."""
    hidden = int(row["hidden"])
    # Megatron's defaults --hidden-dropout 0.1 --attention-dropout 0.1 were not overridden by the
    # authors' script; ModelSpec records dropout where it has the field (activation memory).
    extra = {"dropout": True} if "dropout" in {f.name for f in dataclasses.fields(ModelSpec)} else {}
    return ModelSpec(
        name=f"megatron-gpt-{row['model'] if 'model' in row else format(float(row['params_b']), 'g') + 'b'}",
        num_layers=int(row["layers"]),
        hidden=hidden,
        num_heads=int(row["heads"]),
        num_kv_heads=int(row["heads"]),
        ffn_hidden=4 * hidden,
        vocab=int(row.get("vocab", 51200)),
        mlp="gelu",
        norm="layernorm",
        position="learned",
        max_seq_len=int(row.get("seq_len", 2048)),
        tied_embeddings=True,
        bias=True,
        **extra,
    )


def megatron_flops_per_iteration(row: Mapping[str, Any]) -> float:
    """F = 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)), Narayanan et al. SC'21 §5.1: training FLOPs per
    iteration *with* the recomputation forward (hardware FLOPs), the paper's TFLOP/s convention."""
    b, s, l, h, v = (float(row[k]) for k in ("global_batch", "seq_len", "layers", "hidden", "vocab"))
    return 96.0 * b * s * l * h * h * (1.0 + s / (6.0 * h) + v / (16.0 * l * h))


def megatron_params(row: Mapping[str, Any]) -> float:
    """P = 12·l·h²·(1 + 13/(12h) + (V + s)/(12·l·h)), Narayanan et al. SC'21 §5.1."""
    s, l, h, v = (float(row[k]) for k in ("seq_len", "layers", "hidden", "vocab"))
    return 12.0 * l * h * h * (1.0 + 13.0 / (12.0 * h) + (v + s) / (12.0 * l * h))


def megatron_step_time_s(row: Mapping[str, Any]) -> float:
    """The step time the published TFLOP/s per GPU implies: F / (TFLOP/s · 10¹² · GPUs)."""
    return megatron_flops_per_iteration(row) / (float(row["tflops_per_gpu"]) * 1e12 * float(row["gpus"]))


def load_llama3_table4() -> pd.DataFrame:
    """Llama 3 405B's pre-training layouts and achieved BF16 TFLOP/s per GPU on up to 16,384 H100s
    (Grattafiori et al. 2024, Table 4): Meta's own stack, its FLOP convention and attention kernel
    not stated, so they are compared as MFU bands, not as a prediction of one run."""
    path = resources.files(_PACKAGE).joinpath("reference", "llama3_table4.csv")
    with path.open("r", encoding="utf-8") as fh:
        return pd.read_csv(fh)


def load_published_runs() -> pd.DataFrame:
    """Published training throughput of other software stacks (``published_runs.csv``): NeMo and
    Megatron-Bridge (Megatron-Core), torchtitan, llm-foundry and Megatron-DeepSpeed runs, each with
    its source, its plan as plansim's fields (empty: plansim's default) and the tokens/s per GPU it
    reached."""
    path = resources.files(_PACKAGE).joinpath("reference", "published_runs.csv")
    with path.open("r", encoding="utf-8") as fh:
        return pd.read_csv(fh)


@functools.lru_cache(maxsize=1)
def _published_specs() -> dict[str, dict[str, Any]]:
    """``published_models.yaml``, read once."""
    path = resources.files(_PACKAGE).joinpath("reference", "published_models.yaml")
    with path.open("r", encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def published_model(name: str, seq_len: int) -> str | ModelSpec:
    """The model of a ``published_runs.csv`` row: a built-in name, or a spec from
    ``published_models.yaml`` for the models plansim has no built-in for; learned position
    embeddings without a stated size get the run's sequence length."""
    specs = _published_specs()
    if name not in specs:
        return name
    fields = dict(specs[name])
    if fields.get("position") == "learned":
        fields.setdefault("max_seq_len", seq_len)
    return ModelSpec(name=name, **fields)

"""This project's parameters -> a Hugging Face folder (`config.json` + `model.safetensors`).

The inverse of `mapping.HF_RULES`: each rule's transform has an inverse below that turns one slice of a
parameter back into PyTorch `[out, in]` layout. The result loads in transformers as `MixtralForCausalLM`
(or `MistralForCausalLM` for a dense model).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import ml_dtypes
import numpy as np

from mixtral_jax import outputs
from mixtral_jax.config import ModelConfig
from mixtral_jax.convert import mapping
from mixtral_jax.convert.mapping import Transform
from mixtral_jax.errors import ConfigError

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def q_out(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """[D, N, H] -> [N*H, D]."""
    return w.reshape(cfg.dim, -1).T


def o_in(w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """[N, H, D] -> [D, N*H]."""
    return w.reshape(-1, cfg.dim).T


INVERSE: dict[Transform, Transform] = {
    mapping.identity: mapping.identity,
    mapping.transpose: mapping.transpose,
    mapping.q_in: q_out,
    mapping.kv_in: q_out,
    mapping.o_out: o_in,
}


def hf_tensors(cfg: ModelConfig, params: dict[str, Any], dtype: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, contiguous array) for every tensor of parameters in the checkpoint layout (path -> array,
    `Mixtral.checkpoint_params`)."""
    np_dtype = DTYPES[dtype or cfg.param_dtype]
    for rule in mapping.rules_for("hf", cfg):
        full = np.asarray(jax.device_get(params[rule.target]))
        counts = (cfg.n_layers, cfg.n_experts)[: rule.stacked_axes]
        for index in itertools.product(*map(range, counts)):
            name = rule.source.format(**dict(zip(("layer", "expert"), index)))
            w = INVERSE[rule.transform](full[index], cfg)
            yield name, np.ascontiguousarray(w.astype(np_dtype))


def hf_config(cfg: ModelConfig, dtype: str | None = None) -> dict[str, Any]:
    """`config.json` for transformers' MixtralForCausalLM, or MistralForCausalLM when dense."""
    hf = {
        "architectures": ["MixtralForCausalLM" if cfg.is_moe else "MistralForCausalLM"],
        "model_type": "mixtral" if cfg.is_moe else "mistral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "sliding_window": cfg.sliding_window,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "bos_token_id": cfg.bos_id,
        "eos_token_id": cfg.eos_id,
        "dtype": dtype or cfg.param_dtype,
        "use_cache": True,
    }
    if cfg.is_moe:
        hf.update(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
                  router_aux_loss_coef=cfg.router_aux_loss_coef, output_router_logits=False)
    return hf


def export(cfg: ModelConfig, params: dict[str, Any], folder: str | os.PathLike,
           dtype: str | None = None, tokenizer: str | os.PathLike | None = None, force: bool = False,
           sources: Sequence[str | os.PathLike] = ()) -> Path:
    """Write `config.json`, `model.safetensors` (and `tokenizer.model`) as the folder `folder`.

    The files are written into a staging folder that replaces `folder` only when complete; an existing
    `folder` is refused unless `force`, and replaced only where `outputs.check_replaceable` allows it
    (`sources`: the folders the weights came from).
    """
    from safetensors.numpy import save_file

    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"export dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_exportable(cfg)
    with outputs.staging(folder, "export", force, sources) as tmp:
        save_file(dict(hf_tensors(cfg, params, dtype)), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        outputs.readable_by_all(tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, dtype), indent=2) + "\n")
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.model")
    return Path(folder)


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse quantised weights: transformers' Mixtral reads float weights, and dequantised ones would pass
    off the quantisation's rounding as the model's."""
    if cfg.quantize != "none":
        raise ConfigError(f"the model's weights are {cfg.quantize}: transformers' Mixtral reads float weights; "
                          "export the 16-bit checkpoint it was quantised from")

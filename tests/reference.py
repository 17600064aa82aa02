"""Reference checkpoints from Hugging Face transformers (random weights) and their log-probs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

from mixtral_jax.convert.mapping import half_to_interleaved

BASE = dict(
    vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.15, rope_theta=1e6,
)


def make_hf_checkpoint(folder: Path, seed: int = 0, dense: bool = False, **overrides) -> Path:
    """Save a random-weight `MixtralForCausalLM` (or dense `MistralForCausalLM`) to `folder`, float32."""
    kwargs = {**BASE, **overrides}
    theta = kwargs.pop("rope_theta")
    if dense:
        cfg = MistralConfig(**kwargs, rope_parameters={"rope_type": "default", "rope_theta": theta})
        model_cls = MistralForCausalLM
    else:
        kwargs.setdefault("num_local_experts", 4)
        kwargs.setdefault("num_experts_per_tok", 2)
        cfg = MixtralConfig(**kwargs, rope_parameters={"rope_type": "default", "rope_theta": theta})
        model_cls = MixtralForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(cfg).float().eval()
    model.save_pretrained(folder)
    return folder


def hf_logprobs(folder: Path, ids: np.ndarray) -> np.ndarray:
    """transformers' log-probs [B, T, V] (float32, eager attention) for token ids [B, T]."""
    cfg = json.loads((folder / "config.json").read_text())
    model_cls = MistralForCausalLM if cfg["model_type"] == "mistral" else MixtralForCausalLM
    model = model_cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits
    return torch.log_softmax(logits.float(), dim=-1).numpy()


def hf_to_mistral_names(folder: Path, out: Path) -> dict[str, torch.Tensor]:
    """The same weights under Mistral's consolidated names and RoPE row order, plus `params.json`."""
    cfg = json.loads((folder / "config.json").read_text())
    from safetensors.torch import load_file

    hf = load_file(folder / "model.safetensors")
    n, k = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    tensors = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
               "output.weight": hf["lm_head.weight"]}
    for layer in range(cfg["num_hidden_layers"]):
        p, q = f"model.layers.{layer}.", f"layers.{layer}."
        tensors[q + "attention.wq.weight"] = torch.from_numpy(
            half_to_interleaved(hf[p + "self_attn.q_proj.weight"].numpy(), n).copy())
        tensors[q + "attention.wk.weight"] = torch.from_numpy(
            half_to_interleaved(hf[p + "self_attn.k_proj.weight"].numpy(), k).copy())
        tensors[q + "attention.wv.weight"] = hf[p + "self_attn.v_proj.weight"]
        tensors[q + "attention.wo.weight"] = hf[p + "self_attn.o_proj.weight"]
        tensors[q + "attention_norm.weight"] = hf[p + "input_layernorm.weight"]
        tensors[q + "ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
        tensors[q + "feed_forward.gate.weight"] = hf[p + "block_sparse_moe.gate.weight"]
        for e in range(cfg["num_local_experts"]):
            for w in ("w1", "w2", "w3"):
                tensors[q + f"feed_forward.experts.{e}.{w}.weight"] = hf[p + f"block_sparse_moe.experts.{e}.{w}.weight"]
    params = {
        "dim": cfg["hidden_size"], "n_layers": cfg["num_hidden_layers"], "head_dim": cfg["hidden_size"] // n,
        "hidden_dim": cfg["intermediate_size"], "n_heads": n, "n_kv_heads": k, "norm_eps": cfg["rms_norm_eps"],
        "vocab_size": cfg["vocab_size"], "rope_theta": cfg["rope_parameters"]["rope_theta"],
        "moe": {"num_experts": cfg["num_local_experts"], "num_experts_per_tok": cfg["num_experts_per_tok"]},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(params))
    return tensors


def write_mistral_safetensors(folder: Path, out: Path) -> Path:
    save_file({k: v.contiguous() for k, v in hf_to_mistral_names(folder, out).items()},
              out / "consolidated.safetensors")
    return out


def write_hf_shards(folder: Path, out: Path, shards: int) -> Path:
    """The same Hugging Face checkpoint split into `shards` safetensors files with an index."""
    from safetensors.torch import load_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text((folder / "config.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    names, weight_map = list(tensors), {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i * len(names) // shards:(i + 1) * len(names) // shards]
        save_file({n: tensors[n].contiguous() for n in part}, out / file)
        weight_map |= dict.fromkeys(part, file)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def write_mistral_pth(folder: Path, out: Path) -> Path:
    """Mistral's consolidated release as one `consolidated.00.pth` (per-expert names)."""
    tensors = hf_to_mistral_names(folder, out)
    torch.save({k: v.contiguous() for k, v in tensors.items()}, out / "consolidated.00.pth")
    return out


def write_megablocks_pt(folder: Path, out: Path, files: int = 2) -> Path:
    """The Hub's original `consolidated.NN.pt` set: layers spread over `files`, experts stacked MegaBlocks-style
    (`block_sparse_moe.w1/w3` [E*F, D], `w2` stored transposed per expert), `params.json` without rope_theta."""
    tensors = hf_to_mistral_names(folder, out)
    params = json.loads((out / "params.json").read_text())
    params.pop("rope_theta")
    (out / "params.json").write_text(json.dumps(params))
    n_layers, n_experts = params["n_layers"], params["moe"]["num_experts"]
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(files)]
    for name, w in tensors.items():
        layer = int(name.split(".")[1]) if name.startswith("layers.") else 0
        part = parts[layer * files // n_layers]
        if ".feed_forward.experts." in name:
            continue
        part[name.replace("feed_forward.gate", "block_sparse_moe.gate")] = w.contiguous()
    for layer in range(n_layers):
        part = parts[layer * files // n_layers]
        for w in ("w1", "w2", "w3"):
            experts = [tensors[f"layers.{layer}.feed_forward.experts.{e}.{w}.weight"] for e in range(n_experts)]
            experts = [x.T for x in experts] if w == "w2" else experts
            part[f"layers.{layer}.block_sparse_moe.{w}"] = torch.cat(experts).contiguous()
    for i, part in enumerate(parts):
        torch.save(part, out / f"consolidated.{i:02d}.pt")
    return out

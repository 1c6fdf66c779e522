"""Hugging Face interop: Llama/Qwen2-architecture checkpoints in and out, no conversion scripts.

Our parameter names are HF's minus the ``model.`` prefix, and RoPE uses HF's
half-split layout, so both directions are a rename plus a config translation.
Anything the decoder cannot reproduce exactly (rope scaling, MLP or output
biases, sliding windows, other activations) is refused with a clear error
rather than imported into a model that would silently compute something else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastserve_ray.atomic import atomic_directory
from fastserve_ray.config import ModelConfig
from fastserve_ray.errors import FastServeError, ModelDirError
from fastserve_ray.models.factory import build_empty_model
from fastserve_ray.models.model_dir import load_model_dir, save_model_dir
from fastserve_ray.models.model_store import check_output_location, is_remote, model_output
from fastserve_ray.models.weights import load_into_model, load_tensors, save_tensors, state_dict_for_saving
from fastserve_ray.tokenizer import Tokenizer

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


class UnsupportedCheckpointError(FastServeError):
    """A Hugging Face checkpoint uses a feature the decoder does not implement."""


def _rope_theta(hf: dict[str, Any]) -> float:
    # transformers 5 nests RoPE settings under rope_parameters; 4.x kept them top level.
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for source in (params, scaling):
        rope_type = source.get("rope_type", source.get("type", "default"))
        if rope_type not in (None, "default"):
            raise UnsupportedCheckpointError(f"rope scaling type {rope_type!r} is not supported")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict[str, Any], source: Path) -> ModelConfig:
    """Translate a HF config.json dict into our ModelConfig, refusing what we cannot run exactly."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedCheckpointError(
            f"{source}: model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedCheckpointError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported")
    if hf.get("mlp_bias"):
        raise UnsupportedCheckpointError(f"{source}: mlp_bias=true is not supported")
    if model_type == "llama" and hf.get("attention_bias"):
        raise UnsupportedCheckpointError(
            f"{source}: Llama attention_bias=true (bias on the output projection) is not supported"
        )
    if hf.get("use_sliding_window"):
        raise UnsupportedCheckpointError(f"{source}: sliding-window attention is not supported")
    dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or dim // n_heads
    if head_dim * n_heads != dim:
        raise UnsupportedCheckpointError(
            f"{source}: head_dim {head_dim} x {n_heads} heads != hidden_size {dim} is not supported"
        )
    try:
        return ModelConfig(
            arch="llama",
            vocab_size=hf["vocab_size"],
            dim=dim,
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            ffn_dim=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_theta=_rope_theta(hf),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            qkv_bias=model_type == "qwen2",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=hf.get("initializer_range", 0.02),
        )
    except KeyError as e:
        raise ModelDirError(f"{source}: required key {e} is missing") from None


def config_to_hf(cfg: ModelConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """HF config.json for our decoder: Qwen2ForCausalLM when q/k/v have biases, else Llama."""
    if cfg.is_recurrent:
        raise UnsupportedCheckpointError(
            f"architecture {cfg.arch!r} has no Hugging Face Llama equivalent; only 'llama' exports"
        )
    model_type = "qwen2" if cfg.qkv_bias else "llama"
    hf = {
        "architectures": ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"],
        "model_type": model_type,
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
        # Both spellings, so transformers 4.x (rope_theta) and 5.x (rope_parameters) agree.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": "float32",
    }
    if model_type == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    else:
        hf.update(use_sliding_window=False)
    return hf


def import_hf(hf_dir: str | Path, model_dir: str | Path, overwrite: bool = False) -> Path:
    """Convert a local HF Llama/Qwen2 checkpoint (single or sharded safetensors) to a model directory."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ModelDirError(f"{config_path} does not exist: {hf_dir} is not a Hugging Face checkpoint")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{config_path} is not valid JSON ({e})") from None
    cfg = config_from_hf(hf, config_path)
    tokenizer_path = hf_dir / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise ModelDirError(
            f"{tokenizer_path} does not exist: fastserve-ray needs the fast-tokenizer file "
            "(tokenizer.json) to encode prompts"
        )
    tokenizer = Tokenizer.load(tokenizer_path)
    tensors = {}
    for name, t in load_tensors(hf_dir).items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope_theta
        tensors[name.removeprefix("model.")] = t
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    model = build_empty_model(cfg)
    load_into_model(model, tensors, hf_dir)
    lineage = {"imported_from": {"path": str(hf_dir.resolve()), "model_type": hf["model_type"]}}
    return save_model_dir(model_dir, model, tokenizer, lineage=lineage, overwrite=overwrite)


def write_hf_tokenizer(tokenizer: Tokenizer, hf_dir: Path) -> None:
    """tokenizer.json plus the tokenizer_config.json transformers' AutoTokenizer reads.

    The tokenizer's own side files (generation_config.json, chat_template.jinja) go along;
    its tokenizer_config.json is kept with the keys AutoTokenizer needs set on top.
    """
    tokenizer.save(hf_dir / "tokenizer.json")  # writes the side files too
    special = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "pad_token": tokenizer.pad_id}
    tok_config = {**tokenizer.config, "tokenizer_class": "PreTrainedTokenizerFast"}
    tok_config.setdefault("clean_up_tokenization_spaces", False)
    for key, tid in special.items():
        if tid is not None:
            tok_config[key] = tokenizer.hf.id_to_token(tid)
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")


def export_hf(model_dir: str | Path, hf_dir: str | Path, overwrite: bool = False) -> Path | str:
    """Write a model directory as a HF checkpoint that transformers' AutoModelForCausalLM loads.

    Either side may be a URI (read through this node's cache; written locally, then uploaded)."""
    loaded = load_model_dir(model_dir)
    hf_config = config_to_hf(loaded.config, loaded.tokenizer)
    check_output_location(hf_dir, overwrite)
    with model_output(hf_dir) as local, atomic_directory(local) as tmp:
        tensors = {}
        for name, t in state_dict_for_saving(loaded.model).items():
            tensors[name if name.startswith("lm_head") else f"model.{name}"] = t
        save_tensors(tensors, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        write_hf_tokenizer(loaded.tokenizer, tmp)
    return str(hf_dir) if is_remote(hf_dir) else Path(hf_dir)

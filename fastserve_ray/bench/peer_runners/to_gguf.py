"""An `export-hf` checkpoint (Llama or Qwen2 shape) as a GGUF file for llama.cpp.

Run by .venv-peers/bin/python, where the gguf package is installed.

usage: to_gguf.py HF_DIR OUT.gguf {f32,bf16,q8_0}

The tensor names, the q/k row permutation of the llama architecture (Hugging Face rotates
halves, ggml's llama RoPE rotates adjacent pairs) and the byte-level BPE vocabulary follow
llama.cpp's own convert_hf_to_gguf.py, so the file is what a llama.cpp user would make. The
vocabulary is padded to the embedding's rows with unused tokens (our tokenizers may train
fewer than the model's vocab_size). Norms stay float32, as llama.cpp's converter keeps them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

# Names of the gguf package's (quantization type, file type) enums; gguf is imported where it is
# used, so that the pure-numpy parts (permute) also import where it is not installed.
FTYPES = {"f32": ("F32", "ALL_F32"), "bf16": ("BF16", "MOSTLY_BF16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
HF_TO_GGUF = {"input_layernorm.weight": "attn_norm.weight",
              "post_attention_layernorm.weight": "ffn_norm.weight",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of one q or k projection from rotate-half order to adjacent-pair order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    layer, rest = name.removeprefix("model.layers.").split(".", 1)
    for hf, gg in HF_TO_GGUF.items():
        if rest.startswith(hf):
            return f"blk.{layer}.{gg}{rest[len(hf):]}"
    raise ValueError(f"no GGUF name for tensor {name!r}")


def add_vocab(w: Any, hf_dir: Path, n_vocab: int, cfg: dict) -> None:
    import gguf

    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    if tok["model"]["type"] != "BPE":
        raise ValueError(f"{hf_dir}/tokenizer.json: only byte-level BPE converts, not {tok['model']['type']}")
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    special = {a["id"]: a["content"] for a in tok.get("added_tokens", [])}
    by_id.update(special)
    tokens, types = [], []
    for i in range(n_vocab):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("pad_token_id", w.add_pad_token_id)):
        if isinstance(cfg.get(key), int):
            add(cfg[key])
    w.add_add_bos_token(False)


def convert(hf_dir: Path, out: Path, ftype: str) -> int:
    """Write ``out``; returns the bytes of its tensors (what a decode step reads, tied head included)."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = {"llama": "llama", "qwen2": "qwen2"}.get(cfg["model_type"])
    if arch is None:
        raise ValueError(f"{hf_dir}/config.json: model_type {cfg['model_type']!r} does not convert")
    qtype = gguf.GGMLQuantizationType[FTYPES[ftype][0]]
    file_type = gguf.LlamaFileType[FTYPES[ftype][1]]
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    tensors = load_file(str(hf_dir / "model.safetensors"))
    tmp = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(hf_dir.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(file_type)
    add_vocab(w, hf_dir, cfg["vocab_size"], cfg)
    nbytes = 0
    for name, data in tensors.items():
        data = data.astype(np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            data = permute(data, n_head)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            data = permute(data, n_kv)
        target = qtype if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        stored = data if target == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(data, target)
        nbytes += stored.nbytes
        # The writer turns a quantized tensor's byte shape back into its element shape itself.
        w.add_tensor(gguf_name(name), stored, raw_dtype=None if stored is data else target)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)  # atomic: a failed conversion leaves no .gguf behind
    return nbytes


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[3] not in FTYPES:
        sys.exit(f"usage: {sys.argv[0]} HF_DIR OUT.gguf {{{','.join(FTYPES)}}}")
    print(json.dumps({"tensor_bytes": convert(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])}))

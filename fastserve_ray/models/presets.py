"""Named model configs, with overrides: ``get_preset("small", n_layers=2)`` or "small,n_layers=2"."""

from __future__ import annotations

from typing import Any

import yaml

from fastserve_ray.config import ModelConfig
from fastserve_ray.errors import ConfigError

PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: ~0.1M parameters, runs in milliseconds.
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                 max_seq_len=256),
    # Demo: ~2.9M non-embedding parameters, trains usefully in minutes on 2 CPU cores.
    "small": dict(vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=704,
                  max_seq_len=512),
    # Benchmarks: ~26M non-embedding parameters (dim 512, 8 layers).
    "bench": dict(vocab_size=8192, dim=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=1408,
                  max_seq_len=1024),
    # GPU clusters (GPT-2 small/medium and TinyLlama-like sizes).
    "llama-125m": dict(vocab_size=50304, dim=768, n_layers=12, n_heads=12, ffn_dim=2048,
                       max_seq_len=2048),
    "llama-350m": dict(vocab_size=50304, dim=1024, n_layers=24, n_heads=16, ffn_dim=2816,
                       max_seq_len=2048),
    "llama-1b": dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                     ffn_dim=5632, max_seq_len=2048, tie_embeddings=False),
    # Recurrent LMs (the FastServe write-up's RNN/LSTM/GRU family).
    "rnn-tiny": dict(arch="rnn", vocab_size=512, dim=64, n_layers=2, max_seq_len=256),
    "lstm-tiny": dict(arch="lstm", vocab_size=512, dim=64, n_layers=2, max_seq_len=256),
    "gru-tiny": dict(arch="gru", vocab_size=512, dim=64, n_layers=2, max_seq_len=256),
    "lstm-small": dict(arch="lstm", vocab_size=4096, dim=512, n_layers=2, max_seq_len=512),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The preset ``name`` with ``overrides`` applied; unknown names or keys are ConfigErrors."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides}, where=f"preset {name!r}")


def parse_preset_spec(spec: str) -> ModelConfig:
    """Parse "NAME[,key=value,...]" (values in YAML syntax), e.g. "small,n_layers=2"."""
    name, *pairs = [p.strip() for p in spec.split(",") if p.strip()] or [""]
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"preset override {pair!r} in {spec!r} must look like key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    return get_preset(name, **overrides)

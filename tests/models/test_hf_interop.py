"""HF interop: a random transformers model in, ours out, logits equal both ways (fp32)."""

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fastserve_ray.errors import FastServeError, ModelDirError
from fastserve_ray.models import build_model, get_preset, load_model_dir, save_model_dir
from fastserve_ray.models.hf import UnsupportedCheckpointError, export_hf, import_hf

SHAPE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=400, max_position_embeddings=128, rope_theta=5000.0,
             rms_norm_eps=1e-6)


def random_hf_model(cls, config_cls, **overrides):
    torch.manual_seed(0)
    model = cls(config_cls(**{**SHAPE, **overrides})).eval()
    with torch.no_grad():  # perturb everything, so zero-initialised biases and norms matter too
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def write_hf_dir(model, path, tokenizer, **save_kwargs):
    model.save_pretrained(path, **save_kwargs)
    tokenizer.save(path / "tokenizer.json")
    return path


def max_logit_diff(hf_model, ours, tokens):
    with torch.no_grad():
        return (hf_model(tokens).logits - ours(tokens)).abs().max().item()


@pytest.mark.parametrize(
    ("cls", "config_cls", "overrides"),
    [
        (LlamaForCausalLM, LlamaConfig, {}),
        (LlamaForCausalLM, LlamaConfig, {"tie_word_embeddings": True}),
        (Qwen2ForCausalLM, Qwen2Config, {}),  # q/k/v biases
    ],
    ids=["llama", "llama-tied", "qwen2-bias"],
)
def test_import_matches_transformers_logits(tmp_path, tiny_tokenizer, cls, config_cls, overrides):
    hf_model = random_hf_model(cls, config_cls, **overrides)
    hf_dir = write_hf_dir(hf_model, tmp_path / "hf", tiny_tokenizer)
    import_hf(hf_dir, tmp_path / "ours")
    loaded = load_model_dir(tmp_path / "ours")
    assert loaded.config.qkv_bias == (cls is Qwen2ForCausalLM)
    assert loaded.manifest["lineage"]["imported_from"]["model_type"] == hf_model.config.model_type
    tokens = torch.randint(0, 400, (2, 37))
    assert max_logit_diff(hf_model, loaded.model, tokens) <= 1e-4


def test_import_sharded_checkpoint(tmp_path, tiny_tokenizer):
    hf_model = random_hf_model(LlamaForCausalLM, LlamaConfig)
    hf_dir = write_hf_dir(hf_model, tmp_path / "hf", tiny_tokenizer, max_shard_size="40KB")
    assert (hf_dir / "model.safetensors.index.json").is_file()
    assert len(list(hf_dir.glob("model-*.safetensors"))) > 1
    import_hf(hf_dir, tmp_path / "ours")
    tokens = torch.randint(0, 400, (1, 20))
    assert max_logit_diff(hf_model, load_model_dir(tmp_path / "ours").model, tokens) <= 1e-4


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": True, "tie_embeddings": False}])
def test_export_loads_in_transformers(tmp_path, tiny_tokenizer, overrides):
    torch.manual_seed(1)
    model = build_model(get_preset("tiny", vocab_size=400, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_model_dir(tmp_path / "ours", model, tiny_tokenizer)
    export_hf(tmp_path / "ours", tmp_path / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    expected = Qwen2ForCausalLM if overrides else LlamaForCausalLM
    assert isinstance(hf_model, expected)
    tokens = torch.randint(0, 400, (2, 33))
    assert max_logit_diff(hf_model, model, tokens) <= 1e-4
    # And back again: export -> import is lossless.
    import_hf(tmp_path / "hf", tmp_path / "again")
    assert max_logit_diff(hf_model, load_model_dir(tmp_path / "again").model, tokens) <= 1e-4


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"attention_bias": True}, "attention_bias=true"),
        ({"mlp_bias": True}, "mlp_bias=true"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling type 'linear'"),
    ],
)
def test_unsupported_llama_features_are_refused(tmp_path, tiny_tokenizer, overrides, needle):
    config = LlamaConfig(**SHAPE).to_dict()
    config.update(overrides)
    if "rope_scaling" in overrides:
        config["rope_parameters"] = {**overrides["rope_scaling"], "rope_theta": 5000.0}
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(config))
    tiny_tokenizer.save(hf_dir / "tokenizer.json")
    with pytest.raises(UnsupportedCheckpointError, match=needle):
        import_hf(hf_dir, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def test_import_bad_inputs(tmp_path, tiny_tokenizer):
    with pytest.raises(ModelDirError, match="config.json does not exist"):
        import_hf(tmp_path / "missing", tmp_path / "ours")
    hf_dir = tmp_path / "hf"
    random_hf_model(LlamaForCausalLM, LlamaConfig).save_pretrained(hf_dir)
    with pytest.raises(ModelDirError, match="tokenizer.json does not exist"):
        import_hf(hf_dir, tmp_path / "ours")
    config = json.loads((hf_dir / "config.json").read_text())
    config["model_type"] = "gpt2"
    (hf_dir / "config.json").write_text(json.dumps(config))
    tiny_tokenizer.save(hf_dir / "tokenizer.json")
    with pytest.raises(UnsupportedCheckpointError, match="model_type 'gpt2' is not supported"):
        import_hf(hf_dir, tmp_path / "ours")


def test_recurrent_models_do_not_export(tmp_path, tiny_tokenizer):
    save_model_dir(tmp_path / "lstm", build_model(get_preset("lstm-tiny", vocab_size=400)), tiny_tokenizer)
    with pytest.raises(FastServeError, match="'lstm' has no Hugging Face Llama equivalent"):
        export_hf(tmp_path / "lstm", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()

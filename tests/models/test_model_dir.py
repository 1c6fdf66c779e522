import json

import pytest
import torch

from fastserve_ray.errors import ModelDirError, TokenizerError
from fastserve_ray.models import build_model, get_preset, load_model_dir, read_manifest, save_model_dir
from fastserve_ray.models.model_dir import MANIFEST_FILE


def test_round_trip_preserves_weights_and_manifest(tiny_model_dir, tiny_tokenizer):
    loaded = load_model_dir(tiny_model_dir)
    assert loaded.config == get_preset("tiny")
    assert loaded.tokenizer.vocab_size == tiny_tokenizer.vocab_size
    assert loaded.model.lm_head.weight is loaded.model.embed_tokens.weight
    files = loaded.manifest["files"]
    # tokenizer_config.json carries the special tokens and the chat template
    assert set(files) == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert all(len(meta["sha256"]) == 64 for meta in files.values())
    assert loaded.manifest["lineage"] == {"note": "test fixture"}
    torch.manual_seed(0)
    fresh = build_model(get_preset("tiny"))  # same seed as the fixture: same weights
    tokens = torch.randint(0, 400, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens), fresh(tokens))


@pytest.mark.parametrize("preset", ["lstm-tiny", "gru-tiny"])
def test_recurrent_round_trip(tmp_path, tiny_tokenizer, preset):
    model = build_model(get_preset(preset)).eval()
    save_model_dir(tmp_path / "m", model, tiny_tokenizer)
    loaded = load_model_dir(tmp_path / "m")
    tokens = torch.randint(0, 400, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens), model(tokens))


def copy_dir(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_weights_are_a_clear_error(tiny_model_dir, tmp_path):
    d = copy_dir(tiny_model_dir, tmp_path / "m")
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelDirError, match=r"model.safetensors has \d+ bytes.*truncated"):
        load_model_dir(d)


def test_altered_file_same_size_is_caught_by_sha(tiny_model_dir, tmp_path):
    d = copy_dir(tiny_model_dir, tmp_path / "m")
    weights = d / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelDirError, match="model.safetensors does not match its sha256"):
        load_model_dir(d)


def test_missing_files_and_dirs(tiny_model_dir, tmp_path):
    with pytest.raises(ModelDirError, match="does not exist"):
        load_model_dir(tmp_path / "nothing")
    d = copy_dir(tiny_model_dir, tmp_path / "m")
    (d / "tokenizer.json").unlink()
    with pytest.raises(ModelDirError, match="tokenizer.json is listed in manifest.json but missing"):
        load_model_dir(d)
    d2 = copy_dir(tiny_model_dir, tmp_path / "m2")
    (d2 / MANIFEST_FILE).unlink()
    with pytest.raises(ModelDirError, match="manifest.json is missing"):
        load_model_dir(d2)
    (d2 / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ModelDirError, match="not a valid manifest"):
        read_manifest(d2)


def test_hf_dir_gets_a_hint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelDirError, match="import-hf"):
        load_model_dir(tmp_path)


def test_unverified_load_still_rejects_garbage_weights(tiny_model_dir, tmp_path):
    d = copy_dir(tiny_model_dir, tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelDirError, match="not a readable safetensors file"):
        load_model_dir(d, verify=False)


def test_config_not_matching_weights(tiny_model_dir, tmp_path):
    d = copy_dir(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["dim"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match="has shape .* the config needs"):
        load_model_dir(d, verify=False)
    cfg["n_layers"] = 3
    cfg["dim"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match="missing .*layers.2"):
        load_model_dir(d, verify=False)
    cfg["bogus"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match="unknown key.*'bogus'"):
        load_model_dir(d, verify=False)


def test_tokenizer_vocab_larger_than_model_is_rejected(tmp_path, tiny_tokenizer):
    model = build_model(get_preset("tiny", vocab_size=300))  # tokenizer has 400 tokens
    with pytest.raises(ModelDirError, match="tokenizer has 400 tokens but the model's vocab_size is 300"):
        save_model_dir(tmp_path / "m", model, tiny_tokenizer)
    assert not (tmp_path / "m").exists()


def test_corrupt_tokenizer_names_the_file(tiny_model_dir, tmp_path):
    d = copy_dir(tiny_model_dir, tmp_path / "m")
    (d / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="tokenizer.json is not a valid tokenizer.json"):
        load_model_dir(d, verify=False)


def test_save_refuses_to_clobber_and_leaves_no_temp(tiny_model_dir, tiny_tokenizer, tmp_path):
    model = build_model(get_preset("tiny"))
    out = save_model_dir(tmp_path / "m", model, tiny_tokenizer)
    with pytest.raises(ModelDirError, match="already exists"):
        save_model_dir(out, model, tiny_tokenizer)
    save_model_dir(out, model, tiny_tokenizer, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_sharded_weights_with_index_load(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from fastserve_ray.models.model_dir import write_manifest

    d = copy_dir(tiny_model_dir, tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, chunk in enumerate([names[:half], names[half:]]):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in chunk}, str(d / fname))
        weight_map.update({n: fname for n in chunk})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    write_manifest(d, {})
    sharded = load_model_dir(d)
    ref = load_model_dir(tiny_model_dir)
    for (n1, p1), (n2, p2) in zip(sharded.model.state_dict().items(), ref.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)

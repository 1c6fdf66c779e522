"""Model directories on object storage (a local moto S3): written manifest-last, read through a
verified per-node cache, downloaded once however many processes ask, corrupted objects refused."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import boto3
import pyarrow.fs as pafs
import pytest
import torch
from s3_server import local_s3

from fastserve_ray import cli, storage
from fastserve_ray.compress.recipe import load_recipe
from fastserve_ray.compress.serial import run_serial
from fastserve_ray.data import prepare_data
from fastserve_ray.errors import ModelDirError
from fastserve_ray.models import load_model_dir, save_model_dir
from fastserve_ray.models.model_dir import read_config, read_manifest
from fastserve_ray.models.model_store import CACHE_ENV, DOWNLOAD_LOG, local_model_dir
from fastserve_ray.quantized.loader import load_model


@pytest.fixture(scope="module")
def s3():
    with local_s3() as env:
        yield env


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "node-cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


@pytest.fixture(scope="module")
def remote_tiny(s3, tiny_model_dir) -> str:
    uri = "s3://fsr/models/tiny"
    loaded = load_model_dir(tiny_model_dir)
    save_model_dir(uri, loaded.model, loaded.tokenizer, lineage={"note": "uploaded"})
    return uri


def _downloads(cache: Path) -> list[dict]:
    log = cache / DOWNLOAD_LOG
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _put(uri: str, data: bytes) -> None:
    bucket, key = uri.removeprefix("s3://").split("/", 1)
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data)


def _get(uri: str) -> bytes:
    return storage.read_bytes(uri)


def test_a_model_saved_to_s3_loads_from_a_verified_cache_downloaded_once(remote_tiny, tiny_model_dir, cache):
    assert json.loads(_get(f"{remote_tiny}/manifest.json"))["lineage"] == {"note": "uploaded"}
    first = load_model_dir(remote_tiny)
    assert first.path.parent == cache and first.path.name.startswith("tiny-")
    assert _same_weights(first.model, load_model_dir(tiny_model_dir).model)
    again = load_model(remote_tiny)  # the serving loader, a second time: the cache answers
    assert again.path == first.path
    assert [d["location"] for d in _downloads(cache)] == [remote_tiny]
    assert read_config(remote_tiny) == first.config  # read in place, nothing downloaded
    assert read_manifest(remote_tiny, verify=False)["files"] == first.manifest["files"]
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]


def test_a_republished_model_is_a_new_cache_entry(s3, tiny_model_dir, cache):
    uri = "s3://fsr/models/changing"
    loaded = load_model_dir(tiny_model_dir)
    save_model_dir(uri, loaded.model, loaded.tokenizer, lineage={"v": 1})
    old = local_model_dir(uri)
    with torch.no_grad():
        loaded.model.embed_tokens.weight.add_(1.0)
    with pytest.raises(ModelDirError, match="already exists and is not empty"):
        save_model_dir(uri, loaded.model, loaded.tokenizer)
    save_model_dir(uri, loaded.model, loaded.tokenizer, lineage={"v": 2}, overwrite=True)
    new = load_model_dir(uri)
    assert new.path != old and new.manifest["lineage"] == {"v": 2}
    assert torch.equal(new.model.embed_tokens.weight, loaded.model.embed_tokens.weight)
    assert len(_downloads(cache)) == 2


@pytest.mark.parametrize("damage", ["altered", "truncated", "missing"])
def test_a_corrupted_object_is_a_clear_error_and_nothing_is_cached(s3, tiny_model_dir, cache, damage):
    uri = f"s3://fsr/models/damaged-{damage}"
    loaded = load_model_dir(tiny_model_dir)
    save_model_dir(uri, loaded.model, loaded.tokenizer)
    weights = f"{uri}/model.safetensors"
    data = _get(weights)
    if damage == "altered":
        _put(weights, data[:-1] + bytes([data[-1] ^ 1]))
    elif damage == "truncated":
        _put(weights, data[: len(data) // 2])
    else:
        bucket, key = weights.removeprefix("s3://").split("/", 1)
        boto3.client("s3").delete_object(Bucket=bucket, Key=key)
    expected = {"altered": "does not match its sha256", "truncated": "truncated or altered",
                "missing": "listed in manifest.json but missing"}[damage]
    with pytest.raises(ModelDirError, match=expected) as err:
        load_model(uri)
    assert weights in str(err.value)
    assert not cache.exists() or not [p for p in cache.iterdir() if p.is_dir()]  # no entry, no temp dir


def test_not_a_model_directory_names_the_missing_manifest(s3, cache):
    with pytest.raises(ModelDirError, match=r"s3://fsr/nothing-here/manifest.json is missing"):
        load_model_dir("s3://fsr/nothing-here")


def test_the_manifest_is_uploaded_last(s3, tiny_model_dir, monkeypatch):
    order: list[str] = []
    real = pafs.copy_files

    def recording(src, dest, **kw):
        order.append(Path(dest).name)
        return real(src, dest, **kw)

    monkeypatch.setattr(pafs, "copy_files", recording)
    storage.publish_dir(tiny_model_dir, "s3://fsr/models/ordered", last="manifest.json")
    assert order[-1] == "manifest.json" and len(order) == len(list(tiny_model_dir.iterdir()))


def _fetch_in_child(uri: str, cache: str, env: dict[str, str], out: multiprocessing.Queue) -> None:
    os.environ.update(env)
    os.environ[CACHE_ENV] = cache
    out.put(str(local_model_dir(uri)))


def test_processes_asking_at_once_share_one_download(remote_tiny, s3, tmp_path):
    cache = tmp_path / "shared-node-cache"
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_fetch_in_child, args=(remote_tiny, str(cache), s3, q)) for _ in range(4)]
    for p in procs:
        p.start()
    paths = {q.get(timeout=120) for _ in procs}
    for p in procs:
        p.join(timeout=60)
    assert len(paths) == 1 and all(p.exitcode == 0 for p in procs)
    assert len(_downloads(cache)) == 1


def test_compress_export_eval_and_generate_work_on_s3_locations(remote_tiny, s3, cache, tiny_tokenizer,
                                                                 capsys):
    data = "s3://fsr/data/tiny"
    prepare_data(data, tokenizer_path=tiny_tokenizer.path, seq_len=64, progress=False)
    out = "s3://fsr/models/tiny-int8"
    result = run_serial(remote_tiny, out, load_recipe("int8"), data_dir=data, quiet=True)
    assert result.out_dir == out
    manifest = json.loads(_get(f"{out}/manifest.json"))
    assert manifest["lineage"]["compressed_from"] == remote_tiny
    assert manifest["lineage"]["compression_data"]["data"] == data
    assert json.loads(_get(f"{out}/report.json"))["num_compressed_tensors"] > 0
    compressed = load_model(out)  # downloaded and verified like any other
    assert type(compressed.model.layers[0].self_attn.o_proj).__name__ == "QuantizedLinear"

    assert cli.main(["export-hf", out, "s3://fsr/hf/tiny-int8"]) == 0
    hf_config = json.loads(_get("s3://fsr/hf/tiny-int8/config.json"))
    assert hf_config["quantization_config"]["format"] == "pack-quantized"

    capsys.readouterr()
    assert cli.main(["eval", "--model", out, "--data", data, "--max-rows", "4"]) == 0
    scored = json.loads(capsys.readouterr().out)  # progress lines go to stderr: stdout stays JSON
    assert scored["model"] == out and scored["perplexity"] > 1
    assert cli.main(["generate", "--model", remote_tiny, "--prompt", "hello", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("hello")

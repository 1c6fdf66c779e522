"""The end-to-end demo on the built-in corpus: what `fastserve-ray demo` runs.

Today it covers the stages that exist: prepare the corpus (tokenizer + Parquet
shards), build a model from a preset, save it as a model directory, evaluate
it and generate from it. Training, compression and serving join as they land.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from fastserve_ray.data import check_data_fits_model, prepare_data, read_split
from fastserve_ray.device import default_device
from fastserve_ray.models import build_model, load_model_dir, num_params, parse_preset_spec, save_model_dir
from fastserve_ray.models.evaluate import evaluate_rows
from fastserve_ray.models.generate import generate_text
from fastserve_ray.tokenizer import Tokenizer, file_sha256

PROMPTS = ("The for statement", "A function definition")


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def run_demo(out: Path, preset: str = "small", quick: bool = False) -> dict:
    """Run every available stage into ``out`` and return (and print) a summary."""
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"out": str(out)}
    vocab_size, seq_len = (512, 64) if quick else (4096, 256)

    print(f"device: {default_device()}")
    t = _step(f"1/4 prepare data: built-in corpus (Python's bundled docs) -> {out / 'data'}")
    data = prepare_data(out / "data", vocab_size=vocab_size, seq_len=seq_len, overwrite=True)
    d = data.to_dict()
    summary["data"] = {k: d[k] for k in ("num_documents", "num_tokens", "vocab_size", "seq_len")}
    print(f"   {d['num_documents']} documents, {d['num_tokens']:,} tokens, "
          f"{d['splits']['train']['num_rows']} train rows ({time.perf_counter() - t:.1f}s)")

    t = _step(f"2/4 build model: preset {preset!r}")
    tokenizer = Tokenizer.load(out / "data" / "tokenizer.json")
    overrides = f",vocab_size={tokenizer.vocab_size},max_seq_len={max(seq_len * 2, 128)}"
    if quick:
        overrides += ",dim=64,n_layers=2,n_heads=4,n_kv_heads=2,ffn_dim=128"
    config = parse_preset_spec(preset + overrides)
    torch.manual_seed(0)
    model = build_model(config)
    manifest_sha = file_sha256(out / "data" / "data_manifest.json")
    model_dir = save_model_dir(out / "model", model, tokenizer, overwrite=True,
                               lineage={"data_manifest_sha256": manifest_sha, "trained": False})
    summary["model"] = {"dir": str(model_dir), "arch": config.arch, "params": num_params(model)}
    print(f"   {config.arch} decoder, {num_params(model):,} parameters -> {model_dir} "
          f"({time.perf_counter() - t:.1f}s)")
    print("   (untrained: data-parallel training with Ray Train is the next stage to land)")

    t = _step("3/4 evaluate: perplexity on the validation split")
    device = default_device()
    loaded = load_model_dir(model_dir, device=device)  # the checksummed loader, as users would
    check_data_fits_model(data, loaded.config, loaded.tokenizer)
    rows = read_split(out / "data", "validation")[:64]
    metrics = evaluate_rows(loaded.model, rows)
    summary["eval"] = metrics
    print(f"   loss {metrics['loss']:.3f}, perplexity {metrics['perplexity']:.1f} "
          f"(uniform guessing would be {loaded.config.vocab_size}) ({time.perf_counter() - t:.1f}s)")

    t = _step("4/4 generate: greedy, 24 tokens")
    summary["samples"] = {}
    for prompt in PROMPTS:
        text = generate_text(loaded.model, loaded.tokenizer, prompt, max_tokens=24)
        summary["samples"][prompt] = text
        print(f"   {prompt!r} -> {text!r}")
    print(f"   ({time.perf_counter() - t:.1f}s)")

    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nsummary written to {out / 'summary.json'}")
    return summary

"""The end-to-end demo on the built-in corpus: what `fastserve-ray demo` runs.

Every stage of the platform in order: prepare the corpus (tokenizer + Parquet
shards), train data-parallel on Ray Train, evaluate the model directory it
wrote, compress it with the Ray task graph (int8), generate from the compressed
directory with the inference engine, and serve the trained model on Ray Serve
(one completion over HTTP, one through a DeploymentHandle).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import ray

from fastserve_ray.compress.demo_step import compress_for_demo
from fastserve_ray.config import TrainConfig
from fastserve_ray.data import check_data_fits_model, prepare_data, read_split
from fastserve_ray.device import default_device
from fastserve_ray.engine import LLMEngine, SamplingParams
from fastserve_ray.models import load_model_dir, num_params
from fastserve_ray.models.evaluate import evaluate_rows
from fastserve_ray.serve.demo_step import serve_and_query
from fastserve_ray.train.trainer import run_training

PROMPTS = ("The for statement", "A function definition")
NUM_STEPS = 6


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _train_config(preset: str, quick: bool) -> TrainConfig:
    if quick:  # seconds, for tests: a tiny model, a handful of steps
        return TrainConfig(preset="tiny", num_workers=2, global_batch_size=8, micro_batch_size=4,
                           max_steps=6, warmup_steps=2, log_interval=2, eval_interval=3,
                           checkpoint_interval=3, eval_rows=32)
    return TrainConfig(preset=preset, num_workers=2, global_batch_size=16, micro_batch_size=8,
                       max_steps=150, warmup_steps=15, lr=3e-3, min_lr=3e-4, log_interval=10,
                       eval_interval=50, checkpoint_interval=50, eval_rows=64)


def run_demo(out: Path, preset: str = "small", quick: bool = False) -> dict:
    """Run every available stage into ``out`` and return (and print) a summary."""
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"out": str(out)}
    train_cfg = _train_config(preset, quick)
    vocab_size, seq_len = (512, 64) if quick else (4096, 256)

    t = _step(f"1/{NUM_STEPS} prepare data: built-in corpus (Python's bundled docs) -> {out / 'data'}")
    data = prepare_data(out / "data", vocab_size=vocab_size, seq_len=seq_len, overwrite=True)
    d = data.to_dict()
    summary["data"] = {k: d[k] for k in ("num_documents", "num_tokens", "vocab_size", "seq_len")}
    print(f"   {d['num_documents']} documents, {d['num_tokens']:,} tokens, "
          f"{d['splits']['train']['num_rows']} train rows ({time.perf_counter() - t:.1f}s)")

    t = _step(f"2/{NUM_STEPS} train: preset {train_cfg.preset!r}, {train_cfg.max_steps} steps, "
              f"{train_cfg.num_workers} Ray Train workers -> {out / 'run'}")
    shutil.rmtree(out / "run", ignore_errors=True)  # a fresh run each time, not a resume
    result = run_training(out / "data", out / "run", train_cfg)
    first, last = result.history[0], result.history[-1]
    summary["train"] = {"steps": last["step"], "first_loss": first["loss"], "final_loss": last["loss"],
                        "tokens_per_s": last["tokens_per_s"], "model_dir": str(result.model_dir)}
    print(f"   loss {first['loss']:.3f} -> {last['loss']:.3f}; metrics.jsonl and loss_curve.png in "
          f"{out / 'run'} ({time.perf_counter() - t:.1f}s)")

    t = _step(f"3/{NUM_STEPS} evaluate: perplexity on the validation split")
    device = default_device()
    loaded = load_model_dir(result.model_dir, device=device)  # the checksummed loader, as users would
    check_data_fits_model(data, loaded.config, loaded.tokenizer)
    metrics = evaluate_rows(loaded.model, read_split(out / "data", "validation")[:64])
    summary["eval"] = metrics
    summary["model"] = {"dir": str(result.model_dir), "params": num_params(loaded.model)}
    print(f"   {num_params(loaded.model):,} parameters; loss {metrics['loss']:.3f}, perplexity "
          f"{metrics['perplexity']:.1f} (uniform guessing: {loaded.config.vocab_size}) "
          f"({time.perf_counter() - t:.1f}s)")

    t = _step(f"4/{NUM_STEPS} compress: int8 recipe through the Ray task graph -> {out / 'int8'}")
    summary["compress"] = compress_for_demo(result.model_dir, out / "data", out / "int8", recipe="int8")
    print(f"   ({time.perf_counter() - t:.1f}s)")

    t = _step(f"5/{NUM_STEPS} generate: the inference engine on the int8 directory, both prompts in one "
              "batch, temperature 0.8, seed 0")
    engine = LLMEngine.from_model_dir(out / "int8", max_num_seqs=len(PROMPTS))  # compressed dirs load as-is
    params = SamplingParams(max_tokens=24, temperature=0.8, seed=0)
    outputs = engine.generate(list(PROMPTS), params)
    summary["samples"] = {prompt: o.text for prompt, o in zip(PROMPTS, outputs)}
    for prompt, o in zip(PROMPTS, outputs):
        print(f"   {prompt!r} -> {o.text!r}")
    del engine
    print(f"   ({time.perf_counter() - t:.1f}s)")

    t = _step(f"6/{NUM_STEPS} serve: the trained model on Ray Serve, OpenAI-compatible HTTP and a handle")
    summary["serve"] = serve_and_query(result.model_dir, PROMPTS[0], max_tokens=16)
    print(f"   ({time.perf_counter() - t:.1f}s)")
    if ray.is_initialized():
        ray.shutdown()

    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nsummary written to {out / 'summary.json'}")
    return summary

"""Training throughput benchmark: plain PyTorch vs Ray Train with 1 and 2 workers, side by side.

All three train the same model (the `bench` preset by default) on the same
prepared data with the same global batch, in one process run, after a GEMM
probe that measures this machine's practical FLOP/s peak. Throughput is the
median tokens/s over the timed windows after a warm-up window.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fastserve_ray.bench.report import print_table, write_json
from fastserve_ray.cluster import ensure_ray
from fastserve_ray.config import TrainConfig
from fastserve_ray.data import prepare_data, read_split
from fastserve_ray.models import build_model, num_params
from fastserve_ray.perf import measure_gemm_flops, train_flops_per_token, tune_cpu_allocator
from fastserve_ray.train.batches import BatchPlan
from fastserve_ray.train.optim import make_optimizer
from fastserve_ray.train.schedule import lr_at
from fastserve_ray.train.trainer import resolve_model_config, run_training

TARGETS = {"ray1_vs_plain": 0.95, "ray2_vs_ray1": 1.7, "mfu_ray2": 0.35}


def plain_tokens_per_s(data_dir: Path, cfg: TrainConfig, window: int) -> list[float]:
    """Tokens/s of each ``window``-step window of a single-process loop (no Ray, no DDP)."""
    model_cfg = resolve_model_config(cfg)
    tune_cpu_allocator()  # as the Ray Train workers do: same allocator on both sides
    rows = read_split(data_dir, "train")
    plan = BatchPlan(len(rows), cfg.global_batch_size, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg)
    optimizer = make_optimizer(model, cfg)
    seq_len = rows.shape[1] - 1
    micro = cfg.micro_batch_size
    rates, start = [], time.perf_counter()
    for step in range(cfg.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        batch = torch.from_numpy(rows[plan.rows(step, 0, 1)]).long()
        optimizer.zero_grad(set_to_none=True)
        for i in range(0, len(batch), micro):
            mb = batch[i : i + micro]
            logits = model(mb[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), mb[:, 1:].flatten(), reduction="sum")
            (loss / (len(batch) * seq_len)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if (step + 1) % window == 0:
            now = time.perf_counter()
            rates.append(window * cfg.global_batch_size * seq_len / (now - start))
            start = now
    return rates


def _steady(rates: list[float]) -> float:
    """Median of the windows after the first (which pays for warm-up and start-up)."""
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def run_train_bench(out: Path | None = None, preset: str = "bench", steps: int = 12, window: int = 3,
                    global_batch_size: int = 8, micro_batch_size: int = 4, seq_len: int = 256) -> dict:
    """Run the three configurations; write JSON to ``out`` and print a table."""
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    base = TrainConfig(preset=preset, global_batch_size=global_batch_size,
                       micro_batch_size=micro_batch_size, max_steps=steps, log_interval=window,
                       checkpoint_interval=steps, eval_rows=0, warmup_steps=2, num_workers=1)
    model_cfg = resolve_model_config(base)
    print(f"[bench train] preparing data (built-in corpus, vocab {model_cfg.vocab_size}, seq_len {seq_len})")
    prepare_data(work / "data", vocab_size=model_cfg.vocab_size, seq_len=seq_len, progress=False)

    cpus = os.cpu_count() or 1
    # The 1-thread probe bounds what 2 one-thread workers can reach: if two threads do not
    # beat one (shared physical core, noisy neighbours), neither can two workers.
    torch.set_num_threads(1)
    gemm_1 = measure_gemm_flops("cpu", torch.float32, size=1024)
    torch.set_num_threads(cpus)
    gemm = measure_gemm_flops("cpu", torch.float32, size=1024)
    print(f"[bench train] GEMM probe: {gemm / 1e9:.1f} GFLOP/s with {cpus} threads, "
          f"{gemm_1 / 1e9:.1f} with 1")

    print("[bench train] plain PyTorch, 1 process")
    plain = _steady(plain_tokens_per_s(work / "data", base, window))
    ensure_ray(num_cpus=max(4, cpus))
    ray_rates = {}
    # (workers, threads each): the machine shared fairly by 1 and by 2 workers, plus 1 worker on
    # one thread, the per-core baseline that 2 one-thread workers scale from.
    for workers, threads in ((1, cpus), (2, max(1, cpus // 2)), (1, 1)):
        key = f"ray{workers}" + ("_1thread" if (workers, threads) == (1, 1) and cpus > 1 else "")
        print(f"[bench train] Ray Train, {workers} worker(s), {threads} thread(s) each")
        cfg = TrainConfig(**{**base.to_dict(), "num_workers": workers, "run_name": key,
                             "threads_per_worker": threads})
        result = run_training(work / "data", work / key, cfg)
        ray_rates[key] = _steady([m["tokens_per_s"] for m in result.history])

    flops_per_token = train_flops_per_token(model_cfg, seq_len)
    report: dict[str, Any] = {
        "plain_tok_s": plain,
        "ray1_tok_s": ray_rates["ray1"],
        "ray2_tok_s": ray_rates["ray2"],
        "ray1_1thread_tok_s": ray_rates.get("ray1_1thread", ray_rates["ray1"]),
        "gemm_gflops": gemm / 1e9,
        "gemm_gflops_1thread": gemm_1 / 1e9,
        "mfu_plain": plain * flops_per_token / gemm,
        "mfu_ray1": ray_rates["ray1"] * flops_per_token / gemm,
        "mfu_ray2": ray_rates["ray2"] * flops_per_token / gemm,
        "ratio_ray1_vs_plain": ray_rates["ray1"] / plain,
        "ratio_ray2_vs_ray1": ray_rates["ray2"] / ray_rates["ray1"],
        "ratio_ray2_vs_ray1_1thread": ray_rates["ray2"] / ray_rates.get("ray1_1thread", ray_rates["ray1"]),
        "targets": TARGETS,
        "config": {
            "preset": preset, "params": num_params(build_model(model_cfg)),
            "flops_per_token": flops_per_token, "seq_len": seq_len,
            "global_batch_size": global_batch_size, "micro_batch_size": micro_batch_size,
            "steps": steps, "window": window, "cpus": cpus, "machine": platform.machine(),
            "torch": torch.__version__, "device": "cpu",
        },
    }
    _print(report)
    write_json(report, out, "train")
    return report


def _print(r: dict) -> None:
    rows = [
        ("plain PyTorch (1 process)", r["plain_tok_s"], r["mfu_plain"], "baseline"),
        ("Ray Train, 1 worker", r["ray1_tok_s"], r["mfu_ray1"],
         f"{r['ratio_ray1_vs_plain']:.2f}x plain (target >= {TARGETS['ray1_vs_plain']})"),
        ("Ray Train, 2 workers", r["ray2_tok_s"], r["mfu_ray2"],
         f"{r['ratio_ray2_vs_ray1']:.2f}x 1 worker (target >= {TARGETS['ray2_vs_ray1']})"),
        ("Ray Train, 1 worker, 1 thread", r["ray1_1thread_tok_s"], r["ray1_1thread_tok_s"] * r["mfu_ray1"]
         / r["ray1_tok_s"], f"2 workers: {r['ratio_ray2_vs_ray1_1thread']:.2f}x this"),
    ]
    print_table(("configuration", "tokens/s", "MFU", "comparison"),
                [(name, f"{tok_s:,.0f}", f"{mfu:.1%}", note) for name, tok_s, mfu, note in rows])
    print(f"GEMM peak {r['gemm_gflops']:.1f} GFLOP/s ({r['gemm_gflops_1thread']:.1f} with 1 thread); "
          f"MFU target for 2 workers >= {TARGETS['mfu_ray2']:.0%}")

"""Training throughput benchmark: plain PyTorch vs Ray Train with 1 and 2 workers, side by side.

All three run the project's own training loop (train/loop.py) on the same model
(the `bench` preset by default), data, global batch, reporting and checkpoint
interval: the plain baseline through a LocalSession in this process, the others
as Ray Train workers. One GEMM probe (train/peak.py), measured once before any
training, is the peak every MFU divides by. Tokens/s is wall-clock time between
report windows, validation/reporting/checkpointing included, on both sides; the
figure is the median of the windows after the first (which pays for start-up).
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from fastserve_ray.bench.report import print_table, write_json
from fastserve_ray.cluster import ensure_ray
from fastserve_ray.config import TrainConfig
from fastserve_ray.data import load_data_manifest, prepare_data
from fastserve_ray.models import build_model, num_params
from fastserve_ray.perf import train_flops_per_token
from fastserve_ray.train.loop import run_loop
from fastserve_ray.train.peak import probe_peak_flops
from fastserve_ray.train.session import LocalSession
from fastserve_ray.train.trainer import make_loop_config, resolve_model_config, run_training

TARGETS = {"ray1_vs_plain": 0.95, "ray2_vs_ray1": 0.95}


def plain_tokens_per_s(data_dir: Path, cfg: TrainConfig, window: int, peak_flops: float = 1.0) -> list[float]:
    """Tokens/s of each ``window``-step window of the training loop run in this process (no Ray)."""
    cfg = TrainConfig(**{**cfg.to_dict(), "log_interval": window, "num_workers": 1, "min_workers": None})
    manifest = load_data_manifest(data_dir, verify=False)
    has_val = manifest.split("validation").num_rows > 0 and cfg.eval_rows > 0
    config = make_loop_config(str(Path(data_dir).resolve()), cfg, resolve_model_config(cfg), manifest.row_len,
                              has_val, peak_flops)
    with tempfile.TemporaryDirectory(prefix="bench-plain-") as ckpt_root:
        session = LocalSession(Path(ckpt_root))
        run_loop(config, session)
    return [m["tokens_per_s"] for m in session.reports if m["step"] % window == 0]


def _steady(rates: list[float]) -> float:
    """Median of the windows after the first (which pays for warm-up and start-up)."""
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def run_train_bench(out: Path | None = None, preset: str = "bench", steps: int = 12, window: int = 3,
                    global_batch_size: int = 8, micro_batch_size: int = 4, seq_len: int = 256) -> dict:
    """Run the three configurations; write JSON to ``out`` and print a table."""
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    cpus = os.cpu_count() or 1
    print(f"[bench train] GEMM probe ({cpus} threads, idle machine)")
    peak = probe_peak_flops("cpu")  # measured once; every MFU below divides by it
    base = TrainConfig(preset=preset, global_batch_size=global_batch_size,
                       micro_batch_size=micro_batch_size, max_steps=steps, log_interval=window,
                       checkpoint_interval=max(window, steps // 2), eval_rows=0, warmup_steps=2,
                       num_workers=1, peak_flops=peak)
    model_cfg = resolve_model_config(base)
    print(f"[bench train] peak {peak / 1e9:.1f} GFLOP/s; preparing data (built-in corpus, "
          f"vocab {model_cfg.vocab_size}, seq_len {seq_len})")
    prepare_data(work / "data", vocab_size=model_cfg.vocab_size, seq_len=seq_len, progress=False)

    print("[bench train] plain PyTorch: the same loop in this process, no Ray")
    plain = _steady(plain_tokens_per_s(work / "data", base, window, peak))
    ensure_ray(num_cpus=max(4, cpus))
    ray_rates = {}
    # The 2 workers share the same cores the 1 worker had to itself: threads split evenly.
    for workers in (1, 2):
        key = f"ray{workers}"
        print(f"[bench train] Ray Train, {workers} worker(s), {max(1, cpus // workers)} thread(s) each")
        cfg = TrainConfig(**{**base.to_dict(), "num_workers": workers, "run_name": key})
        result = run_training(work / "data", work / key, cfg)
        ray_rates[key] = _steady([m["tokens_per_s"] for m in result.history if m["step"] % window == 0])

    flops_per_token = train_flops_per_token(model_cfg, seq_len)
    report: dict[str, Any] = {
        "plain_tok_s": plain,
        "ray1_tok_s": ray_rates["ray1"],
        "ray2_tok_s": ray_rates["ray2"],
        "peak_flops": peak,
        "mfu_plain": plain * flops_per_token / peak,
        "mfu_ray1": ray_rates["ray1"] * flops_per_token / peak,
        "mfu_ray2": ray_rates["ray2"] * flops_per_token / peak,
        "ratio_ray1_vs_plain": ray_rates["ray1"] / plain,
        "ratio_ray2_vs_ray1": ray_rates["ray2"] / ray_rates["ray1"],
        "targets": TARGETS,
        "config": {
            "preset": preset, "params": num_params(build_model(model_cfg)),
            "flops_per_token": flops_per_token, "attention_flops": "causal (half of 12*L*d*T)",
            "seq_len": seq_len, "global_batch_size": global_batch_size,
            "micro_batch_size": micro_batch_size, "steps": steps, "window": window,
            "checkpoint_interval": base.checkpoint_interval, "cpus": cpus,
            "machine": platform.machine(), "torch": torch.__version__, "device": "cpu",
        },
    }
    _print(report)
    write_json(report, out, "train")
    return report


def _print(r: dict) -> None:
    rows = [
        ("plain PyTorch (same loop, no Ray)", r["plain_tok_s"], r["mfu_plain"], "baseline"),
        ("Ray Train, 1 worker", r["ray1_tok_s"], r["mfu_ray1"],
         f"{r['ratio_ray1_vs_plain']:.2f}x plain (target >= {TARGETS['ray1_vs_plain']})"),
        ("Ray Train, 2 workers", r["ray2_tok_s"], r["mfu_ray2"],
         f"{r['ratio_ray2_vs_ray1']:.2f}x 1 worker (target >= {TARGETS['ray2_vs_ray1']})"),
    ]
    print_table(("configuration", "tokens/s", "MFU", "comparison"),
                [(name, f"{tok_s:,.0f}", f"{mfu:.1%}", note) for name, tok_s, mfu, note in rows])
    print(f"peak (GEMM probe, measured once): {r['peak_flops'] / 1e9:.1f} GFLOP/s")

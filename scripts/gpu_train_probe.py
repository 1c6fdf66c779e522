"""Training-step throughput of the per-worker math on one CUDA device (bf16 autocast, AdamW).

Run on a GPU machine from the repo root: `PYTHONPATH=. python3 scripts/gpu_train_probe.py`.
Prints JSON: tokens/s and MFU against a bf16 GEMM probe measured in the same run, eager and
torch.compile'd. Ray is not needed: this is the loop body Ray Train runs in each worker.
"""

from __future__ import annotations

import json
import sys
import time

import torch
import torch.nn.functional as F

from fastserve_ray.config import TrainConfig
from fastserve_ray.models import build_model, get_preset, num_params
from fastserve_ray.perf import measure_copy_bandwidth, measure_gemm_flops, train_flops_per_token
from fastserve_ray.train.optim import make_optimizer


def tokens_per_s(preset: str, batch: int, seq_len: int, steps: int, compile_model: bool) -> float:
    cfg = get_preset(preset, max_seq_len=max(seq_len, get_preset(preset).max_seq_len))
    torch.manual_seed(0)
    model = build_model(cfg).cuda()
    opt = make_optimizer(model, TrainConfig())
    fwd = torch.compile(model) if compile_model else model
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = fwd(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(3):  # warm-up (and compilation)
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return batch * seq_len * steps / (time.perf_counter() - t0)


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA device"
    gemm = measure_gemm_flops("cuda", torch.bfloat16, size=8192)
    bandwidth = measure_copy_bandwidth("cuda", num_bytes=1 << 31)
    out = {"device": torch.cuda.get_device_name(), "gemm_tflops_bf16": gemm / 1e12,
           "copy_gbps": bandwidth / 1e9, "runs": []}
    runs = (("bench", 32, 1024, False), ("bench", 32, 1024, True), ("llama-125m", 16, 2048, False),
            ("llama-125m", 16, 2048, True))
    for preset, batch, seq_len, compiled in runs:
        cfg = get_preset(preset)
        tok_s = tokens_per_s(preset, batch, seq_len, steps=10, compile_model=compiled)
        mfu = tok_s * train_flops_per_token(cfg, seq_len) / gemm
        out["runs"].append({"preset": preset, "params": num_params(build_model(cfg)),
                            "batch": batch, "seq_len": seq_len, "compiled": compiled,
                            "tokens_per_s": tok_s, "mfu": mfu})
        print(json.dumps(out["runs"][-1]), flush=True)
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()

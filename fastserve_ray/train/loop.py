"""The per-worker training loop: plain PyTorch plus Ray Train's prepare_model, get_checkpoint, report.

Each worker trains on its slice of every global batch (see batches.py), so the
run is reproducible and independent of the worker count; gradients are averaged
by DDP. The loss is normalised by the *global* batch's token count, so summing
over micro-steps and averaging over workers gives exactly the 1-worker gradient.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastserve_ray.config import ModelConfig, TrainConfig
from fastserve_ray.models import build_model
from fastserve_ray.perf import measure_gemm_flops, train_flops_per_token, tune_cpu_allocator
from fastserve_ray.train.batches import BatchPlan
from fastserve_ray.train.checkpoint import (
    load_model_weights,
    load_optimizer_state,
    read_state,
    save_checkpoint,
)
from fastserve_ray.train.optim import make_optimizer
from fastserve_ray.train.rows import RowStore
from fastserve_ray.train.schedule import lr_at


def _quiet_ray_train_logs() -> None:
    """Ray Train logs every report and checkpoint at INFO; our progress line says it once.

    Some of its modules name their logger by file path (``logging.getLogger(__file__)``), so
    they are not children of "ray.train" and are found by path instead.
    """
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    for name in list(logging.root.manager.loggerDict):
        if f"{os.sep}ray{os.sep}train{os.sep}" in name:
            logging.getLogger(name).setLevel(logging.WARNING)


def _say(message: str) -> None:
    """One progress line on the console (Ray Train's patched print() would log it twice)."""
    sys.stdout.write(f"[train] {message}\n")
    sys.stdout.flush()


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def _validate(model: nn.Module, store: RowStore, num_rows: int, rank: int, world: int,
              device: torch.device, autocast) -> float:
    """Mean validation loss over the first ``num_rows`` rows, split across workers."""
    indices = np.arange(min(num_rows, len(store)))[rank::world]
    loss_sum, count = 0.0, 0
    model.eval()
    for start in range(0, len(indices), 16):
        rows = torch.from_numpy(store.take(indices[start : start + 16])).to(device)
        with autocast():
            logits = model(rows[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten(), reduction="sum")
        loss_sum += loss.item()
        count += rows[:, 1:].numel()
    model.train()
    total, tokens = _all_reduce_sum([loss_sum, float(count)], device)
    return total / max(tokens, 1.0)


def _maybe_inject_fault(cfg: TrainConfig, step: int, rank: int, world: int, marker: str) -> None:
    """Kill this worker process once at ``fail_at_step`` (tests of fault tolerance)."""
    if step != cfg.fail_at_step or rank != world - 1 or os.path.exists(marker):
        return
    Path(marker).parent.mkdir(parents=True, exist_ok=True)
    Path(marker).write_text(f"worker {rank} killed at step {step}\n")
    _say(f"fault injection: worker {rank} exits at step {step}")
    os._exit(1)


def _report_checkpoint(
    metrics: dict[str, Any], rank: int, model: nn.Module, optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
) -> None:
    """Report ``metrics`` with a checkpoint written by rank 0, and wait until it is committed."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            save_checkpoint(Path(tmp), model, optimizer, state)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)
    # A worker dying right after a report would otherwise lose the checkpoint, and with it
    # more than checkpoint_interval steps.
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Body of every Ray Train worker; ``config`` comes from trainer.build_trainer."""
    cfg = TrainConfig.from_dict(config["train"])
    model_cfg = ModelConfig.from_dict(config["model"])
    _quiet_ray_train_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = cfg.threads_per_worker or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size())
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    if not on_gpu:
        tune_cpu_allocator()  # activations are freed and re-allocated every micro-step
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu else nullcontext

    train_rows = RowStore(config["train_blocks"], config["row_len"])
    val_rows = RowStore(config["val_blocks"], config["row_len"]) if config["val_blocks"] else None
    plan = BatchPlan(len(train_rows), cfg.global_batch_size, cfg.seed)

    torch.manual_seed(cfg.seed)  # identical initial weights on every worker
    model = build_model(model_cfg)
    state: dict[str, Any] = {"step": 0, "history": [], "resumes": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = read_state(Path(d))
            load_model_weights(Path(d), model)
    model = ray.train.torch.prepare_model(model)  # moves to device; DDP when world > 1
    raw = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    optimizer = make_optimizer(raw, cfg)
    if checkpoint:
        with checkpoint.as_directory() as d:
            load_optimizer_state(Path(d), raw, optimizer)
        # Kept in the checkpoint, so the run's record shows every interruption it survived.
        state["resumes"].append({"step": state["step"], "num_workers": world})
        if rank == 0:
            _say(f"resumed from checkpoint at step {state['step']} ({world} workers)")
    forward = torch.compile(model) if cfg.compile else model

    per_worker = cfg.global_batch_size // world
    micro = min(cfg.micro_batch_size, per_worker)
    num_micro = math.ceil(per_worker / micro)
    seq_len = config["row_len"] - 1
    tokens_per_step = cfg.global_batch_size * seq_len
    peak = measure_gemm_flops(device, torch.bfloat16 if on_gpu else torch.float32,
                              size=4096 if on_gpu else 512, repeats=2)
    flops_per_token = train_flops_per_token(model_cfg, seq_len)
    marker = config["fault_marker"]

    step, history = state["step"], state["history"]
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    while step < cfg.max_steps:
        _maybe_inject_fault(cfg, step, rank, world, marker)
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        rows = torch.from_numpy(train_rows.take(plan.rows(step, rank, world))).to(device)
        optimizer.zero_grad(set_to_none=True)
        local_loss = 0.0
        for i in range(num_micro):
            mb = rows[i * micro : (i + 1) * micro]
            is_last = i == num_micro - 1
            # Gradients are all-reduced once per step, on the last micro-step only.
            sync = nullcontext() if is_last or model is raw else model.no_sync()
            with sync:
                with autocast():
                    logits = forward(mb[:, :-1])
                loss = F.cross_entropy(logits.float().flatten(0, 1), mb[:, 1:].flatten(), reduction="sum")
                (loss / (per_worker * seq_len)).backward()
            local_loss += loss.item()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip))
        (loss_sum,) = _all_reduce_sum([local_loss], device)
        step_loss = loss_sum / tokens_per_step
        if not math.isfinite(step_loss):
            # Stop before the bad update is applied: the weights are still those after step
            # `step`, so they are checkpointed as the last good state (the driver only sees
            # metrics that come with a checkpoint).
            if rank == 0:
                _say(f"loss is {step_loss} at step {step + 1}: stopping")
            stop = {"step": step, "nonfinite_loss": True, "nonfinite_at_step": step + 1, "loss": step_loss}
            _report_checkpoint(stop, rank, raw, optimizer, {**state, "step": step, "history": history})
            return
        optimizer.step()
        step += 1
        window_loss += step_loss
        window_steps += 1

        is_last_step = step == cfg.max_steps
        if step % cfg.log_interval and step % cfg.checkpoint_interval and not is_last_step:
            continue
        elapsed = time.perf_counter() - window_start
        tok_s = tokens_per_step * window_steps / elapsed
        metrics = {
            "step": step, "epoch": (step - 1) // plan.steps_per_epoch, "loss": window_loss / window_steps,
            "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s,
            "mfu": tok_s * flops_per_token / (peak * world), "num_workers": world,
        }
        if val_rows is not None and cfg.eval_rows and (step % cfg.eval_interval == 0 or is_last_step):
            val_loss = _validate(raw, val_rows, cfg.eval_rows, rank, world, device, autocast)
            metrics.update(val_loss=val_loss, val_perplexity=math.exp(min(val_loss, 50.0)))
        history.append(metrics)
        if rank == 0:
            val = f" val_ppl {metrics['val_perplexity']:.1f}" if "val_perplexity" in metrics else ""
            _say(f"step {step}/{cfg.max_steps} loss {metrics['loss']:.4f} lr {lr:.2e} "
                 f"tok/s {tok_s:,.0f} mfu {metrics['mfu']:.1%}{val}")
        if step % cfg.checkpoint_interval == 0 or is_last_step:
            _report_checkpoint(metrics, rank, raw, optimizer, {**state, "step": step, "history": history})
        else:
            ray.train.report(metrics)
        window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()

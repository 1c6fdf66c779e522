"""The per-worker training loop: plain PyTorch plus a session (Ray Train's, or a plain process's).

Each worker trains on its slice of every global batch (see batches.py), reading
only those rows from the token files (data/token_rows.py) on a background
thread, so the run is reproducible, independent of the worker count and bounded
in memory whatever the corpus size; gradients are averaged by DDP. The loss is
normalised by the *global* batch's token count, so summing over micro-steps and
averaging over workers gives exactly the 1-worker gradient.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastserve_ray import storage
from fastserve_ray.config import ModelConfig, TrainConfig
from fastserve_ray.data.token_rows import TokenRows
from fastserve_ray.models import build_model
from fastserve_ray.perf import train_flops_per_token, tune_cpu_allocator
from fastserve_ray.train.batches import BatchPlan
from fastserve_ray.train.checkpoint import (
    gather_checkpoint,
    load_model_weights,
    load_optimizer_state,
    read_state,
    save_checkpoint,
    write_checkpoint,
)
from fastserve_ray.train.optim import make_optimizer
from fastserve_ray.train.parallel import full_tensor, grad_sync, is_sharded, wrap_model
from fastserve_ray.train.prefetch import Prefetcher
from fastserve_ray.train.schedule import lr_at
from fastserve_ray.train.session import LocalSession, RaySession


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


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM), 0 where /proc is unavailable."""
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return 0


@torch.no_grad()
def _validate(model: nn.Module, rows: TokenRows, num_rows: int, rank: int, world: int,
              device: torch.device, autocast) -> float:
    """Mean validation loss over the first ``num_rows`` rows, split evenly across workers.

    Every worker runs the same number of forwards: FSDP's all-gathers are collectives.
    """
    usable = min(num_rows, len(rows)) // world * world
    indices = np.arange(usable)[rank::world]
    loss_sum, count = 0.0, 0
    model.eval()
    for start in range(0, len(indices), 16):
        batch = torch.from_numpy(rows.take(indices[start : start + 16])).to(device)
        with autocast():
            logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        loss_sum += loss.item()
        count += batch[:, 1:].numel()
    model.train()
    total, tokens = _all_reduce([loss_sum, float(count)], device)
    return total / max(tokens, 1.0)


def _maybe_inject_fault(cfg: TrainConfig, step: int, rank: int, world: int, marker: str) -> None:
    """Kill this worker process once at ``fail_at_step`` (tests of fault tolerance)."""
    if step != cfg.fail_at_step or rank != world - 1 or not marker or storage.exists(marker):
        return
    storage.write_text(marker, f"worker {rank} killed at step {step}\n")
    _say(f"fault injection: worker {rank} exits at step {step}")
    os._exit(1)


def _log_group(path: str, step: int, world: int) -> None:
    """Append this worker group's start (step, size) to the run's group log (any storage).

    Kept beside the checkpoints, not in them: a group that dies before its first checkpoint
    still resized the run, and the next group may resume from an older checkpoint.
    """
    old = storage.read_bytes(path).decode() if storage.is_file(path) else ""
    storage.write_text(path, old + json.dumps({"step": step, "num_workers": world}) + "\n")


def read_group_log(path: str) -> list[dict[str, int]]:
    """Every worker group the run started, in order: step it started at, size."""
    if not storage.is_file(path):
        return []
    return [json.loads(line) for line in storage.read_bytes(path).decode().splitlines() if line.strip()]


def resizes_of(groups: list[dict[str, int]]) -> list[dict[str, int]]:
    """The size changes between consecutive worker groups: step, from, to."""
    return [{"step": b["step"], "from": a["num_workers"], "to": b["num_workers"]}
            for a, b in zip(groups, groups[1:]) if a["num_workers"] != b["num_workers"]]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Body of every Ray Train worker; ``config`` comes from trainer.build_trainer."""
    _quiet_ray_train_logs()
    run_loop(config, RaySession())


def run_loop(config: dict[str, Any], session: RaySession | LocalSession) -> None:
    """Train from the session's latest checkpoint (or from scratch) to ``max_steps``."""
    cfg = TrainConfig.from_dict(config["train"])
    model_cfg = ModelConfig.from_dict(config["model"])
    rank, world = session.rank, session.world
    threads = cfg.threads_per_worker or max(1, (os.cpu_count() or 1) // session.local_world)
    torch.set_num_threads(threads)
    device = session.device()
    on_gpu = device.type == "cuda"
    if not on_gpu:
        tune_cpu_allocator()  # activations are freed and re-allocated every micro-step
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_gpu else nullcontext

    train_rows = TokenRows(config["data_dir"], "train")
    val_rows = TokenRows(config["data_dir"], "validation") if config["has_validation"] else None
    plan = BatchPlan(len(train_rows), cfg.global_batch_size, cfg.seed)

    torch.manual_seed(cfg.seed)  # identical initial weights on every worker
    model = build_model(model_cfg)
    state: dict[str, Any] = {"step": 0, "history": [], "resumes": []}
    with session.latest_checkpoint() as ckpt_dir:
        if ckpt_dir is not None:
            state = read_state(ckpt_dir)
            load_model_weights(ckpt_dir, model)
        model, raw = wrap_model(model, cfg.strategy, session, device)
        optimizer = make_optimizer(raw, cfg)
        if ckpt_dir is not None:
            load_optimizer_state(ckpt_dir, raw, optimizer)
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
    # The probe is per device on GPU; on CPU it measured a whole node, which the node's workers share.
    peak = config["peak_flops"] * (world if on_gpu else session.num_nodes)
    flops_per_token = train_flops_per_token(model_cfg, seq_len)
    marker = config.get("fault_marker", "")
    sharded = is_sharded(raw)

    def save_fn(snapshot: dict[str, Any]):
        if not sharded:  # rank 0 holds everything: it alone copies the tensors, inside the report
            return lambda d: save_checkpoint(d, raw, optimizer, snapshot)
        tensors = gather_checkpoint(raw, optimizer)  # all-gathers the shards: every worker takes part
        return lambda d: write_checkpoint(d, *tensors, snapshot)

    state["num_workers"] = world
    step, history = state["step"], state["history"]
    if rank == 0 and config.get("group_log"):
        _log_group(config["group_log"], step, world)
    prefetch = Prefetcher(lambda s: train_rows.take(plan.rows(s, rank, world)), step, cfg.max_steps)
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    try:
        while step < cfg.max_steps:
            _maybe_inject_fault(cfg, step, rank, world, marker)
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            rows = torch.from_numpy(prefetch.get(step)).to(device)
            optimizer.zero_grad(set_to_none=True)
            local_loss = 0.0
            for i in range(num_micro):
                mb = rows[i * micro : (i + 1) * micro]
                # Gradients are reduced once per step, on the last micro-step only.
                with grad_sync(model, raw, is_last_micro_step=i == num_micro - 1):
                    with autocast():
                        logits = forward(mb[:, :-1])
                    loss = F.cross_entropy(logits.float().flatten(0, 1), mb[:, 1:].flatten(), reduction="sum")
                    (loss / (per_worker * seq_len)).backward()
                local_loss += loss.item()
            grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)))
            (loss_sum,) = _all_reduce([local_loss], device)
            step_loss = loss_sum / tokens_per_step
            if not math.isfinite(step_loss):
                # Stop before the bad update is applied: the weights are still those after step
                # `step`, so they are checkpointed as the last good state (the driver only sees
                # metrics that come with a checkpoint).
                if rank == 0:
                    _say(f"loss is {step_loss} at step {step + 1}: stopping")
                stop = {"step": step, "nonfinite_loss": True, "nonfinite_at_step": step + 1,
                        "loss": step_loss}
                session.report(stop, save_fn({**state, "step": step, "history": history}))
                return
            optimizer.step()
            step += 1
            window_loss += step_loss
            window_steps += 1
            if cfg.step_delay_s and (not cfg.step_delay_file or os.path.exists(cfg.step_delay_file)):
                time.sleep(cfg.step_delay_s)

            is_last_step = step == cfg.max_steps
            is_checkpoint = step % cfg.checkpoint_interval == 0 or is_last_step
            if step % cfg.log_interval and not is_checkpoint:
                continue
            metrics: dict[str, Any] = {
                "step": step, "epoch": (step - 1) // plan.steps_per_epoch,
                "loss": window_loss / window_steps, "lr": lr, "grad_norm": grad_norm,
                "num_workers": world,
            }
            if val_rows is not None and cfg.eval_rows and (step % cfg.eval_interval == 0 or is_last_step):
                val_loss = _validate(raw, val_rows, cfg.eval_rows, rank, world, device, autocast)
                metrics.update(val_loss=val_loss, val_perplexity=math.exp(min(val_loss, 50.0)))
            # Wall clock from the end of the previous window: validation, reporting and
            # checkpointing count against throughput, as they do for the user.
            now = time.perf_counter()
            tok_s = tokens_per_step * window_steps / (now - window_start)
            (rss,) = _all_reduce([float(peak_rss_bytes())], device, op="max")
            metrics.update(tokens_per_s=tok_s, mfu=tok_s * flops_per_token / peak, peak_flops=peak,
                           peak_rss_mb=rss / 2**20)
            history.append(metrics)
            if rank == 0:
                val = f" val_ppl {metrics['val_perplexity']:.1f}" if "val_perplexity" in metrics else ""
                _say(f"step {step}/{cfg.max_steps} loss {metrics['loss']:.4f} lr {lr:.2e} "
                     f"tok/s {tok_s:,.0f} mfu {metrics['mfu']:.1%} of {peak / 1e9:,.0f} GFLOP/s{val}")
            snapshot = {**state, "step": step, "history": history}
            session.report(metrics, save_fn(snapshot) if is_checkpoint else None)
            window_loss, window_steps, window_start = 0.0, 0, now
    finally:
        prefetch.close()
        train_rows.close()

"""Training pieces without Ray: data order, schedule, optimizer groups, checkpoints, config."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastserve_ray.config import TrainConfig, parse_num_workers
from fastserve_ray.errors import ConfigError
from fastserve_ray.models import build_model, get_preset
from fastserve_ray.train.batches import BatchPlan
from fastserve_ray.train.checkpoint import (
    load_model_weights,
    load_optimizer_state,
    read_state,
    save_checkpoint,
)
from fastserve_ray.train.optim import make_optimizer, param_groups
from fastserve_ray.train.schedule import lr_at


def test_batch_plan_is_worker_count_independent_and_covers_each_epoch_once():
    plan = BatchPlan(num_rows=103, global_batch_size=8, seed=7)
    assert plan.steps_per_epoch == 12
    for step in (0, 5, 12, 30):
        one = plan.rows(step, 0, 1)
        two = np.concatenate([plan.rows(step, r, 2) for r in range(2)])
        four = np.concatenate([plan.rows(step, r, 4) for r in range(4)])
        assert np.array_equal(one, two) and np.array_equal(one, four) and len(one) == 8
    epoch0 = np.concatenate([plan.rows(s, 0, 1) for s in range(12)])
    assert len(set(epoch0.tolist())) == 96  # no row twice within an epoch
    epoch1 = np.concatenate([plan.rows(s, 0, 1) for s in range(12, 24)])
    assert not np.array_equal(epoch0, epoch1)  # reshuffled
    again = BatchPlan(103, 8, seed=7)
    assert np.array_equal(again.rows(17, 1, 2), plan.rows(17, 1, 2))  # resume replays the order
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchPlan(5, 8, 0)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 110))


def test_no_weight_decay_on_norms_biases_embeddings():
    model = build_model(get_preset("tiny", qkv_bias=True))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert "embed_tokens.weight" in exempt and "norm.weight" in exempt
    assert any("q_proj.bias" in n for n in exempt)
    assert all(("proj.weight" in n) for n in decayed)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    # tied lm_head is the embedding: counted once
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )


def _train_steps(model, opt, x, n):
    for _ in range(n):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_checkpoint_round_trip_resumes_bit_exactly(tmp_path):
    cfg = TrainConfig(lr=1e-2)
    torch.manual_seed(0)
    x = torch.randint(0, 512, (4, 17))
    model = build_model(get_preset("tiny"))
    opt = make_optimizer(model, cfg)
    _train_steps(model, opt, x, 3)
    save_checkpoint(tmp_path, model, opt, {"step": 3, "history": [{"step": 3}]})
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))
    _train_steps(model, opt, x, 2)  # the uninterrupted continuation

    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    resumed = build_model(get_preset("tiny"))
    load_model_weights(tmp_path, resumed)
    opt2 = make_optimizer(resumed, cfg)
    load_optimizer_state(tmp_path, resumed, opt2)
    assert read_state(tmp_path)["step"] == 3
    _train_steps(resumed, opt2, x, 2)
    for (n, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n


def test_train_config_validation():
    with pytest.raises(ConfigError, match="global_batch_size=6 must divide evenly among 4 workers"):
        TrainConfig(num_workers=4, global_batch_size=6)
    with pytest.raises(ConfigError, match="global_batch_size=9 must divide evenly among 2 workers"):
        TrainConfig(num_workers=3, min_workers=2, global_batch_size=9)
    with pytest.raises(ConfigError, match="min_workers=3 must be in"):
        TrainConfig(num_workers=2, min_workers=3)
    with pytest.raises(ConfigError, match="unknown key.*'epochs'"):
        TrainConfig.from_dict({"epochs": 3})
    with pytest.raises(ConfigError, match="train.max_steps must be >= 1"):
        TrainConfig(max_steps=0)
    with pytest.raises(ConfigError, match="train.strategy must be ddp or fsdp, got 'zero3'"):
        TrainConfig(strategy="zero3")
    with pytest.raises(ConfigError, match="train.model: expected a mapping"):
        TrainConfig.from_dict({"model": 3})
    assert parse_num_workers("3") == (3, None)
    assert parse_num_workers("1:4") == (4, 1)
    with pytest.raises(ConfigError, match="N or MIN:MAX"):
        parse_num_workers("two")


@pytest.mark.parametrize("preset,overrides", [("tiny", {}), ("tiny", {"tie_embeddings": False}),
                                              ("small", {}), ("gru-tiny", {})])
def test_train_flops_per_token_is_6n_plus_causal_attention(preset, overrides):
    from fastserve_ray.perf import train_flops_per_token

    cfg = get_preset(preset, **overrides)
    model = build_model(cfg)
    # N: every weight that takes part in a matmul, once; the output head counts even when tied
    # (it is a matmul), the embedding lookup does not (it is a gather); norms and biases excluded.
    names = dict(model.named_parameters())  # tied tensors appear once, under the embedding's name
    n = sum(p.numel() for name, p in names.items() if p.dim() >= 2 and "embed_tokens" not in name)
    if "lm_head.weight" not in names:
        n += cfg.vocab_size * cfg.dim  # tied head: the embedding's tensor, used as a matmul
    seq_len = 128
    attention = 0 if cfg.is_recurrent else 6 * cfg.n_layers * cfg.dim * seq_len  # causal: half of 12
    flops = train_flops_per_token(cfg, seq_len)
    assert flops == 6 * n + attention
    assert train_flops_per_token(cfg, 2 * seq_len) - flops == pytest.approx(attention)

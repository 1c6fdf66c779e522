"""LLMEngine.load_snapshot: the load signal serving autoscales and reports metrics on."""

import torch

from fastserve_ray.engine import LLMEngine
from fastserve_ray.models import build_model, get_preset


def test_snapshot_follows_requests_through_their_life():
    torch.manual_seed(0)
    engine = LLMEngine(build_model(get_preset("tiny")).eval(), None, max_num_seqs=1)
    idle = engine.load_snapshot()
    assert idle["num_waiting"] == idle["num_running"] == idle["kv_cache_usage"] == 0.0
    engine.add_request(list(range(3, 40)), {"max_tokens": 5, "ignore_eos": True})
    engine.add_request(list(range(3, 20)), {"max_tokens": 5, "ignore_eos": True})
    engine.step()
    busy = engine.load_snapshot()
    assert (busy["num_running"], busy["num_waiting"]) == (1.0, 1.0)  # max_num_seqs=1 queues one
    assert 0.0 < busy["kv_cache_usage"] <= 1.0
    assert busy["num_unfinished_requests"] == 2.0 and busy["num_prompt_tokens"] == 37.0
    while engine.has_unfinished():
        engine.step()
    done = engine.load_snapshot()
    assert done["num_running"] == done["num_waiting"] == 0.0
    assert done["kv_cache_usage"] == 0.0  # prefix-cached blocks are evictable, so they count free
    assert done["num_generated_tokens"] == 10.0


def test_mlfq_reports_its_queues():
    torch.manual_seed(0)
    model = build_model(get_preset("tiny")).eval()
    engine = LLMEngine(model, None, max_num_seqs=2, policy="mlfq", num_queues=4,
                       prefill_time={1: 1e-3, 256: 1e-1}, base_quantum=1e-3)
    assert LLMEngine(model, None, num_blocks=8).load_snapshot()["queue_seqs"] == []  # fcfs
    for n in (2, 200):  # skip-join: the long prompt enters a lower queue than the short one
        engine.add_request(list(range(3, 3 + n)), {"max_tokens": 30, "ignore_eos": True})
    snap = engine.load_snapshot()
    levels = sorted(seq.queue_level for seq in engine.scheduler.sequences.values())
    assert levels[0] < levels[1]
    expected = [0.0] * 4
    for level in levels:
        expected[level] += 1
    assert snap["queue_seqs"] == expected

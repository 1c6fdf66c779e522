"""The batched sampler: greedy, temperature, top-k, top-p, per-row generators, logprobs."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from fastserve_ray.engine import Sampler, SamplingParams
from fastserve_ray.engine.sampler import apply_top_k_top_p

sampler = Sampler()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draw(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> list[int]:
    """n draws for one row of logits with one generator."""
    g = gen(seed)
    return [sampler(logits[None], [params], [g]).token_ids[0] for _ in range(n)]


def test_greedy_rows_are_argmax_and_sampled_rows_vary():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0)] * 2
    gens = [None, gen(1), None, gen(2)]
    out = sampler(logits, params, gens)
    assert out.token_ids[0] == int(logits[0].argmax()) and out.token_ids[2] == int(logits[2].argmax())
    assert out.logprobs == [None] * 4
    flat = torch.zeros(50)  # uniform: 40 draws that all agreed would be a broken sampler
    assert len(set(draw(flat, SamplingParams(temperature=1.0), 40))) > 10


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.5, top_k=1),
    SamplingParams(temperature=1.5, top_p=0.01),
])
def test_top_k_1_and_a_tiny_nucleus_reduce_to_greedy(params):
    torch.manual_seed(1)
    logits = torch.randn(100)
    assert set(draw(logits, params, 30)) == {int(logits.argmax())}


def test_top_k_support_is_the_k_most_likely():
    torch.manual_seed(2)
    logits = torch.randn(30) * 0.1  # nearly flat: all of the top 3 come up in 300 draws
    top3 = set(logits.topk(3).indices.tolist())
    assert set(draw(logits, SamplingParams(temperature=1.0, top_k=3), 300)) == top3


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert set(draw(logits, SamplingParams(temperature=1.0, top_p=0.75), 300)) == {0, 1}
    masked = apply_top_k_top_p(logits[None], torch.tensor([0]), torch.tensor([0.75]))[0]
    assert torch.isinf(masked[2:]).all() and torch.isfinite(masked[:2]).all()
    # top_p = 1 masks nothing, even next to a row that uses top-k.
    both = apply_top_k_top_p(logits.repeat(2, 1), torch.tensor([0, 2]), torch.tensor([1.0, 1.0]))
    assert torch.isfinite(both[0]).all() and torch.isinf(both[1]).sum() == 2


def test_sample_frequencies_follow_the_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    counts = Counter(draw(probs.log(), SamplingParams(temperature=1.0), 4000, seed=3))
    for token, p in enumerate(probs.tolist()):
        assert abs(counts[token] / 4000 - p) < 0.03, counts
    # Temperature sharpens: at 0.25 the top token's share rises well above its 0.4.
    cold = Counter(draw(probs.log(), SamplingParams(temperature=0.25), 1000, seed=3))
    assert cold[3] / 1000 > 0.7


def test_a_seeded_row_draws_the_same_whatever_shares_the_batch():
    torch.manual_seed(4)
    logits = torch.randn(6, 200)
    me = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=7)
    alone_gen = gen(7)
    alone = [sampler(logits[2:3], [me], [alone_gen]).token_ids[0] for _ in range(50)]
    others = [SamplingParams(temperature=0), SamplingParams(temperature=1.3, top_p=0.5),
              SamplingParams(temperature=0.7, top_k=3, logprobs=5), SamplingParams(temperature=2.0),
              SamplingParams(temperature=1.0)]
    gens = [None, gen(1), gen(2), gen(3), gen(4)]
    in_batch = []
    mine = gen(7)
    for _ in range(50):
        params = others[:2] + [me] + others[2:]
        out = sampler(logits, params, gens[:2] + [mine] + gens[2:])
        in_batch.append(out.token_ids[2])
    assert in_batch == alone
    assert alone != [sampler(logits[2:3], [me], [gen(8)]).token_ids[0] for _ in range(50)]


def test_logprobs_are_the_model_distribution_with_top_n():
    torch.manual_seed(5)
    logits = torch.randn(3, 40)
    params = [SamplingParams(temperature=0, logprobs=4), SamplingParams(temperature=0.5, logprobs=0),
              SamplingParams(temperature=0)]
    out = sampler(logits, params, [None, gen(0), None])
    ref = logits.log_softmax(-1)
    first = out.logprobs[0]
    assert first.token_id == out.token_ids[0]
    assert math.isclose(first.logprob, float(ref[0, first.token_id]), abs_tol=1e-5)
    assert [t for t, _ in first.top_logprobs] == ref[0].topk(4).indices.tolist()
    assert [lp for _, lp in first.top_logprobs] == pytest.approx(ref[0].topk(4).values.tolist())
    # Raw-logit logprobs even when temperature reshapes the sampling distribution.
    second = out.logprobs[1]
    assert second.top_logprobs == ()
    assert math.isclose(second.logprob, float(ref[1, out.token_ids[1]]), abs_tol=1e-5)
    assert out.logprobs[2] is None


def test_logit_bias_moves_greedy_and_sampled_rows_and_only_their_own():
    torch.manual_seed(6)
    logits = torch.randn(3, 30)
    top = int(logits[0].argmax())
    low = int(logits[0].argmin())
    params = [SamplingParams(temperature=0, logit_bias={str(low): 100}, logprobs=1),
              SamplingParams(temperature=0),
              SamplingParams(temperature=0, logit_bias={str(int(logits[2].argmax())): -100})]
    out = sampler(logits.clone(), params, [None] * 3)
    assert out.token_ids[0] == low  # +100 all but forces a token, greedy rows included
    assert out.token_ids[1] == int(logits[1].argmax())  # the row without a bias is untouched
    assert out.token_ids[2] == int(logits[2].topk(2).indices[1])  # -100 all but bans it
    # Logprobs stay those of the model's distribution (before the bias).
    assert out.logprobs[0].logprob == pytest.approx(float(logits[0].log_softmax(-1)[low]), abs=1e-5)
    assert out.logprobs[0].top_logprobs[0][0] == top
    # Sampled rows: a banned token never comes up, a forced one always does.
    flat = torch.zeros(20)
    banned = draw(flat, SamplingParams(temperature=1.0, logit_bias={"3": -100, "4": -100}), 300)
    assert 3 not in banned and 4 not in banned and len(set(banned)) > 10
    assert set(draw(flat, SamplingParams(temperature=1.0, logit_bias={"9": 100}), 50)) == {9}


def test_logit_bias_and_min_tokens_together():
    logits = torch.tensor([[0.0, 0.0, 9.0, 1.0]])  # EOS = 2 is the argmax
    from fastserve_ray.engine.sequence import Sequence

    seq = Sequence([0])
    params = SamplingParams(temperature=0, min_tokens=1, logit_bias={"2": 100})
    # Below min_tokens EOS is banned whatever its bias.
    assert Sampler(eos_token_id=2)(logits, [params], [None], [seq]).token_ids == [3]


def test_min_p_keeps_the_tokens_above_its_share_of_the_top_one():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    # min_p 0.35: tokens with p >= 0.175 stay.
    assert set(draw(probs.log(), SamplingParams(temperature=1.0, min_p=0.35), 300)) == {0, 1}
    assert set(draw(probs.log(), SamplingParams(temperature=1.0, min_p=0.05), 600)) == {0, 1, 2, 3}
    assert set(draw(probs.log(), SamplingParams(temperature=1.0, min_p=1.0), 50)) == {0}
    # After temperature: at 2.0 the shares flatten (0.5 : 0.15 becomes sqrt), so token 2 passes.
    hot = set(draw(probs.log(), SamplingParams(temperature=2.0, min_p=0.35), 600))
    assert hot == {0, 1, 2}
    # Batched beside rows without min_p, which keep their whole support.
    rows = probs.log().repeat(2, 1)
    params = [SamplingParams(temperature=1.0, min_p=0.9), SamplingParams(temperature=1.0)]
    seen: set[int] = set()
    gens = [gen(1), gen(2)]
    for _ in range(300):
        out = sampler(rows, params, gens)
        assert out.token_ids[0] == 0
        seen.add(out.token_ids[1])
    assert seen == {0, 1, 2, 3}

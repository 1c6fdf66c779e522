"""Batched sampling: greedy, temperature, min-p, top-k, top-p, logit bias, per-request generators, logprobs.

Everything that can be batched is (temperature scaling, the top-k/top-p masks, softmax,
logprobs); only the random draw is per row, with each request's own ``torch.Generator``. A
seeded request therefore consumes exactly one draw per token from a generator nobody else
touches, and gets the same tokens whatever else shares the batch, and after preemption too
(recomputed tokens are never re-sampled).

The draw is an exponential race, ``argmax(p / q)`` with ``q ~ Exp(1)`` per vocabulary entry:
it picks token ``i`` with probability ``p_i`` (the Gumbel-max trick in another guise) and runs
on the device without a host round trip or a cumulative sum.

Penalties (repetition, frequency, presence) and ``min_tokens``' ban on EOS and stop token ids
edit the logits first, greedy rows included; they need each row's token history, so the
caller passes the rows' sequences. ``logit_bias`` is added next (greedy rows too), then the
``min_tokens`` ban. Only rows that ask for any of these pay for them. Sampled rows then go
through temperature, ``min_p`` (relative to the row's most likely token, after temperature),
top-k and top-p.

Structured outputs come last: a row whose request follows a grammar gets every token the grammar
does not allow next set to -inf (after the penalties, the bias and the ``min_tokens`` ban; before
temperature and the draw), so greedy and sampled rows alike pick only allowed tokens.

Logprobs are those of the model's distribution (log-softmax of the raw logits, before
penalties, temperature, top-k and top-p), as OpenAI reports them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from fastserve_ray.engine.sampling_params import SamplingParams
from fastserve_ray.engine.sequence import Sequence as EngineSequence
from fastserve_ray.models.generate import apply_top_k_top_p  # one top-k/top-p rule for both paths

__all__ = ["Sampler", "SamplerOutput", "TokenLogprobs", "apply_penalties", "apply_top_k_top_p"]


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """One sampled token's logprob and the ``n`` most likely alternatives (most likely first)."""

    token_id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...]  # (token id, logprob)


@dataclasses.dataclass
class SamplerOutput:
    """Per row: the sampled token id and, where asked for, its logprobs."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def apply_penalties(
    logits: torch.Tensor,
    seqs: Sequence[EngineSequence],
    params: Sequence[SamplingParams],
) -> torch.Tensor:
    """Apply each row's repetition, frequency and presence penalties to (R, V) float logits."""
    num_rows, vocab = logits.shape
    device = logits.device
    out_rows: list[int] = []
    out_ids: list[int] = []
    seen_rows: list[int] = []
    seen_ids: list[int] = []
    for r, (seq, p) in enumerate(zip(seqs, params)):
        outputs = seq.token_ids[seq.num_prompt_tokens :]
        out_rows += [r] * len(outputs)
        out_ids += outputs
        if p.repetition_penalty != 1:
            seen_rows += [r] * len(seq.token_ids)
            seen_ids += seq.token_ids
    counts = torch.zeros(num_rows, vocab, device=device)
    if out_ids:
        index = (torch.tensor(out_rows, device=device), torch.tensor(out_ids, device=device))
        counts.index_put_(index, torch.ones(len(out_ids), device=device), accumulate=True)
    if seen_ids:
        seen = torch.zeros(num_rows, vocab, dtype=torch.bool, device=device)
        seen[torch.tensor(seen_rows, device=device), torch.tensor(seen_ids, device=device)] = True
        rep = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
    freq = torch.tensor([float(p.frequency_penalty) for p in params], device=device)[:, None]
    presence = torch.tensor([float(p.presence_penalty) for p in params], device=device)[:, None]
    return logits - freq * counts - presence * (counts > 0).float()


class Sampler:
    """Draws one token per row of logits according to each row's SamplingParams."""

    def __init__(self, eos_token_id: int | None = None) -> None:
        self.eos_token_id = eos_token_id  # banned, like stop token ids, below min_tokens

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        seqs: Sequence[EngineSequence] | None = None,
        allowed: tuple[list[int], torch.Tensor] | None = None,
    ) -> SamplerOutput:
        """Sample (R, V) logits; ``generators[i]`` drives row i's draw (unused when greedy).

        ``seqs[i]`` is row i's sequence (prompt and outputs so far); needed only when a row
        has penalties or ``min_tokens``. ``allowed = (rows, bias)``: the rows that follow a
        grammar and a (len(rows), V) bias, 0 for the tokens each may take next, -inf elsewhere.
        """
        logits = logits.float()
        raw = logits
        logits = self._edit_logits(logits, params, seqs)
        if allowed is not None and allowed[0]:
            logits = self._apply_grammar(logits, raw, *allowed)
        tokens = logits.argmax(dim=-1)  # greedy rows keep this
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if random_rows:
            tokens[random_rows] = self._draw(logits, random_rows, params, generators)
        token_ids = tokens.tolist()
        return SamplerOutput(token_ids, self._logprobs(raw, token_ids, params))

    @staticmethod
    def _apply_grammar(logits: torch.Tensor, raw: torch.Tensor, rows: list[int],
                       bias: torch.Tensor) -> torch.Tensor:
        """Add each constrained row's grammar bias (0 allowed, -inf forbidden) to its logits."""
        bias = bias.to(logits.device)
        vocab = logits.shape[-1]
        if bias.shape[-1] < vocab:  # logits wider than the grammar's vocabulary: never allowed
            bias = torch.nn.functional.pad(bias, (0, vocab - bias.shape[-1]), value=float("-inf"))
        if len(rows) == logits.shape[0]:  # every row constrained: a new tensor, raw untouched
            return logits + bias[:, :vocab]
        if logits is raw:
            logits = logits.clone()  # raw stays the model's distribution, for logprobs
        logits[rows] += bias[:, :vocab]
        return logits

    def _edit_logits(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        seqs: Sequence[EngineSequence] | None,
    ) -> torch.Tensor:
        penalty_rows = [i for i, p in enumerate(params) if p.has_penalties]
        min_rows = [i for i, p in enumerate(params) if p.min_tokens > 0]
        bias_rows = [i for i, p in enumerate(params) if p.logit_bias]
        if not penalty_rows and not min_rows and not bias_rows:
            return logits
        if (penalty_rows or min_rows) and (seqs is None or len(seqs) != len(params)):
            raise ValueError("penalties and min_tokens need each row's sequence (seqs=)")
        logits = logits.clone()
        if penalty_rows:
            logits[penalty_rows] = apply_penalties(
                logits[penalty_rows], [seqs[i] for i in penalty_rows], [params[i] for i in penalty_rows]
            )
        vocab = logits.shape[-1]
        if bias_rows:
            rows, cols, values = [], [], []
            for i in bias_rows:
                for tok, bias in params[i].logit_bias:
                    if tok < vocab:  # validated against the vocabulary on admission
                        rows.append(i)
                        cols.append(tok)
                        values.append(bias)
            if rows:
                device = logits.device
                index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
                logits.index_put_(
                    index, torch.tensor(values, dtype=logits.dtype, device=device), accumulate=True
                )
        for i in min_rows:
            p = params[i]
            if seqs[i].num_output_tokens >= p.min_tokens:
                continue
            eos = None if p.ignore_eos else self.eos_token_id
            banned = [t for t in (*p.stop_token_ids, eos) if t is not None and t < vocab]
            if banned:
                logits[i, banned] = float("-inf")
        return logits

    @staticmethod
    def _draw(
        logits: torch.Tensor,
        rows: list[int],
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        device = logits.device
        chosen = [params[i] for i in rows]
        temperature = torch.tensor([p.temperature for p in chosen], device=device)
        x = logits[rows] / temperature[:, None]
        if any(p.min_p > 0 for p in chosen):
            # Keep a token when its probability is at least min_p x the top token's, i.e. its
            # logit is at least the top logit + log(min_p) (min_p 0: log 0 = -inf keeps all).
            min_p = torch.tensor([p.min_p for p in chosen], device=device)
            floor = x.max(dim=-1, keepdim=True).values + min_p.log()[:, None]
            x = x.masked_fill(x < floor, float("-inf"))
        if any(p.top_k > 0 or p.top_p < 1 for p in chosen):
            top_k = torch.tensor([p.top_k for p in chosen], device=device)
            top_p = torch.tensor([p.top_p for p in chosen], device=device)
            x = apply_top_k_top_p(x, top_k, top_p)
        probs = x.softmax(dim=-1)
        q = torch.empty_like(probs)
        for r, i in enumerate(rows):  # the only per-row work: each request's own random stream
            q[r].exponential_(generator=generators[i])
        return (probs / q).argmax(dim=-1)

    @staticmethod
    def _logprobs(
        logits: torch.Tensor, token_ids: list[int], params: Sequence[SamplingParams]
    ) -> list[TokenLogprobs | None]:
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        result: list[TokenLogprobs | None] = [None] * len(params)
        if not rows:
            return result
        logprobs = logits[rows].log_softmax(dim=-1)
        chosen = torch.tensor([token_ids[i] for i in rows], device=logits.device)
        chosen_lp = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
        n = max(params[i].logprobs for i in rows)
        top_lp, top_ids = [[] for _ in rows], [[] for _ in rows]
        if n:
            values, indices = logprobs.topk(n, dim=-1)
            top_lp, top_ids = values.tolist(), indices.tolist()
        for r, i in enumerate(rows):
            k = params[i].logprobs
            top = tuple(zip(top_ids[r][:k], top_lp[r][:k]))
            result[i] = TokenLogprobs(token_ids[i], chosen_lp[r], top)
        return result

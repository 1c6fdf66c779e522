"""What a scheduler step decides, as plain ids and counts: the contract between scheduler and runner."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ScheduledSequence:
    """One sequence's work this step: compute ``token_ids[num_computed_tokens:][:num_new_tokens]``."""

    seq_id: int
    num_computed_tokens: int  # tokens already in the cache: the chunk's first position
    num_new_tokens: int
    is_prefill: bool  # False for a decode: the one missing token is the last sampled one
    is_sample: bool  # the chunk reaches the last known token: sample one token from its logits


@dataclasses.dataclass
class SchedulerOutput:
    """What one step runs, as ids and counts; swap pairs are block ids for the runner to copy.

    Runner contract, per step and in this order:
    1. every ``blocks_to_swap_out`` pair (device block, host block): copy device -> host;
    2. every ``blocks_to_swap_in`` pair (host block, device block): copy host -> device;
    3. one forward pass over ``scheduled``: for each item, the KV of its sequence's
       ``token_ids[num_computed_tokens : num_computed_tokens + num_new_tokens]`` is computed at
       those positions and written through ``get_sequence(seq_id).block_table``, attending to
       the ``num_computed_tokens`` tokens already cached; where ``is_sample``, the logits of the
       last of those tokens give one sampled token. (Recurrent models: the state slot holds the
       state after ``num_computed_tokens`` tokens; 0 means start from a zero state.)
    Then ``postprocess(output, {seq_id: token})``. A device block freed by a swap-out may be the
    target of a swap-in or of new KV in the same step, hence outs before ins before compute;
    host blocks read by swap-ins are reused only after postprocess, so the loop must be
    synchronous (schedule the next step only after this one's copies are done).
    """

    scheduled: list[ScheduledSequence] = dataclasses.field(default_factory=list)
    blocks_to_swap_out: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    preempted_seq_ids: list[int] = dataclasses.field(default_factory=list)  # KV dropped
    swapped_out_seq_ids: list[int] = dataclasses.field(default_factory=list)
    swapped_in_seq_ids: list[int] = dataclasses.field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        """Nothing to compute and nothing to copy."""
        return not (self.scheduled or self.blocks_to_swap_out or self.blocks_to_swap_in)

    @property
    def num_prefill_tokens(self) -> int:
        """Tokens in prefill chunks this step."""
        return sum(s.num_new_tokens for s in self.scheduled if s.is_prefill)

    @property
    def num_decode_seqs(self) -> int:
        """Sequences decoding one token this step."""
        return sum(1 for s in self.scheduled if not s.is_prefill)

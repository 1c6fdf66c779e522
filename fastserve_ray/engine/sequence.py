"""One request's policy-level state: token ids, where its KV lives, MLFQ bookkeeping; no tensors.

The one counter every part of the engine agrees on is ``num_computed_tokens``: how many of
``token_ids`` (prompt then outputs) have their KV (or, for recurrent models, their effect on the
state slot) stored on the device. Everything after it still has to be computed. Chunked prefill
advances it a chunk at a time; a prefix-cache hit advances it without compute; preemption for
recompute resets it to 0 (outputs so far are then re-prefilled like prompt tokens).
"""

from __future__ import annotations

import enum
import itertools

from fastserve_ray.engine.errors import RequestError
from fastserve_ray.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    """Where a sequence's KV lives, or how it ended."""

    WAITING = "waiting"  # no KV anywhere: new, or preempted for recompute
    RUNNING = "running"  # KV on the device; scheduled this step or idle (token-level preempted)
    SWAPPED = "swapped"  # KV in the host tier
    FINISHED_STOPPED = "stop"  # EOS, a stop token id, or a stop string (engine)
    FINISHED_LENGTH = "length"  # max_tokens reached
    FINISHED_ABORTED = "abort"  # client went away or engine aborted it

    @property
    def is_finished(self) -> bool:
        """True for the three FINISHED_* states."""
        return self.name.startswith("FINISHED_")

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason ("stop", "length", "abort"), None while unfinished."""
        return self.value if self.is_finished else None


# Process-wide ids keep SchedulerOutput plain ints without a registry.
_next_seq_id = itertools.count()


class Sequence:
    """A request being generated: its tokens, cache residency and scheduling bookkeeping."""

    def __init__(
        self,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams | None = None,
        *,
        seq_id: int | None = None,
        arrival_time: float | None = None,
    ) -> None:
        if len(prompt_token_ids) == 0:
            raise RequestError("prompt must contain at least one token, got an empty prompt",
                               "prompt")
        self.seq_id = next(_next_seq_id) if seq_id is None else seq_id
        self.sampling_params = sampling_params or SamplingParams()
        # One list for prompt + outputs: prefix hashing and recompute read them as one stream.
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.status = SequenceStatus.WAITING
        self.arrival_time = arrival_time  # stamped by Scheduler.add when None

        # Cache residency (owned by the block manager).
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at admission
        self.block_table: list[int] = []  # device blocks (or the one state slot), logical order
        self.host_block_table: list[int] = []  # host-tier blocks while SWAPPED
        self.block_hashes: list[int] = []  # chained hash of each full, computed block

        # Scheduling bookkeeping (owned by the scheduler policy).
        self.queue_level = 0  # MLFQ queue; 0 is the highest priority
        self.queue_order = 0  # FIFO position inside its queue: smaller runs first
        self.quantum_used = 0.0  # estimated model seconds spent in the current queue
        # Tokens whose first computation was charged to a quantum. Recomputing them after a
        # preemption is not charged again: the victim did not ask for that work, and charging
        # it can demote a sequence before it makes any progress (a livelock under MLFQ).
        self.num_charged_tokens = 0
        self.last_scheduled_time: float | None = None  # also set at arrival, for starvation
        self.num_preemptions = 0
        # Prompt logprobs: positions 0 .. P-2 predict prompt tokens 1 .. P-1; the first this many
        # have had their logits collected (recomputation after preemption does not redo them).
        self.num_prompt_logits_done = 0

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, status={self.status.name}, "
            f"tokens={self.num_prompt_tokens}+{self.num_output_tokens}, "
            f"computed={self.num_computed_tokens}, level={self.queue_level})"
        )

    @property
    def needs_prompt_logits(self) -> bool:
        """Whether prompt positions still need their logits (prompt_logprobs asked for)."""
        return (self.sampling_params.prompt_logprobs is not None
                and self.num_prompt_logits_done < self.num_prompt_tokens - 1)

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens so far."""
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        """The prompt's token ids (a copy)."""
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        """The generated token ids (a copy)."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def last_token_id(self) -> int:
        """The newest token: the next decode step's input."""
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose KV is not on the device yet (1 for a sequence ready to decode)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        """True once the sequence stopped, hit its length or was aborted."""
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason ("stop", "length", "abort"), None while unfinished."""
        return self.status.finish_reason

    def append_token(self, token_id: int) -> None:
        """Record one sampled token; its KV is computed by the next decode step."""
        self.token_ids.append(token_id)

"""Model runner: owns the model, the device KV cache and the host swap pool; runs one step.

It makes no policy decision: it copies the swap pairs and computes the tokens a
``SchedulerOutput`` names, and returns the logits of the rows that sample. The model comes in
already built (``nn.Module``) so that any weight format (fp32/bf16, or compressed layers that
replace ``nn.Linear``) plugs in without touching the scheduler or this file; all it needs is
the interface of ``fastserve_ray.models.base.CachedLM`` (``forward_cached``,
``allocate_cache``, ``cache_bytes_per_block`` and a ``config``).

Cache layouts (see models/cache.py): Llama ``(layers, k|v, num_blocks * block_size, kv heads,
head dim)``, where block ``b`` is the slot range ``[b * block_size, (b + 1) * block_size)``;
recurrent ``(num_slots, n_state, layers, dim)``, one slot per sequence. The host pool has the
same layout with its own number of blocks. With ``compile`` on (Llama only) the device cache is
instead a list of per-layer ``(k|v, slots, kv heads, head dim)`` tensors with separate storage
plus one scratch block at the end, for the compiled decode step (see compiled_decode.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from fastserve_ray.engine.compiled_decode import CompiledDecode, is_compilable
from fastserve_ray.engine.engine_config import EngineConfig
from fastserve_ray.engine.plan import EnginePlan, resolve_plan
from fastserve_ray.engine.scheduler_output import ScheduledSequence, SchedulerOutput
from fastserve_ray.engine.sequence import Sequence as EngineSequence
from fastserve_ray.kernels.paged_decode import paged_decode_kernel
from fastserve_ray.layers.packed_linear import pack_linear_weights
from fastserve_ray.models.cache import CacheContext

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ModelInput:
    """One step's tensors, built while the scheduler's state is stable (under the engine lock)."""

    input_ids: torch.Tensor  # (N,) new tokens of all scheduled sequences, flattened
    ctx: CacheContext
    logits_indices: torch.Tensor  # rows of input_ids whose logits are computed: sampled, then prompt
    num_sampled: int  # the first this many logits rows are sampled
    # Prompt logprobs: (seq id, first prompt position, count) per range of the logits rows after
    # the sampled ones, in order; empty when no scheduled sequence asked for them.
    prompt_rows: tuple[tuple[int, int, int], ...] = ()


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of a model's first floating parameter."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    p = next(model.parameters())
    return p.device, torch.float32


class ModelRunner:
    """Executes SchedulerOutputs on one device: swap copies, cached forward, sampled logits."""

    def __init__(
        self,
        model: nn.Module,
        *,
        num_blocks: int,
        block_size: int,
        num_host_blocks: int = 0,
        cache_dtype: torch.dtype | None = None,
        compile: bool = False,
        max_num_seqs: int = 64,
        plan: EnginePlan | None = None,
    ) -> None:
        self.model = model.eval()
        self.config = model.config
        self.is_recurrent = bool(self.config.is_recurrent)
        self.device, model_dtype = model_device_dtype(model)
        self.cache_dtype = cache_dtype or model_dtype
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_host_blocks = num_host_blocks
        self.compiled: CompiledDecode | None = None
        self.compile_seconds = 0.0  # start-up time spent compiling the decode buckets
        if compile and not is_compilable(model):
            log.warning("engine.compile: %s has no compiled decode path; running eager",
                        type(model).__name__)
            compile = False
        self.plan = plan or resolve_plan(EngineConfig(compile=compile), self.device, model_dtype,
                                         is_recurrent=self.is_recurrent)
        if self.plan.linear == "onednn-packed" and not compile:
            # Decode steps are weight-streaming GEMVs on CPU: pack the weights once (the
            # compiled path leaves them to inductor).
            with torch.inference_mode():
                pack_linear_weights(model, few_rows=self.plan.few_rows_linear)
        if self.plan.native_kernels and not self.is_recurrent:
            paged_decode_kernel()  # load it now (built at install), not mid-request
        self.cache: torch.Tensor | list[torch.Tensor]
        if compile:
            # Separate storage per layer, and one more block (id num_blocks) that the block
            # manager never hands out: the padded rows of a decode bucket write there.
            shape = model.cache_shape(num_blocks + 1, block_size)[1:]
            self.cache = [
                torch.zeros(shape, device=self.device, dtype=self.cache_dtype)
                for _ in range(self.config.n_layers)
            ]
            self.compiled = CompiledDecode(model, self.cache, block_size, num_blocks, max_num_seqs)
        else:
            self.cache = model.allocate_cache(num_blocks, block_size, self.device, self.cache_dtype)
        # The host tier only needs to be pinned when the device is a GPU: pinned pages make the
        # copies DMA transfers that need no staging buffer. It is left uninitialised: a host
        # block is only ever read after a swap-out wrote it, and on the CPU untouched pages of a
        # large tier then cost no memory until sequences are really swapped there.
        # At least one host block even without a swap tier: keeps swap() free of special cases.
        self.host_cache = torch.empty(
            model.cache_shape(max(num_host_blocks, 1), block_size),
            dtype=self.cache_dtype,
            pin_memory=self.device.type == "cuda",
        )

    # -- swapping -----------------------------------------------------------------------------

    def _blocks(self, cache: torch.Tensor) -> tuple[torch.Tensor, int]:
        """A view of ``cache`` with one dimension indexing whole blocks, and that dimension."""
        if self.is_recurrent:
            return cache, 0  # (slots, n_state, layers, dim)
        layers, kv, num_slots, heads, head_dim = cache.shape
        bs = self.block_size
        return cache.view(layers, kv, num_slots // bs, bs, heads, head_dim), 2

    def _device_block_views(self) -> list[tuple[torch.Tensor, int]]:
        """(block view, block dim) of the device cache: one tensor, or one per layer (compile)."""
        if isinstance(self.cache, torch.Tensor):
            return [self._blocks(self.cache)]
        bs = self.block_size
        return [(c.view(c.shape[0], c.shape[1] // bs, bs, *c.shape[2:]), 1) for c in self.cache]

    @torch.inference_mode()
    def swap(
        self,
        blocks_to_swap_out: Sequence[tuple[int, int]],
        blocks_to_swap_in: Sequence[tuple[int, int]],
    ) -> None:
        """Copy (device, host) pairs out, then (host, device) pairs in: the scheduler's order."""
        device_views = self._device_block_views()
        host_view, host_dim = self._blocks(self.host_cache)
        if blocks_to_swap_out:
            src, dst = _index_pair(blocks_to_swap_out)
            src = src.to(self.device)
            parts = [view.index_select(dim, src) for view, dim in device_views]
            data = (parts[0] if len(parts) == 1 else torch.stack(parts)).to("cpu")  # waits
            host_view.index_copy_(host_dim, dst, data)
        if blocks_to_swap_in:
            src, dst = _index_pair(blocks_to_swap_in)
            data = host_view.index_select(host_dim, src)
            if self.device.type == "cuda":
                data = data.pin_memory()  # an async copy must come from pinned memory
            data = data.to(self.device, non_blocking=True)
            dst = dst.to(self.device)
            if len(device_views) == 1:
                view, dim = device_views[0]
                view.index_copy_(dim, dst, data)
            else:
                for layer, (view, dim) in enumerate(device_views):
                    view.index_copy_(dim, dst, data[layer])

    # -- the forward --------------------------------------------------------------------------

    def prepare_input(
        self, output: SchedulerOutput, seqs: Sequence[EngineSequence]
    ) -> ModelInput:
        """Flatten the (non-empty) scheduled chunks into input ids and a CacheContext.

        Vectorised: python touches each sequence once, never each token (the hot path).
        """
        items = output.scheduled
        if not self.is_recurrent and all(
            it.num_new_tokens == 1 and it.is_sample and not seq.needs_prompt_logits
            for it, seq in zip(items, seqs)
        ):
            return self._prepare_decode(items, seqs)
        input_ids: list[int] = []
        for item, seq in zip(items, seqs):
            start = item.num_computed_tokens
            input_ids.extend(seq.token_ids[start : start + item.num_new_tokens])
        num_cached = torch.tensor([it.num_computed_tokens for it in items], dtype=torch.int64)
        num_new = torch.tensor([it.num_new_tokens for it in items], dtype=torch.int64)
        tables = [seq.block_table for seq in seqs]
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)

        num_tokens = len(input_ids)
        query_start_loc = torch.zeros(len(items) + 1, dtype=torch.int64)
        query_start_loc[1:] = num_new.cumsum(0)
        seq_index = torch.repeat_interleave(torch.arange(len(items)), num_new)  # (N,)
        # Position of each new token: its offset inside its chunk plus the chunk's start.
        positions = torch.arange(num_tokens) - query_start_loc[seq_index] + num_cached[seq_index]
        if self.is_recurrent:
            slot_mapping = torch.zeros(num_tokens, dtype=torch.int64)  # unused: state slots
            state_slots: torch.Tensor | None = block_tables[:, 0]
        else:
            bs = self.block_size
            blocks = block_tables[seq_index, positions // bs]
            slot_mapping = blocks * bs + positions % bs
            state_slots = None
        seq_lens = num_cached + num_new
        is_sample = torch.tensor([it.is_sample for it in items], dtype=torch.bool)
        logits_indices = query_start_loc[1:][is_sample] - 1  # the last row of each sampled chunk
        prompt_rows, extra = _prompt_logit_rows(items, seqs, query_start_loc)
        if extra:
            logits_indices = torch.cat([logits_indices, torch.tensor(extra, dtype=torch.int64)])

        def dev(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.device, non_blocking=True)

        ctx = CacheContext(
            positions=dev(positions),
            query_start_loc=dev(query_start_loc),
            seq_lens=dev(seq_lens),
            slot_mapping=dev(slot_mapping),
            block_tables=dev(block_tables),
            block_size=self.block_size,
            host_query_lens=tuple(it.num_new_tokens for it in items),
            host_seq_lens=tuple(it.num_computed_tokens + it.num_new_tokens for it in items),
            state_slots=None if state_slots is None else dev(state_slots),
            attention=self.plan.attention,
            native_kernels=self.plan.native_kernels,
        )
        return ModelInput(
            input_ids=dev(torch.tensor(input_ids, dtype=torch.int64)),
            ctx=ctx,
            logits_indices=dev(logits_indices),
            num_sampled=int(is_sample.sum()),
            prompt_rows=prompt_rows,
        )

    def _prepare_decode(
        self, items: Sequence[ScheduledSequence], seqs: Sequence[EngineSequence]
    ) -> ModelInput:
        """``prepare_input`` for a step of decodes only (one new token each, all sampled): the
        same tensors from python ints in one pass, without the general path's ~20 tensor ops
        (0.3 ms of a 3.9 ms batch-1 step on 2 cores)."""
        bs = self.block_size
        ids, positions, slots, lens, tables = [], [], [], [], []
        for item, seq in zip(items, seqs):
            pos = item.num_computed_tokens
            table = seq.block_table
            ids.append(seq.token_ids[pos])
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            lens.append(pos + 1)
            tables.append(table)
        width = max(len(t) for t in tables)
        n = len(items)

        def dev(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64).to(self.device, non_blocking=True)

        rows = torch.arange(n + 1, dtype=torch.int64).to(self.device, non_blocking=True)
        ctx = CacheContext(
            positions=dev(positions),
            query_start_loc=rows,
            seq_lens=dev(lens),
            slot_mapping=dev(slots),
            block_tables=dev([t + [0] * (width - len(t)) for t in tables]),
            block_size=bs,
            host_query_lens=(1,) * n,
            host_seq_lens=tuple(lens),
            attention=self.plan.attention,
            native_kernels=self.plan.native_kernels,
        )
        return ModelInput(input_ids=dev(ids), ctx=ctx, logits_indices=rows[:n], num_sampled=n,
                          prompt_rows=())

    @torch.inference_mode()
    def execute(self, model_input: ModelInput) -> torch.Tensor:
        """Run the cached forward; fp32 logits (num_sampled, vocab) of the sampled rows.

        A step with no sampled row (prefill chunks only) still runs: their KV or recurrent
        state must land in the cache; the head then sees zero rows.
        """
        if self.compiled is not None and CompiledDecode.applies(model_input.ctx):
            logits = self.compiled.run(model_input.input_ids, model_input.ctx)
            return logits.index_select(0, model_input.logits_indices).float()
        logits = self.model.forward_cached(
            model_input.input_ids, model_input.ctx, self.cache, model_input.logits_indices
        )
        return logits.float()

    def compile_decode_buckets(self, max_model_len: int) -> float:
        """Compile every decode bucket now (start-up); the seconds it took (0 without compile)."""
        if self.compiled is None:
            return 0.0
        t0 = time.perf_counter()
        try:
            self.compiled.warm_up(math.ceil(max_model_len / self.block_size))
        except Exception as e:  # noqa: BLE001 - e.g. no C++ compiler for inductor's CPU kernels
            # The per-layer cache serves the eager forward as well: run eager, loudly.
            log.warning("engine.compile: compiling the decode step failed (%s: %s); running eager",
                        type(e).__name__, e)
            self.compiled = None
            return 0.0
        self.compile_seconds = time.perf_counter() - t0
        log.info("engine.compile: %d decode buckets compiled in %.1f s",
                 len(self.compiled.buckets), self.compile_seconds)
        return self.compile_seconds

    # -- start-up profiling -------------------------------------------------------------------

    @property
    def max_profile_len(self) -> float:
        """The longest single prompt the device pool can hold (recurrent: unbounded)."""
        return math.inf if self.is_recurrent else self.num_blocks * self.block_size

    @torch.inference_mode()
    def profile_prefill(self, lengths: Iterable[int], repeats: int = 2) -> dict[int, float]:
        """Seconds to prefill one prompt of each length (the fastest of ``repeats`` runs).

        Call before any request is admitted: it writes scratch KV into the first blocks.
        The minimum, not the mean, because the estimate models the machine's cost, and on a
        shared machine noise only ever adds time.
        """
        lengths = sorted({n for n in lengths if 1 <= n <= self.max_profile_len})
        table: dict[int, float] = {}
        for i, n in enumerate(lengths):
            num_blocks = 1 if self.is_recurrent else math.ceil(n / self.block_size)
            ctx = _single_prefill_context(n, num_blocks, self.block_size, self.is_recurrent,
                                          self.device)
            ctx.attention, ctx.native_kernels = self.plan.attention, self.plan.native_kernels
            ids = torch.randint(0, self.config.vocab_size, (n,), device=self.device)
            last = torch.tensor([n - 1], device=self.device)
            times = []
            for _ in range(repeats + (1 if i == 0 else 0)):  # first call warms kernels up
                self._sync()
                t0 = time.perf_counter()
                self.model.forward_cached(ids, ctx, self.cache, last)
                self._sync()
                times.append(time.perf_counter() - t0)
            table[n] = min(times[-repeats:])
        return table

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _prompt_logit_rows(items: Sequence[Any], seqs: Sequence[EngineSequence], query_start_loc: torch.Tensor
                       ) -> tuple[tuple[tuple[int, int, int], ...], list[int]]:
    """The chunk rows whose logits give prompt logprobs: positions not collected yet, below the
    last prompt position (whose logits are the first sample's). Python only for such sequences."""
    ranges, rows = [], []
    for i, (item, seq) in enumerate(zip(items, seqs)):
        if not seq.needs_prompt_logits:
            continue
        start = item.num_computed_tokens
        first = max(start, seq.num_prompt_logits_done)
        end = min(start + item.num_new_tokens, seq.num_prompt_tokens - 1)
        if end <= first:
            continue
        base = int(query_start_loc[i]) - start
        ranges.append((seq.seq_id, first, end - first))
        rows.extend(range(base + first, base + end))
    return tuple(ranges), rows


def _index_pair(pairs: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    src, dst = zip(*pairs)
    return torch.tensor(src, dtype=torch.int64), torch.tensor(dst, dtype=torch.int64)


def _single_prefill_context(
    n: int, num_blocks: int, block_size: int, is_recurrent: bool, device: torch.device
) -> CacheContext:
    positions = torch.arange(n, device=device)
    return CacheContext(
        positions=positions,
        query_start_loc=torch.tensor([0, n], device=device),
        seq_lens=torch.tensor([n], device=device),
        slot_mapping=torch.zeros(n, dtype=torch.int64, device=device) if is_recurrent else positions,
        block_tables=torch.arange(num_blocks, device=device)[None],
        block_size=block_size,
        host_query_lens=(n,),
        host_seq_lens=(n,),
        state_slots=torch.zeros(1, dtype=torch.int64, device=device) if is_recurrent else None,
    )

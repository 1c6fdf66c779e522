"""The synchronous engine: add requests, step (schedule -> swap -> forward -> sample -> detokenize).

One ``step()`` is the nano-vllm loop: ``scheduler.schedule()``, the runner's swap copies and
cached forward, the sampler, ``scheduler.postprocess()``, then text, stop strings and outputs.

Thread safety: one thread steps (the async front's loop thread); others may add and abort at
any time. The lock covers the bookkeeping (schedule, building the step's tensors,
postprocess) but not the swap copies, forward and sampling, so ``abort()`` frees a request's
blocks at once even mid-forward. That is safe: nothing can take a freed block before the next
``schedule()``, which waits for this step to finish.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastserve_ray.device import resolve_dtype
from fastserve_ray.engine.block_manager import BlockManager
from fastserve_ray.engine.engine_config import (
    EngineConfig,
    default_preemption_mode,
    resolve_cache_sizes,
)
from fastserve_ray.engine.errors import RequestError
from fastserve_ray.engine.grammars import EngineGrammars
from fastserve_ray.engine.model_runner import ModelRunner, model_device_dtype
from fastserve_ray.engine.outputs import RequestOutput
from fastserve_ray.engine.plan import resolve_plan
from fastserve_ray.engine.prefix_summary import MAX_REPORTED_HASHES, encode_summary
from fastserve_ray.engine.request_state import RequestState
from fastserve_ray.engine.sampler import Sampler, SamplerOutput, TokenLogprobs
from fastserve_ray.engine.sampling_params import (
    MAX_SEED,
    SamplingParams,
    sample_request_ids,
    validate_prompt,
    validate_request,
)
from fastserve_ray.engine.scheduler import Scheduler
from fastserve_ray.engine.scheduler_factory import create_scheduler
from fastserve_ray.engine.scheduler_output import SchedulerOutput
from fastserve_ray.engine.sequence import Sequence as EngineSequence
from fastserve_ray.engine.sequence import SequenceStatus
from fastserve_ray.engine.state_slots import StateSlotManager
from fastserve_ray.errors import ConfigError
from fastserve_ray.perf import tune_cpu_allocator
from fastserve_ray.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Prompt = str | Sequence[int]
# Anything with .model and .tokenizer (models.model_dir.LoadedModel): the seam where compressed
# model directories will plug in their own loader.
ModelLoader = Callable[..., Any]
EMBED_BATCH = 16  # prompts per forward in embed()


@dataclasses.dataclass
class EngineStats:
    """Counters since start-up, for tests and metrics."""

    num_steps: int = 0
    num_preempted: int = 0  # sequences whose KV was dropped for recompute
    num_swapped_out: int = 0  # sequences whose KV moved to the host tier
    num_swapped_in: int = 0
    num_prompt_tokens: int = 0  # prefill tokens computed (recomputation included)
    num_generated_tokens: int = 0


def tokenize_prompt(prompt: Prompt, tokenizer: Tokenizer | None) -> Sequence[int]:
    """Token ids of a text prompt (BOS first), or the ids as given; RequestError without a tokenizer."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise RequestError("this engine has no tokenizer: send token ids", "prompt")
        return tokenizer.encode(prompt, add_bos=True)
    return prompt


def profile_lengths(max_len: int) -> list[int]:
    """Prompt lengths to profile for MLFQ: 1, then x4 from 16 up to ``max_len``, and max_len."""
    lengths, n = [1], 16
    while n < max_len:
        lengths.append(n)
        n *= 4
    return [*lengths, max_len]


class LLMEngine:
    """Continuous-batching engine over one model on one device."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer | None = None,
        config: EngineConfig | None = None,
        *,
        eos_token_id: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        **config_overrides: Any,
    ) -> None:
        """Build caches, runner and scheduler for ``model``; tokenizer None means token ids only."""
        config = (config or EngineConfig()).replace(**config_overrides)
        self.config = config
        if config.dtype != "auto":
            # An explicit dtype casts the model in place (RoPE's frequencies stay fp32).
            model.to(resolve_dtype(config.dtype, model_device_dtype(model)[0]))
        self.model_config = model.config
        self.tokenizer = tokenizer
        self.clock = clock
        self.vocab_size = model.config.vocab_size
        self.max_model_len = config.max_model_len or model.config.max_seq_len
        if self.max_model_len > model.config.max_seq_len:
            raise ConfigError(
                f"engine.max_model_len={self.max_model_len} exceeds the model's max_seq_len "
                f"{model.config.max_seq_len}"
            )
        if eos_token_id is None and tokenizer is not None:
            eos_token_id = tokenizer.eos_id
        self.eos_token_id = eos_token_id
        # A checkpoint may end sequences with several ids (generation_config.json's
        # eos_token_id list: Llama-3's <|eot_id|> and <|end_of_text|>): the rest stop a request
        # as its stop_token_ids do, unless it ignores EOS.
        self.extra_eos_ids = tuple(i for i in getattr(tokenizer, "eos_ids", ()) if i != eos_token_id)
        preemption_mode = config.preemption_mode or default_preemption_mode(config.policy)
        self.runner, self.block_manager = self._build_cache(model, preemption_mode)
        self.device = self.runner.device
        if self.device.type == "cpu":
            tune_cpu_allocator()  # page faults on fresh activation buffers dominate CPU decode
        self.prefill_time: dict[int, float] | None = None  # MLFQ's cost model
        self.scheduler = self._build_scheduler(preemption_mode)
        self.sampler = Sampler(self.eos_token_id)
        self.stats = EngineStats()
        self._requests: dict[str, RequestState] = {}
        self._by_seq_id: dict[int, RequestState] = {}
        self._request_counter = itertools.count()
        self._seed_rng = random.Random(config.seed)
        self._lock = threading.Lock()
        self._lock_owner: int | None = None
        self._deferred_aborts: deque[str] = deque()
        # n > 1: the other samples of a prompt wait here (leader seq id -> them) until the
        # first sample's prompt KV is in the prefix cache, so that they share its blocks.
        self._held_siblings: dict[int, list[RequestState]] = {}
        self._children: dict[str, list[str]] = {}  # n > 1: request id -> its samples' ids
        self.grammars = EngineGrammars(tokenizer, self.vocab_size)  # structured outputs

    def _build_cache(self, model: nn.Module, preemption_mode: str) -> tuple[ModelRunner, Any]:
        """Size the pools from the config and device; the runner's tensors, the manager's ids."""
        config = self.config
        is_recurrent = bool(model.config.is_recurrent)
        device, dtype = model_device_dtype(model)
        sizes = resolve_cache_sizes(
            config,
            bytes_per_block=model.cache_bytes_per_block(config.block_size, dtype),
            is_recurrent=is_recurrent,
            max_model_len=self.max_model_len,
            preemption_mode=preemption_mode,
            device=device,
        )
        self.plan = resolve_plan(config, device, dtype, is_recurrent=is_recurrent)
        log.info(self.plan.line())
        runner = ModelRunner(model, num_blocks=sizes.num_blocks, block_size=config.block_size,
                             num_host_blocks=sizes.num_host_blocks, compile=config.compile,
                             max_num_seqs=config.max_num_seqs, plan=self.plan)
        runner.compile_decode_buckets(self.max_model_len)
        if is_recurrent:
            return runner, StateSlotManager(sizes.num_blocks, sizes.num_host_blocks)
        return runner, BlockManager(sizes.num_blocks, config.block_size, sizes.num_host_blocks,
                                    config.enable_prefix_caching)

    def _build_scheduler(self, preemption_mode: str) -> Scheduler:
        config = self.config
        kwargs: dict[str, Any] = dict(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            preemption_mode=preemption_mode,
            eos_token_id=self.eos_token_id,
            clock=self.clock,
        )
        if config.swap_watermark is not None:
            kwargs["swap_watermark"] = config.swap_watermark
        if config.policy == "mlfq":
            prefill_time = config.prefill_time
            if prefill_time is None:
                # FastServe's cost model: measured once here, then every quantum is in seconds.
                prefill_time = self.runner.profile_prefill(profile_lengths(self.max_model_len))
            self.prefill_time = dict(prefill_time)
            kwargs.update(
                prefill_time=self.prefill_time,
                num_queues=config.num_queues,
                base_quantum=config.base_quantum,
                starvation_threshold=config.starvation_threshold,
            )
        return create_scheduler(config.policy, self.block_manager, **kwargs)

    @classmethod
    def from_model_dir(
        cls,
        path: str | Path,
        config: EngineConfig | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        loader: ModelLoader | None = None,
        **config_overrides: Any,
    ) -> LLMEngine:
        """Load a model directory (auto device and dtype) and build an engine over it.

        The dtype is ``dtype`` if given, else the config's ``dtype`` ("auto": bf16 on CUDA and
        on CPUs with native bf16, fp32 elsewhere).

        ``loader(path, device=..., dtype=...)`` returns an object with ``.model`` and
        ``.tokenizer``; the default reads our model directories (trained here or imported from
        Hugging Face). Compressed directories bring their own loader; nothing else changes.
        """
        from fastserve_ray.device import default_device
        from fastserve_ray.quantized.loader import load_model  # plain and compressed directories

        device = torch.device(device) if device is not None else default_device()
        config = (config or EngineConfig()).replace(**config_overrides)
        dtype = dtype or resolve_dtype(config.dtype, device)
        config_overrides = {"dtype": "auto"}  # loaded in that dtype already
        t0 = time.perf_counter()
        loaded = (loader or load_model)(path, device=device, dtype=dtype)
        t1 = time.perf_counter()
        engine = cls(loaded.model, loaded.tokenizer, config, **config_overrides)
        # What a cold start spends where (reported by replicas; bench serve --only cold-start).
        engine.startup_s = {"load_model_s": t1 - t0, "build_engine_s": time.perf_counter() - t1}
        return engine

    # -- locking ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            self._lock_owner = threading.get_ident()
            try:
                self._apply_deferred_aborts()
                yield
                self._apply_deferred_aborts()
            finally:
                self._lock_owner = None

    def _apply_deferred_aborts(self) -> None:
        while self._deferred_aborts:
            self._abort_locked(self._deferred_aborts.popleft())

    # -- requests -----------------------------------------------------------------------------

    def _tokenize(self, prompt: Prompt) -> Sequence[int]:
        return tokenize_prompt(prompt, self.tokenizer)

    @staticmethod
    def _as_params(params: SamplingParams | Mapping[str, Any] | None) -> SamplingParams:
        if params is None:
            return SamplingParams()
        if isinstance(params, SamplingParams):
            return params
        if isinstance(params, Mapping):
            names = {f.name for f in dataclasses.fields(SamplingParams)}
            unknown = sorted(set(params) - names)
            if unknown:
                raise RequestError(f"unknown sampling parameter {unknown[0]!r}", unknown[0])
            return SamplingParams(**params)
        raise RequestError(
            f"params must be SamplingParams or a mapping, got {type(params).__name__}", "params"
        )

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | Mapping[str, Any] | None = None,
        request_id: str | None = None,
        *,
        arrival_time: float | None = None,
    ) -> str:
        """Validate and queue a request (text or token ids); RequestError names a bad parameter.

        Returns ``request_id`` (generated when None). With ``params.n`` > 1 the outputs come
        from n child requests ``sample_request_ids(request_id, n)``; see SamplingParams.
        """
        params = self._as_params(params)
        if self.extra_eos_ids and not params.ignore_eos:
            merged = tuple(dict.fromkeys((*params.stop_token_ids, *self.extra_eos_ids)))
            if merged != params.stop_token_ids:
                params = dataclasses.replace(params, stop_token_ids=merged)
        prompt_ids = validate_request(
            self._tokenize(prompt), params, vocab_size=self.vocab_size,
            max_model_len=self.max_model_len,
        )
        if request_id is not None and (not isinstance(request_id, str) or not request_id):
            raise RequestError(f"request_id must be a non-empty string, got {request_id!r}",
                               "request_id")
        if arrival_time is None:
            arrival_time = self.clock()
        generators = [self._make_generator(params, i) for i in range(params.n)]
        matchers = self.grammars.matchers(params)  # compiled here, outside the lock
        seqs = [EngineSequence(prompt_ids, params, arrival_time=arrival_time) for _ in generators]
        with self._locked():
            if request_id is None:
                request_id = f"req-{next(self._request_counter)}"
            ids = sample_request_ids(request_id, params.n)
            taken = [i for i in {request_id, *ids} if i in self._requests or i in self._children]
            if taken:
                raise RequestError(f"request_id {taken[0]!r} is already running", "request_id")
            self.scheduler.add(seqs[0])  # RequestError when the KV cache could never hold it
            states = [
                RequestState(child_id, seq, self.tokenizer, gen, index, matcher)
                for index, (child_id, seq, gen, matcher) in enumerate(zip(ids, seqs, generators, matchers))
            ]
            for state in states:
                self._requests[state.request_id] = state
                self._by_seq_id[state.seq.seq_id] = state
            if params.n > 1:
                self._children[request_id] = ids
                if self._shares_prefixes:
                    self._held_siblings[seqs[0].seq_id] = states[1:]
                else:
                    for seq in seqs[1:]:
                        self.scheduler.add(seq)
        return request_id

    @property
    def _shares_prefixes(self) -> bool:
        return bool(getattr(self.block_manager, "enable_prefix_caching", False))

    def _make_generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        if params.is_greedy:
            return None
        if params.seed is not None:
            seed = (params.seed + index) % (MAX_SEED + 1)
        else:
            seed = self._seed_rng.getrandbits(63)
        return torch.Generator(device=self.device).manual_seed(seed)

    def _release_siblings(self, leader_seq_id: int) -> None:
        """Queue the samples that waited for their leader's prompt KV (now cached, or gone)."""
        for state in self._held_siblings.pop(leader_seq_id, ()):
            if self._by_seq_id.get(state.seq.seq_id) is state:
                self.scheduler.add(state.seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its blocks now; its final output, or None if unknown."""
        if self._lock_owner == threading.get_ident():
            # Called back from inside a locked section (a garbage-collected stream, say):
            # applied before that section releases the lock.
            self._deferred_aborts.append(request_id)
            return None
        with self._locked():
            return self._abort_locked(request_id)

    def _abort_locked(self, request_id: str) -> RequestOutput | None:
        children = self._children.pop(request_id, None)
        if children is not None:  # n > 1: abort every sample; the output of the first
            outputs = [self._abort_locked(child) for child in children]
            return next((o for o in outputs if o is not None), None)
        state = self._requests.get(request_id)
        if state is None:
            return None
        self._forget(state)
        self.scheduler.abort(state.seq.seq_id)  # a no-op for a held sibling
        self._release_siblings(state.seq.seq_id)
        state.finish("abort", self.clock())
        return state.make_output()

    def has_unfinished(self) -> bool:
        """Whether any request is waiting, running or swapped."""
        return bool(self._requests)

    def unfinished_request_ids(self) -> list[str]:
        """Ids of the requests not finished yet (with n > 1: the samples' own ids)."""
        with self._locked():
            return list(self._requests)

    @property
    def num_unfinished(self) -> int:
        """Requests not finished yet."""
        return len(self._requests)

    def load_snapshot(self) -> dict[str, Any]:
        """Current load and lifetime counters (for autoscaling and metrics); a stable contract.

        Keys: num_waiting, num_running, num_swapped (sequences now), kv_cache_usage (fraction of
        device KV blocks or state slots in use, evictable prefix-cache blocks counted as free),
        num_unfinished_requests, and the EngineStats counters (num_steps, num_preempted,
        num_swapped_out, num_swapped_in, num_prompt_tokens, num_generated_tokens): floats. And
        ``plan``: the engine plan as a dict of strings and booleans (engine/plan.py).
        ``queue_seqs``: under MLFQ, the unfinished sequences in each queue (a list of floats,
        queue 0 first); an empty list under other policies.
        """
        with self._locked():
            total = self.block_manager.num_blocks
            free = self.block_manager.num_free_blocks
            return {
                "num_waiting": float(self.scheduler.num_waiting),
                "num_running": float(self.scheduler.num_running),
                "num_swapped": float(self.scheduler.num_swapped),
                "kv_cache_usage": (total - free) / total if total else 0.0,
                "num_unfinished_requests": float(len(self._requests)),
                **{k: float(v) for k, v in dataclasses.asdict(self.stats).items()},
                "plan": self.plan.as_dict(),
                "queue_seqs": self._queue_seqs(),
            }

    def prefix_cache_summary(self, max_hashes: int = MAX_REPORTED_HASHES) -> dict[str, Any]:
        """The prefix cache as a prefix-aware router reads it: the block size and the short
        hashes of up to ``max_hashes`` cached full blocks (engine/prefix_summary.py).

        Kept out of load_snapshot(), which is sent every step: this walks the cache, so it is
        built only when a replica's routing stats ask for it (every few seconds).
        """
        with self._locked():
            bm = self.block_manager
            hashes = getattr(bm, "cached_block_hashes", None)  # recurrent state slots: no cache
            reported = hashes(max_hashes) if hashes is not None else []
            return encode_summary(self.config.block_size, reported, getattr(bm, "num_cached_blocks", 0))

    def _queue_seqs(self) -> list[float]:
        if self.config.policy != "mlfq":
            return []
        counts = [0.0] * self.config.num_queues
        for seq in self.scheduler.sequences.values():
            counts[min(seq.queue_level, len(counts) - 1)] += 1
        return counts

    # -- the step -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one engine step; an output for each request that got a token (abort() reports aborts)."""
        with self._locked():
            out = self.scheduler.schedule()
            if out.is_empty:
                return []
            self._count(out)
            seqs = [self.scheduler.get_sequence(item.seq_id) for item in out.scheduled]
            model_input = self.runner.prepare_input(out, seqs) if seqs else None
            now = self.clock()
            for seq in seqs:
                self._by_seq_id[seq.seq_id].on_scheduled(now)
            sampling = [self._by_seq_id[it.seq_id] for it in out.scheduled if it.is_sample]
        # Tensor work without the lock (see the module docstring).
        self.runner.swap(out.blocks_to_swap_out, out.blocks_to_swap_in)
        sampled = None
        prompt_lps: list[tuple[int, int, list[TokenLogprobs]]] = []
        if model_input is not None:
            logits = self.runner.execute(model_input)
            if model_input.prompt_rows:
                prompt_lps = self._prompt_logprobs(logits[model_input.num_sampled:], model_input.prompt_rows)
                logits = logits[: model_input.num_sampled]
            if sampling:
                # Structured outputs' masks, on the host. On a GPU the forward is still running
                # here (kernels are queued, not waited for), so they cost no step time there;
                # on a CPU a helper thread measured no better (2 cores: it slows the forward).
                allowed = self.grammars.allowed([s.matcher for s in sampling])
                sampled = self.sampler(
                    logits, [s.params for s in sampling], [s.generator for s in sampling],
                    [s.seq for s in sampling], allowed=allowed,
                )
        with self._locked():
            for seq_id, first, values in prompt_lps:
                self._record_prompt_logprobs(seq_id, first, values)
            return self._postprocess(out, sampling, sampled)

    def _prompt_logprobs(self, logits: torch.Tensor, ranges: Sequence[tuple[int, int, int]]
                         ) -> list[tuple[int, int, list[TokenLogprobs]]]:
        """Each range's prompt-token logprobs: row j of a range starting at position p is the
        model's distribution after p + j + 1 tokens, so it scores prompt token p + j + 1."""
        out, row = [], 0
        for seq_id, first, count in ranges:
            state = self._by_seq_id.get(seq_id)
            rows = logits[row: row + count].float().log_softmax(dim=-1)
            row += count
            if state is None:
                continue  # aborted while the step ran
            k = state.params.prompt_logprobs or 0
            targets = torch.tensor(state.seq.token_ids[first + 1: first + 1 + count], device=rows.device)
            chosen = rows.gather(1, targets[:, None])[:, 0].tolist()
            top_v, top_i = (rows.topk(k, dim=-1) if k else (rows[:, :0], rows[:, :0].long()))
            values = [TokenLogprobs(int(t), lp, tuple(zip(ids, vs)))
                      for t, lp, ids, vs in zip(targets.tolist(), chosen, top_i.tolist(), top_v.tolist())]
            out.append((seq_id, first, values))
        return out

    def _record_prompt_logprobs(self, seq_id: int, first: int, values: list[TokenLogprobs]) -> None:
        state = self._by_seq_id.get(seq_id)
        if state is None or state.seq.num_prompt_logits_done != first:
            return  # aborted, or already collected before a preemption
        state.prompt_logprobs.extend(values)
        state.seq.num_prompt_logits_done = first + len(values)

    def _count(self, out: SchedulerOutput) -> None:
        self.stats.num_steps += 1
        self.stats.num_preempted += len(out.preempted_seq_ids)
        self.stats.num_swapped_out += len(out.swapped_out_seq_ids)
        self.stats.num_swapped_in += len(out.swapped_in_seq_ids)
        self.stats.num_prompt_tokens += out.num_prefill_tokens

    def _postprocess(
        self, out: SchedulerOutput, sampling: list[RequestState], sampled: SamplerOutput | None
    ) -> list[RequestOutput]:
        tokens = {} if sampled is None else {
            s.seq.seq_id: tok for s, tok in zip(sampling, sampled.token_ids)
        }
        # Appends tokens, finishes on EOS / stop token ids / max_tokens and frees their blocks;
        # skips sequences aborted while the step ran.
        self.scheduler.postprocess(out, tokens)
        now = self.clock()
        outputs = []
        for i, state in enumerate(sampling):
            if self._by_seq_id.get(state.seq.seq_id) is not state:
                continue  # aborted during the forward
            if self._held_siblings:
                self._release_siblings(state.seq.seq_id)  # its prompt's full blocks are cached
            status = state.seq.status
            reason = status.finish_reason if status.is_finished else None
            token_id = sampled.token_ids[i]
            # A complete grammar ends the request as a stop string does (its last token kept).
            completes = state.matcher is not None and reason is None and self._grammar_done(state, token_id)
            hit_stop_string = state.on_token(token_id, sampled.logprobs[i], now, reason, completes)
            self.stats.num_generated_tokens += 1
            if hit_stop_string and reason is None:
                self.scheduler.finish(state.seq.seq_id, SequenceStatus.FINISHED_STOPPED)
            outputs.append(state.make_output())
            if state.finished:
                self._forget(state)
        return outputs

    @staticmethod
    def _grammar_done(state: RequestState, token_id: int) -> bool:
        """Advance the request's grammar; True once it is complete (nothing more may follow)."""
        matcher = state.matcher
        assert matcher is not None
        if not matcher.accept(token_id):  # cannot happen: the sampler only offers allowed tokens
            log.error("request %s: the grammar refused token %d (%s); ending it", state.request_id,
                      token_id, matcher.error)
            return True
        return matcher.is_finished

    def _forget(self, state: RequestState) -> None:
        del self._requests[state.request_id]
        del self._by_seq_id[state.seq.seq_id]
        parent = state.request_id.rpartition("-")[0]
        children = self._children.get(parent)
        if children is not None and not any(c in self._requests for c in children):
            del self._children[parent]

    # -- embeddings ---------------------------------------------------------------------------

    def embed(self, prompts: Sequence[Prompt]) -> list[list[float]]:
        """One embedding per prompt: the final hidden state of its last token, L2-normalised.

        Last-token pooling, as vLLM pools causal decoders by default: under causal attention
        the last position is the only one that has read the whole input. Runs the model's plain
        forward (no KV cache) in the calling thread, EMBED_BATCH prompts at a time, right-padded
        (padding after a prompt's last token cannot change it); it shares the device with
        generation but never touches its cache. RequestError names a bad prompt.
        """
        ids = [validate_prompt(self._tokenize(p), max_tokens=0, vocab_size=self.vocab_size,
                               max_model_len=self.max_model_len) for p in prompts]
        model = self.runner.model
        out: list[list[float]] = []
        with torch.inference_mode():
            for i in range(0, len(ids), EMBED_BATCH):
                chunk = ids[i: i + EMBED_BATCH]
                width = max(len(x) for x in chunk)
                tokens = torch.tensor([x + [0] * (width - len(x)) for x in chunk], device=self.device)
                hidden = model.hidden_states(tokens)
                last = hidden[torch.arange(len(chunk), device=self.device),
                              torch.tensor([len(x) - 1 for x in chunk], device=self.device)]
                out.extend(torch.nn.functional.normalize(last.float(), dim=-1).tolist())
        return out

    # -- offline batches ----------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run a batch to completion; one final RequestOutput per prompt, in prompt order.

        ``prompts`` is a string, a list of token ids, or a list of either. A prompt whose params
        ask for n > 1 samples contributes its n outputs in index order.
        """
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None or isinstance(params, (SamplingParams, Mapping)):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise RequestError(
                f"got {len(params)} sampling params for {len(prompts)} prompts", "params"
            )
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.add_request(prompt, p))
        except BaseException:
            for request_id in ids:  # all or nothing
                self.abort(request_id)
            raise
        ids = [
            child for request_id, p in zip(ids, params)
            for child in sample_request_ids(request_id, self._as_params(p).n)
        ]
        pending, finals = set(ids), {}
        while pending:
            if not self.has_unfinished():
                raise RuntimeError(f"requests {sorted(pending)} vanished (aborted elsewhere?)")
            for output in self.step():
                if output.finished and output.request_id in pending:
                    pending.discard(output.request_id)
                    finals[output.request_id] = output
        return [finals[request_id] for request_id in ids]

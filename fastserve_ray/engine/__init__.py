"""Inference engine: requests, paged KV cache bookkeeping and scheduling policies.

Layers: the scheduler and block manager move ids and counts (no tensors); the model runner
executes a SchedulerOutput; the LLM engine loops schedule() -> run -> postprocess().
"""

from fastserve_ray.engine.block_manager import (
    BlockManager,
    KVCacheManager,
    kv_bytes_per_block,
    num_blocks_from_memory_budget,
)
from fastserve_ray.engine.errors import RequestError
from fastserve_ray.engine.mlfq import MLFQScheduler, PrefillTimeTable
from fastserve_ray.engine.sampling_params import (
    MAX_LOGPROBS,
    SamplingParams,
    validate_prompt,
    validate_request,
)
from fastserve_ray.engine.scheduler import (
    PREEMPTION_MODES,
    SCHEDULER_POLICIES,
    FCFSScheduler,
    ScheduledSequence,
    Scheduler,
    SchedulerOutput,
    create_scheduler,
)
from fastserve_ray.engine.sequence import Sequence, SequenceStatus
from fastserve_ray.engine.state_slots import StateSlotManager

__all__ = [
    "MAX_LOGPROBS",
    "PREEMPTION_MODES",
    "SCHEDULER_POLICIES",
    "BlockManager",
    "FCFSScheduler",
    "KVCacheManager",
    "MLFQScheduler",
    "PrefillTimeTable",
    "RequestError",
    "SamplingParams",
    "ScheduledSequence",
    "Scheduler",
    "SchedulerOutput",
    "Sequence",
    "SequenceStatus",
    "StateSlotManager",
    "create_scheduler",
    "kv_bytes_per_block",
    "num_blocks_from_memory_budget",
    "validate_prompt",
    "validate_request",
]

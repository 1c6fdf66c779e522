"""Inference engine: requests, paged KV cache bookkeeping, scheduling policies, model runner.

Layers: the scheduler and block manager move ids and counts (no tensors); the model runner
executes a SchedulerOutput; the LLM engine loops schedule() -> run -> postprocess(), and the
async engine streams its outputs.
"""

from fastserve_ray.engine.async_engine import AsyncLLMEngine, EngineDeadError, RequestStream
from fastserve_ray.engine.block_manager import (
    BlockManager,
    KVCacheManager,
)
from fastserve_ray.engine.detokenizer import IncrementalDetokenizer
from fastserve_ray.engine.engine_config import EngineConfig
from fastserve_ray.engine.errors import RequestError
from fastserve_ray.engine.llm_engine import EngineStats, LLMEngine
from fastserve_ray.engine.mlfq import MLFQScheduler, PrefillTimeTable
from fastserve_ray.engine.model_runner import ModelRunner
from fastserve_ray.engine.outputs import RequestMetrics, RequestOutput
from fastserve_ray.engine.sampler import Sampler, SamplerOutput, TokenLogprobs
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
)
from fastserve_ray.engine.scheduler_factory import create_scheduler
from fastserve_ray.engine.sequence import Sequence, SequenceStatus
from fastserve_ray.engine.state_slots import StateSlotManager

__all__ = [
    "MAX_LOGPROBS",
    "PREEMPTION_MODES",
    "SCHEDULER_POLICIES",
    "AsyncLLMEngine",
    "BlockManager",
    "EngineConfig",
    "EngineDeadError",
    "EngineStats",
    "FCFSScheduler",
    "IncrementalDetokenizer",
    "KVCacheManager",
    "LLMEngine",
    "MLFQScheduler",
    "ModelRunner",
    "PrefillTimeTable",
    "RequestError",
    "RequestMetrics",
    "RequestOutput",
    "RequestStream",
    "Sampler",
    "SamplerOutput",
    "SamplingParams",
    "ScheduledSequence",
    "Scheduler",
    "SchedulerOutput",
    "Sequence",
    "SequenceStatus",
    "StateSlotManager",
    "TokenLogprobs",
    "create_scheduler",
    "validate_prompt",
    "validate_request",
]

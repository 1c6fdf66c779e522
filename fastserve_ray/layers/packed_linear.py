"""Linear layers whose weights the engine keeps in oneDNN's blocked layout on CPU.

A decode step multiplies a few rows by every weight matrix, so on CPU it is a matrix-vector
product bound by how fast the weights stream in. PyTorch's ``F.linear`` repacks the weight
into oneDNN's cache-friendly layout on every call; packing once at start-up and calling
oneDNN's linear directly is 2-2.7x faster for 1-8 rows (bf16 and fp32, measured on 2 cores;
results identical in bf16). Projections that read the same input (q|k|v, gate|up) are also
packed as one matrix: one larger product streams its weights at 29 GB/s where three small
ones reach 19 GB/s.

With at most ``small_linear.MAX_ROWS`` rows (a batch-1 decode) and bf16 weights, both call
the native small-linear kernel instead (``kernels/small_linear_cpu.cpp``), which streams the
weights from their row-major parameters, with no packed copy.

``PackedLinear`` is an ``nn.Linear`` sharing the original parameters, and ``PackedFusedLinear``
(a ``FusedLinear``, layers/fused.py) computes several ``nn.Linear``s at once from their
parameters; ties, ``state_dict`` and
``.to()`` keep working, the packed copy is rebuilt whenever a weight changes, and anything
else (autograd, GPU, other dtypes, ``torch.compile``) takes ``F.linear``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastserve_ray.capability import Capability, capability
from fastserve_ray.kernels import small_linear
from fastserve_ray.layers.fused import FusedLinear, install_fused

log = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def can_pack(dtype: torch.dtype = torch.float32, cap: Capability | None = None) -> bool:
    """Whether this torch build has oneDNN's packed linear ops, and this CPU (``cap``, default
    the detected one) packs ``dtype``: oneDNN's bf16 reorder needs AVX-512 BW/VL/DQ or
    AVX-NE-CONVERT, and raises elsewhere."""
    if dtype not in PACKABLE_DTYPES:
        return False
    if dtype == torch.bfloat16 and not (cap or capability()).onednn_bf16:
        return False
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class _Packed:
    """One packed copy of the row-wise concatenation of some weights, rebuilt when one changes."""

    def __init__(self) -> None:
        self.packed: torch.Tensor | None = None
        self.key: tuple | None = None

    def get(self, weights: Sequence[torch.Tensor]) -> torch.Tensor | None:
        w0 = weights[0]
        if torch.compiler.is_compiling():  # inductor packs weights its own way
            return None
        if any(w.device.type != "cpu" or w.dtype not in PACKABLE_DTYPES or w.dtype != w0.dtype
               for w in weights) or (torch.is_grad_enabled() and any(w.requires_grad for w in weights)):
            return None
        if w0.dtype == torch.bfloat16 and not capability().onednn_bf16:
            return None  # this CPU cannot pack bf16: F.linear (never an exception per call)
        key = tuple((w.data_ptr(), w.dtype, w._version) for w in weights)
        if key != self.key:
            with torch.no_grad():
                w = weights[0] if len(weights) == 1 else torch.cat([w.detach() for w in weights])
                self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)
            self.key = key
        return self.packed


def few_rows_linear(x: torch.Tensor, weights: Sequence[torch.Tensor],
                    biases: Sequence[torch.Tensor | None], out_features: int) -> torch.Tensor | None:
    """``x @ cat(weights).T + cat(biases)`` by the native kernel, or None where it does not apply
    (more than ``small_linear.MAX_ROWS`` rows, not bf16, not contiguous, no kernel)."""
    in_features = x.shape[-1]
    if (x.dtype != torch.bfloat16 or x.numel() > small_linear.MAX_ROWS * in_features
            or not x.is_contiguous()
            or not all(w.is_contiguous() and w.dtype == torch.bfloat16 for w in weights)
            or not all(b is None or b.dtype == torch.bfloat16 for b in biases)):
        return None
    kernel = small_linear.small_linear_kernel()
    if kernel is None:
        return None
    out = x.new_empty(*x.shape[:-1], out_features)
    kernel(x.view(-1, in_features), list(weights), list(biases), out.view(-1, out_features))
    return out


def _few_rows_apply(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the native few-rows path may run: at most ``MAX_ROWS`` bf16 rows (checked
    first: it is the test that sends larger batches on), and the conditions ``_Packed.get``
    checks: an inference call (no autograd through the weight), on CPU, not being traced by
    ``torch.compile``."""
    return (x.dtype == torch.bfloat16 and x.numel() <= small_linear.MAX_ROWS * x.shape[-1]
            and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
            and not torch.compiler.is_compiling())


class PackedLinear(nn.Linear):
    """``nn.Linear`` that multiplies by a once-packed copy of its weight where it can."""

    def __init__(self, linear: nn.Linear, few_rows: bool = True) -> None:
        nn.Module.__init__(self)
        self.few_rows = few_rows  # the native few-rows kernel may run (the engine plan's choice)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter objects: ties stay ties
        self.bias = linear.bias
        self._cache = _Packed()

    @property
    def _packed(self) -> torch.Tensor | None:
        return self._cache.packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The native kernel reads the parameter itself: try it before the packed copy's
        # freshness check, which costs as much as the kernel on a cache-resident batch-1 step.
        if self.few_rows and _few_rows_apply(x, self.weight):
            out = few_rows_linear(x, [self.weight], [self.bias], self.out_features)
            if out is not None:
                return out
        packed = self._cache.get([self.weight])
        if packed is None or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")


class PackedFusedLinear(FusedLinear):
    """Plain ``nn.Linear``s of one input as one product over a packed copy of their weights."""

    def __init__(self, members: Sequence[nn.Linear], few_rows: bool = True) -> None:
        super().__init__(members)
        self.few_rows = few_rows
        self._cache = _Packed()
        self._bias_cat: torch.Tensor | None = None
        self._bias_key: tuple | None = None

    def _bias(self) -> torch.Tensor | None:
        """The members' biases side by side (zeros for a member without), rebuilt only when
        one changes: a concatenation per call would sit on the decode hot path."""
        biases = [m.bias for m in self.members]
        if all(b is None for b in biases):
            return None
        key = tuple(None if b is None else (b.data_ptr(), b.dtype, b._version) for b in biases)
        if key != self._bias_key:
            with torch.no_grad():
                self._bias_cat = torch.cat([
                    b.detach() if b is not None else m.weight.new_zeros(m.out_features)
                    for b, m in zip(biases, self.members)])
            self._bias_key = key
        return self._bias_cat

    def fused(self, x: torch.Tensor) -> torch.Tensor | None:
        weights = [m.weight for m in self.members]
        if self.few_rows and _few_rows_apply(x, weights[0]):
            out = few_rows_linear(x, weights, [m.bias for m in self.members], self.out_features)
            if out is not None:
                return out
        packed = self._cache.get(weights)
        if packed is None or x.dtype != weights[0].dtype:
            return None  # the members one by one (F.linear each)
        return torch.ops.mkldnn._linear_pointwise(x, packed, self._bias(), "none", [], "")


def _packable(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.weight.device.type == "cpu"


def pack_linear_weights(model: nn.Module, few_rows: bool = True) -> int:
    """Pack a CPU model's plain ``nn.Linear``s; how many modules were installed.

    Groups the model names in ``fusable_linears()`` (owner, attribute, members) become one
    PackedFusedLinear set on ``owner.attribute`` when all members are plain ``nn.Linear``s;
    every other plain ``nn.Linear`` is replaced by a PackedLinear. Subclasses (compressed
    layers, already packed ones) are left alone. Packing happens here, at start-up, so the
    first step does not pay for it.
    """
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if not can_pack(dtype):
        return 0
    fused_members: set[int] = set()

    def make(members: list[nn.Module]) -> PackedFusedLinear | None:
        if not all(_packable(m) for m in members):
            return None
        fused = PackedFusedLinear(members, few_rows)
        try:
            fused(torch.zeros(1, members[0].in_features, dtype=members[0].weight.dtype))
        except RuntimeError as e:  # an unsupported shape or build: keep the separate linears
            log.warning("could not pack a fused %s (%s)", [type(m).__name__ for m in members], e)
            return None
        fused_members.update(id(m) for m in members)
        return fused

    count = install_fused(model, make)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _packable(child) and id(child) not in fused_members:
                packed = PackedLinear(child, few_rows)
                try:
                    packed._cache.get([packed.weight])
                except RuntimeError as e:
                    log.warning("could not pack %s (%s); it stays an nn.Linear", name, e)
                    continue
                setattr(parent, name, packed)
                count += 1
    return count

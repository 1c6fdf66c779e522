"""Compressed execution: ``nn.Linear`` / RNN replacements that keep quantized weights in memory.

A ``QuantizedLinear`` holds the integer weight in the layout its kernel wants and computes
``x @ (q * scale).T + bias`` without ever materialising the float weight (except in the
per-layer dequantize fallback). Kernels (see docs/compressed-execution.md for measurements):

* ``int8pack``  — ``aten._weight_int8pack_mm``: int8 per-output-channel weights, bf16
  activations (fp32 activations are cast to bf16 and back). CPU and CUDA. Its x86 bf16 path
  needs K % 16 == 0 and does NOT check it (wrong results for K=120/136, a crash for K=100), so
  ``fits`` refuses every other K.
* ``int8row``   — this project's native CPU kernel (``kernels/small_linear_cpu.cpp``): int8
  per-output-channel weights widened to bf16 in registers, any K, bf16 activations. Built for
  decode's few rows: one pass over the int8 weights (half the bytes of bf16), where
  ``int8pack`` pays a fixed cost per call that dominates a batch-1 step. CPUs with AVX-512
  BF16 only.
* ``int4pack``  — ``aten._weight_int4pack_mm_for_cpu`` (CPU) / ``aten._weight_int4pack_mm``
  (CUDA): 4- (and 3-) bit group-wise weights, N % 16 == 0, group size 32/64/128/256. The op
  dequantizes ``(u - 8) * scale + zero``; our symmetric signed q maps to ``u = q + 8`` with
  ``zero = 0``. Only fast with bf16 activations (fp32 ones are cast).
* ``dynamic_int8`` — fbgemm's dynamic int8 linear (fp32 activations quantized on the fly).
  Opt-in only: it quantizes the whole batch with ONE activation scale, so a request's output
  would depend on which other requests share its batch.
* ``dequant``   — the fallback for any shape: dequantize the layer's weight, then ``F.linear``.

Which kernel runs is chosen per layer shape, activation dtype and batch-size bucket by a short
measurement (``probe_plan``) among the kernels that fit; each candidate's output is also
checked against the dequantized reference on the probe input, so a kernel that silently
computes the wrong thing for a shape is never chosen.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastserve_ray.compress.qtensor import QuantizedWeight
from fastserve_ray.kernels.small_linear import small_linear_int8_kernel

KERNELS = ("int8pack", "int8row", "int4pack", "dynamic_int8", "dequant")
# Batch-size buckets (rows of the flattened activation): a plan holds one kernel per bucket,
# measured at the bucket's representative size. Decode batches land in the first three.
BUCKETS = ((2, 1), (16, 8), (64, 32), (None, 128))  # (upper bound inclusive | None, probe M)
INT4_GROUP_SIZES = (32, 64, 128, 256)


def bucket_of(m: int) -> int:
    """Index of the batch-size bucket that ``m`` activation rows fall in."""
    for i, (upper, _) in enumerate(BUCKETS):
        if upper is None or m <= upper:
            return i
    return len(BUCKETS) - 1


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit q [N, K] (K even) -> uint8 [N, K/2]: column 2j low nibble, 2j+1 high."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_pack_nibbles``: int8 [N, K]."""
    lo = (packed & 0x0F).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).flatten(1)


def kernel_fits(name: str, bits: int, group_size: int, n: int, k: int, device: torch.device) -> bool:
    """Whether kernel ``name`` computes a correct result for this weight shape on ``device``."""
    if name == "dequant":
        return True
    if name == "int8pack":
        # The x86 bf16 path silently needs K % 16 == 0 (see the module docstring).
        return bits == 8 and group_size == k and k % 16 == 0 and device.type in ("cpu", "cuda")
    if name == "int8row":
        return (bits == 8 and group_size == k and device.type == "cpu"
                and small_linear_int8_kernel() is not None)
    if name == "int4pack":
        if bits > 4 or n % 16 or group_size not in INT4_GROUP_SIZES or k % group_size:
            return False
        if device.type == "cuda":
            return k % 32 == 0 and torch.cuda.get_device_capability(device)[0] >= 8
        return device.type == "cpu"
    if name == "dynamic_int8":
        return (
            bits == 8 and group_size == k and device.type == "cpu"
            and "fbgemm" in torch.backends.quantized.supported_engines
        )
    raise ValueError(f"unknown kernel {name!r}; choose from {KERNELS}")


class QuantizedLinear(nn.Module):
    """Drop-in for ``nn.Linear`` whose weight stays quantized; output dtype = input dtype."""

    def __init__(
        self,
        qweight: QuantizedWeight,
        bias: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
        kernels: Iterable[str] = ("int8pack", "int8row", "int4pack", "dequant"),
    ) -> None:
        super().__init__()
        device = torch.device(device)
        self.out_features, self.in_features = qweight.shape
        self.bits, self.group_size = qweight.bits, qweight.group_size
        n, k = qweight.shape
        self.available = tuple(
            name for name in kernels if kernel_fits(name, self.bits, self.group_size, n, k, device)
        ) or ("dequant",)
        self.register_buffer("scale", qweight.scale.to(device=device, dtype=torch.float32))
        self.register_buffer("bias", None if bias is None else bias.detach().to(device))
        # Storage: one integer layout, the one the kernels that fit read.
        self.storage = ""
        if "int4pack" in self.available:
            self.register_buffer("packed", self._int4pack(qweight, device))
            if self._int4pack_holds(qweight):
                self.storage = "int4pack"
                self.available = tuple(k_ for k_ in self.available if k_ in ("int4pack", "dequant"))
            else:  # this build packs differently than assumed: never trust the kernel with it
                self.available = tuple(k_ for k_ in self.available if k_ != "int4pack")
        if self.storage != "int4pack" and self.bits <= 4 and k % 2 == 0:
            self.register_buffer("packed", _pack_nibbles(qweight.q).to(device))
            self.storage = "nibbles"
        elif self.storage != "int4pack":
            self.register_buffer("q", qweight.q.to(device))
            self.storage = "int8"
        self.plans: dict[torch.dtype, tuple[str, ...]] = {}  # activation dtype -> kernel per bucket
        self._cache: dict[tuple[str, torch.dtype], object] = {}

    # -- storage -----------------------------------------------------------------------------

    def _int4pack(self, qweight: QuantizedWeight, device: torch.device) -> torch.Tensor:
        u = (qweight.q.to(torch.int32) + 8).to(device)
        if device.type == "cuda":
            nib = (u[:, 0::2] << 4 | u[:, 1::2]).to(torch.uint8)  # CUDA op: high nibble first
            k_tiles = next(t for t in (8, 4, 2) if self.in_features % (16 * t) == 0)
            return torch.ops.aten._convert_weight_to_int4pack(nib, k_tiles)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)

    def _int4pack_holds(self, qweight: QuantizedWeight) -> bool:
        """Whether the packed layout decodes to q on the first columns (the probe's reference
        comes from the stored layout, so the layout itself is checked against the source)."""
        cols = min(self.in_features, 2 * self.group_size)
        eye = torch.eye(cols, self.in_features, dtype=torch.bfloat16, device=self.packed.device)
        u = self._int4_mm(eye, self._unit_scale_zeros())  # (cols, N) holding u = q + 8
        return torch.equal(u.float().round().t().cpu(), qweight.q[:, :cols].float() + 8)

    def _unit_scale_zeros(self) -> torch.Tensor:
        # scale 1, zero 8: the op's (u - 8) * 1 + 8 returns the stored unsigned value u.
        sz = torch.tensor([1.0, 8.0], dtype=torch.bfloat16, device=self.packed.device)
        return sz.expand(self.in_features // self.group_size, self.out_features, 2).contiguous()

    def int_weight(self) -> torch.Tensor:
        """The signed integer weight q [N, K] (int8), recovered from whatever layout is stored."""
        if self.storage == "int8":
            return self.q
        if self.storage == "nibbles":
            return _unpack_nibbles(self.packed)
        # Unpack the kernel layout by running it on the identity with scale 1, zero 8.
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.packed.device)
        u = self._int4_mm(eye, self._unit_scale_zeros())  # (K, N) holding u = q + 8
        return (u.float().round().to(torch.int16) - 8).to(torch.int8).t().contiguous()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight q * scale [N, K] in ``dtype`` (computed in fp32, as QuantizedWeight does)."""
        q = self.int_weight().to(torch.float32)
        n, k = q.shape
        w = q.view(n, k // self.group_size, self.group_size) * self.scale[:, :, None]
        return w.view(n, k).to(dtype)

    def memory_bytes(self) -> int:
        """Bytes the layer keeps resident (integer weight, scales, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        self._cache.clear()  # derived kernel tensors follow the device/dtype of the buffers
        out = super()._apply(fn, recurse)
        # Scales stay fp32 whatever dtype the model moves to (kernels cast their own copies);
        # the bias follows the model like nn.Linear's does.
        self.scale = self.scale.to(torch.float32)
        return out

    # -- kernels -----------------------------------------------------------------------------

    def _cached(self, key: str, dtype: torch.dtype, make: Callable[[], object]) -> object:
        value = self._cache.get((key, dtype))
        if value is None:
            value = self._cache[(key, dtype)] = make()
        return value

    def _int4_mm(self, x: torch.Tensor, scale_zeros: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda":
            return torch.ops.aten._weight_int4pack_mm(x, self.packed, self.group_size, scale_zeros)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, scale_zeros)

    def run_kernel(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """y = x @ W.T + bias for 2-D ``x`` through kernel ``name``, in x's dtype."""
        dtype = x.dtype
        if name == "dequant":  # per call, never kept: the layer stays compressed
            bias = None if self.bias is None else self.bias.to(dtype)
            if self.group_size == self.in_features:
                # One scale per output row: scale the output instead of the [N, K] weight.
                q = self.int_weight().to(dtype)  # |q| <= 128: exact in bf16 too
                y = F.linear(x, q) * self.scale[:, 0].to(dtype)
                return y if bias is None else y + bias
            return F.linear(x, self.dequantize(dtype), bias)
        if name == "dynamic_int8":
            packed = self._cached("fbgemm", torch.float32, self._fbgemm_pack)
            y = torch.ops.quantized.linear_dynamic(x.float(), packed, True)  # reduce_range: no u8*s8 overflow
        elif name == "int8pack":
            scale = self._cached("scale-bf16", torch.bfloat16, lambda: self.scale[:, 0].to(torch.bfloat16))
            y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.q, scale)
        elif name == "int8row":
            scale = self.row_scales()
            xb = x.to(torch.bfloat16).contiguous()
            y = xb.new_empty(xb.shape[0], self.out_features)
            small_linear_int8_kernel()(xb, [self.q], [scale], y)
        elif name == "int4pack":
            sz = self._cached("scale-zeros", torch.bfloat16, self._int4_scale_zeros)
            y = self._int4_mm(x.to(torch.bfloat16).contiguous(), sz)
        else:
            raise ValueError(f"unknown kernel {name!r}; choose from {KERNELS}")
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(dtype)

    def int8_rows(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(q, fp32 row scales) where this layer can run the native ``int8row`` kernel (int8 per
        channel, no bias, CPU with AVX-512 BF16), else None. The model's one-call batch-1 decode
        layer (``models/llama.py``) asks every projection this, without importing this module."""
        if self.storage != "int8" or self.bias is not None or "int8row" not in self.available:
            return None
        return self.q, self.row_scales()

    def row_scales(self) -> torch.Tensor:
        """The per-output-row fp32 scales (N,) of a per-channel layer, contiguous (cached)."""
        return self._cached("scale-rows", torch.float32, lambda: self.scale[:, 0].contiguous())

    def _int4_scale_zeros(self) -> torch.Tensor:
        s = self.scale.t().to(torch.bfloat16)  # (K/g, N)
        return torch.stack((s, torch.zeros_like(s)), dim=-1).contiguous()

    def _fbgemm_pack(self) -> object:
        zero = torch.zeros(self.out_features, dtype=torch.int64)
        with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm's packing is not
            warnings.simplefilter("ignore", UserWarning)
            scale = self.scale[:, 0].double().cpu()
            wq = torch._make_per_channel_quantized_tensor(self.q.cpu(), scale, zero, 0)
            return torch.ops.quantized.linear_prepack(wq, None)

    # -- forward -----------------------------------------------------------------------------

    def plan_for(self, dtype: torch.dtype) -> tuple[str, ...]:
        """The kernel per batch bucket for activations of ``dtype`` (probed on first use)."""
        plan = self.plans.get(dtype)
        if plan is None:
            plan = self.plans[dtype] = probe_layer(self, dtype)
        return plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        if x2.shape[0] == 0:
            return x.new_empty(*shape[:-1], self.out_features)
        y = self.run_kernel(self.plan_for(x.dtype)[bucket_of(x2.shape[0])], x2)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        plans = {str(d).removeprefix("torch."): p for d, p in self.plans.items()}
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, storage={self.storage}, plans={plans}")


class QuantizedFusedLinear(nn.Module):
    """Several int8 per-channel ``QuantizedLinear``s of one input as one product, their outputs
    side by side: the compressed counterpart of the engine's fused q|k|v and gate|up.

    For few rows (decode), one native ``int8row`` call can compute all members at once, so a
    layer pays one dispatch and one thread fork instead of one per member. Whether it does is
    measured per batch-size bucket, like the members' own kernels (``probe_fused``): the fused
    call against the members run one by one with their plans. It holds the members in a plain
    list: it owns no parameters or buffers, and the model's ``state_dict`` is unchanged.
    """

    def __init__(self, members: list[QuantizedLinear]) -> None:
        super().__init__()
        if not self.fusable(members):
            raise ValueError("only int8 per-channel QuantizedLinears without bias, of one input size, fuse")
        self.members = list(members)
        self.in_features = members[0].in_features
        self.out_features = sum(m.out_features for m in members)
        self.plans: dict[torch.dtype, tuple[bool, ...]] = {}  # dtype -> one fused call, per bucket

    @staticmethod
    def fusable(members: list[nn.Module]) -> bool:
        """Whether ``members`` can share one ``int8row`` call."""
        return (len(members) > 1 and all(
            isinstance(m, QuantizedLinear) and m.storage == "int8" and m.group_size == m.in_features
            and m.bias is None and "int8row" in m.available for m in members)
            and len({m.in_features for m in members}) == 1)

    def run_fused(self, x2: torch.Tensor) -> torch.Tensor:
        """All members' outputs for 2-D ``x2`` from one native call, in x2's dtype."""
        xb = x2.to(torch.bfloat16).contiguous()
        y = xb.new_empty(xb.shape[0], self.out_features)
        small_linear_int8_kernel()(xb, [m.q for m in self.members], [m.row_scales() for m in self.members], y)
        return y.to(x2.dtype)

    def run_members(self, x: torch.Tensor) -> torch.Tensor:
        """All members' outputs, each member run with its own plan."""
        return torch.cat([m(x) for m in self.members], dim=-1)

    def plan_for(self, dtype: torch.dtype) -> tuple[bool, ...]:
        """Per batch bucket, whether one fused call runs (probed on first use)."""
        plan = self.plans.get(dtype)
        if plan is None:
            plan = self.plans[dtype] = probe_fused(self, dtype)
        return plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] and self.plan_for(x.dtype)[bucket_of(x2.shape[0])]:
            return self.run_fused(x2).view(*shape[:-1], self.out_features)
        return self.run_members(x)


def fuse_quantized_projections(model: nn.Module) -> int:
    """Install a ``QuantizedFusedLinear`` for each group of ``model.fusable_linears()`` whose
    members qualify (see ``QuantizedFusedLinear.fusable``); how many were installed."""
    count = 0
    for owner, attr, members in (model.fusable_linears() if hasattr(model, "fusable_linears") else []):
        if QuantizedFusedLinear.fusable(members):
            setattr(owner, attr, QuantizedFusedLinear(members))
            count += 1
    return count


# -- choosing kernels by measurement ----------------------------------------------------------

@dataclass(frozen=True)
class _ProbeKey:
    device: str
    dtype: torch.dtype
    n: int
    k: int
    bits: int
    group_size: int
    available: tuple[str, ...]
    has_bias: bool


_PLAN_CACHE: dict[_ProbeKey, tuple[str, ...]] = {}


def _median_us(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def _tolerance(dtype: torch.dtype, name: str) -> float:
    # Relative to the output's scale: bf16 arithmetic (every kernel but dequant in fp32) rounds
    # at 2^-8; dynamic int8 also rounds activations to 8 bits.
    if name == "dynamic_int8":
        return 0.05
    return 1e-4 if (dtype == torch.float32 and name == "dequant") else 0.03


def probe_layer(layer: QuantizedLinear, dtype: torch.dtype, repeats: int = 3) -> tuple[str, ...]:
    """Time every fitting kernel at each bucket's batch size; the fastest correct one per bucket.

    Results are cached per (device, dtype, shape, format) for the process, so a model's many
    same-shaped layers cost one probe. Candidates are timed interleaved (round-robin) so that
    a burst of load on a shared machine hits them alike.
    """
    key = _ProbeKey(str(layer.scale.device), dtype, layer.out_features, layer.in_features,
                    layer.bits, layer.group_size, layer.available, layer.bias is not None)
    if key in _PLAN_CACHE:
        return _PLAN_CACHE[key]
    if len(layer.available) == 1:
        plan = (layer.available[0],) * len(BUCKETS)
        _PLAN_CACHE[key] = plan
        return plan
    gen = torch.Generator(device="cpu").manual_seed(0)
    # Dequantizing the int4 kernel layout means running the kernel on an identity matrix: never
    # competitive, so not a candidate there (it still serves as the reference, computed once).
    candidates = [k for k in layer.available if not (k == "dequant" and layer.storage == "int4pack")]
    plan = []
    with torch.inference_mode():
        w_ref = layer.dequantize(torch.float32)
        bias = None if layer.bias is None else layer.bias.float()
        for _, m in BUCKETS:
            x = torch.randn(m, layer.in_features, generator=gen).to(layer.scale.device, dtype)
            ref = F.linear(x.float(), w_ref, bias)
            scale = ref.abs().max().item() or 1.0
            ok = []
            for name in candidates:
                try:
                    err = (layer.run_kernel(name, x).float() - ref).abs().max().item() / scale
                except RuntimeError:
                    continue  # the op refused this shape/dtype on this build: not a candidate
                if err <= _tolerance(dtype, name):
                    ok.append(name)
            times: dict[str, list[float]] = {name: [] for name in ok}
            for _ in range(repeats):
                for name in ok:
                    times[name].append(_median_us(lambda n=name, x=x: _sync(layer.run_kernel(n, x)), 2))
            plan.append(min(ok, key=lambda n: statistics.median(times[n])) if ok else "dequant")
    result = tuple(plan)
    _PLAN_CACHE[key] = result
    return result


# The fused call is a candidate up to this many rows: decode batches. Beyond them each member
# runs its own plan (oneDNN-backed kernels are made for many rows).
FUSED_MAX_PROBE_ROWS = 8
_FUSED_PLAN_CACHE: dict[tuple, tuple[bool, ...]] = {}


def probe_fused(fused: QuantizedFusedLinear, dtype: torch.dtype, repeats: int = 3) -> tuple[bool, ...]:
    """Per batch bucket, whether one fused call beats the members run one by one (each with its
    probed plan), timed interleaved at the bucket's size; a fused result that differs from the
    members' beyond bf16 rounding is never chosen. Cached per (device, dtype, member shapes)."""
    device = fused.members[0].scale.device
    key = (str(device), dtype, tuple((m.out_features, m.in_features) for m in fused.members))
    if key in _FUSED_PLAN_CACHE:
        return _FUSED_PLAN_CACHE[key]
    gen = torch.Generator(device="cpu").manual_seed(0)
    plan = []
    with torch.inference_mode():
        for _, m in BUCKETS:
            if m > FUSED_MAX_PROBE_ROWS:
                plan.append(False)
                continue
            x = torch.randn(m, fused.in_features, generator=gen).to(device, dtype)
            ref = fused.run_members(x).float()
            err = (fused.run_fused(x).float() - ref).abs().max().item() / (ref.abs().max().item() or 1.0)
            if err > _tolerance(dtype, "int8row"):
                plan.append(False)
                continue
            t_fused, t_members = [], []
            for _ in range(repeats):
                t_fused.append(_median_us(lambda x=x: _sync(fused.run_fused(x)), 2))
                t_members.append(_median_us(lambda x=x: _sync(fused.run_members(x)), 2))
            plan.append(statistics.median(t_fused) <= statistics.median(t_members))
    result = tuple(plan)
    _FUSED_PLAN_CACHE[key] = result
    return result


def _sync(y: torch.Tensor) -> torch.Tensor:
    if y.device.type == "cuda":
        torch.cuda.synchronize(y.device)
    return y


# -- recurrent layers -------------------------------------------------------------------------

class QuantizedRNN(nn.Module):
    """Drop-in for a batch-first ``nn.RNN``/``nn.LSTM``/``nn.GRU`` whose weight matrices are
    ``QuantizedLinear``s: each layer's input projection runs over the whole sequence at once,
    the hidden projection once per time step, with torch's gate equations."""

    def __init__(self, mode: str, hidden_size: int, num_layers: int, nonlinearity: str = "tanh") -> None:
        super().__init__()
        if mode not in ("rnn", "lstm", "gru"):
            raise ValueError(f"unknown recurrent mode {mode!r}")
        self.mode, self.hidden_size, self.num_layers = mode, hidden_size, num_layers
        self.act = torch.tanh if nonlinearity == "tanh" else torch.relu
        self.ih = nn.ModuleList()
        self.hh = nn.ModuleList()

    def add_layer(self, ih: nn.Module, hh: nn.Module) -> None:
        """Append one layer's input and hidden projections (each holds its bias)."""
        self.ih.append(ih)
        self.hh.append(hh)

    def _cell(self, gi: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None, hh: nn.Module):
        gh = hh(h)
        if self.mode == "rnn":
            return self.act(gi + gh), None
        if self.mode == "lstm":
            i, f, g, o = (gi + gh).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        r_i, z_i, n_i = gi.chunk(3, dim=-1)
        r_h, z_h, n_h = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(r_i + r_h), torch.sigmoid(z_i + z_h)
        n = torch.tanh(n_i + r * n_h)
        return (1 - z) * n + z * h, None

    def forward(self, x: torch.Tensor, hx=None):  # noqa: ANN001 - nn.RNN's signature
        B, T, _ = x.shape  # batch_first
        if hx is None:
            zeros = x.new_zeros(self.num_layers, B, self.hidden_size)
            hx = (zeros, zeros.clone()) if self.mode == "lstm" else zeros
        h0, c0 = hx if self.mode == "lstm" else (hx, None)
        hs, cs = [], []
        for layer in range(self.num_layers):
            gates = self.ih[layer](x)  # (B, T, G*H): the input projection for all steps at once
            h = h0[layer]
            c = None if c0 is None else c0[layer]
            outs = []
            for t in range(T):
                h, c = self._cell(gates[:, t], h, c, self.hh[layer])
                outs.append(h)
            x = torch.stack(outs, dim=1)
            hs.append(h)
            cs.append(c)
        h_n = torch.stack(hs)
        return x, ((h_n, torch.stack(cs)) if self.mode == "lstm" else h_n)

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

import warnings
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fastserve_ray.kernels.small_linear import small_linear_int8_kernel
from fastserve_ray.quantized.autotune import bucket_of, probe_layer
from fastserve_ray.quantized.qtensor import QuantizedWeight

KERNELS = ("int8pack", "int8row", "int4pack", "dynamic_int8", "dequant")
INT4_GROUP_SIZES = (32, 64, 128, 256)


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
        channel, CPU with AVX-512 BF16), else None. The model's one-call batch-1 decode layer
        (``models/llama.py``) asks every projection this through ``layers.int8_rows``; a bias
        (Qwen2's q/k/v) is added after the kernel's rounding there, as ``forward`` does here."""
        if self.storage != "int8" or "int8row" not in self.available:
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

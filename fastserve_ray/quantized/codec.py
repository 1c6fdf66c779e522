"""Lossless encoding of compressed weights into byte parts (bit-packing, sparsity metadata, zstd).

One compressed parameter becomes a few named uint8 parts plus a JSON-able description:

- quantized (QuantizedWeight): the integers shifted to unsigned (q + 2^(bits-1)) and bit-packed
  little-endian ("qweight"), the float32 scales as raw bytes ("scale");
- 2:4 sparsity: only the 2 kept values of every group of 4 input columns, plus one 3-bit index
  per group naming which of the 6 possible position pairs they hold ("meta");
- unstructured sparsity: the non-zero values plus a bitmask of where they are ("mask");
- sparse float weights (pruned, not quantized) keep their float values, as raw bytes.

Every part is then zstd-compressed (entropy coding pays on pruned and trained weights).
Decoding returns bit-for-bit what was encoded (floats are compared by bit pattern, so -0.0 and
NaN payloads survive).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zstandard

from fastserve_ray.quantized.qtensor import QuantizedWeight, qrange

SPARSITY_KINDS = ("none", "2:4", "unstructured")
ZSTD_LEVEL = 10

# The 6 ways to keep 2 of 4 positions, indexed 0..5 (3 bits per group of 4).
PAIRS = list(itertools.combinations(range(4), 2))
_PAIR_INDEX = {p: i for i, p in enumerate(PAIRS)}


class CodecError(ValueError):
    """Encoded bytes or their description are inconsistent (corrupt or mismatched)."""


@dataclass
class EncodedTensor:
    """A compressed parameter as named byte parts plus the metadata needed to decode it."""

    parts: dict[str, torch.Tensor]  # part name -> uint8 1-D tensor (zstd frames)
    meta: dict[str, Any]  # format, bits, group_size, sparsity, shape, dtype, parts info

    @property
    def num_bytes(self) -> int:
        """Bytes of all parts together (what the artifact stores for this parameter)."""
        return sum(p.numel() for p in self.parts.values())


# -- bit packing --------------------------------------------------------------------------------


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers < 2^bits into a little-endian bit stream (uint8)."""
    v = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1)
    if v.size and int(v.max()) >= (1 << bits):
        raise CodecError(f"value {int(v.max())} does not fit in {bits} bits")
    if bits == 8:
        return v.copy()
    bitplanes = (v[:, None] >> np.arange(bits, dtype=np.uint8)) & 1  # (n, bits), LSB first
    return np.packbits(bitplanes.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of pack_bits: ``count`` unsigned integers of ``bits`` bits each."""
    if packed.size * 8 < count * bits:
        raise CodecError(f"{packed.size} packed bytes cannot hold {count} values of {bits} bits")
    if bits == 8:
        return packed[:count].astype(np.uint8)
    flat = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    return (flat.astype(np.uint8) << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)


# -- raw bytes <-> tensors ----------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise CodecError(f"unknown dtype {name!r}")
    return dtype


def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _bytes_tensor(raw: np.ndarray, dtype: torch.dtype, count: int) -> torch.Tensor:
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if raw.size != count * itemsize:
        raise CodecError(f"{raw.size} bytes do not hold {count} values of {_dtype_name(dtype)}")
    return torch.from_numpy(raw.copy()).view(dtype)


def _nonzero_mask(t: torch.Tensor) -> torch.Tensor:
    """Where ``t`` is not +0 by bit pattern (so -0.0 counts as a value to keep)."""
    if t.dtype.is_floating_point:
        itype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        return t.contiguous().view(itype) != 0
    return t != 0


# -- sparsity layouts ---------------------------------------------------------------------------


def is_2of4(t: torch.Tensor) -> bool:
    """True when every group of 4 consecutive input columns has at most 2 non-zero entries."""
    if t.dim() != 2 or t.shape[1] % 4:
        return False
    return bool((_nonzero_mask(t).reshape(t.shape[0], -1, 4).sum(-1) <= 2).all())


def _split_2of4(t: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """The 2 kept values per group of 4 (N, K/2) and each group's pair index (N*K/4,)."""
    n, k = t.shape
    nz = _nonzero_mask(t).reshape(n, k // 4, 4)
    if bool((nz.sum(-1) > 2).any()):
        raise CodecError("tensor is not 2:4 sparse (a group of 4 has more than 2 non-zeros)")
    # Fill groups with fewer than 2 non-zeros with the lowest zero positions: deterministic.
    order = torch.argsort((~nz).to(torch.int8), dim=-1, stable=True)[..., :2]
    pos = torch.sort(order, dim=-1).values  # (N, K/4, 2), ascending
    codes = (pos[..., 0] * 4 + pos[..., 1]).reshape(-1).numpy()
    lut = np.zeros(16, dtype=np.uint8)
    for (a, b), i in _PAIR_INDEX.items():
        lut[a * 4 + b] = i
    kept = torch.gather(t.reshape(n, k // 4, 4), 2, pos).reshape(n, k // 2)
    return kept, lut[codes]


def _join_2of4(kept: torch.Tensor, pair_idx: np.ndarray, n: int, k: int) -> torch.Tensor:
    if pair_idx.size and int(pair_idx.max()) >= len(PAIRS):
        raise CodecError(f"2:4 metadata holds pair index {int(pair_idx.max())} (at most 5)")
    pos = torch.from_numpy(np.array(PAIRS, dtype=np.int64)[pair_idx]).reshape(n, k // 4, 2)
    out = torch.zeros(n, k // 4, 4, dtype=kept.dtype)
    out.scatter_(2, pos, kept.reshape(n, k // 4, 2))
    return out.reshape(n, k)


# -- zstd ---------------------------------------------------------------------------------------


def _compress(raw: np.ndarray) -> torch.Tensor:
    # The frame checksum turns a flipped byte into an error instead of a silently different weight.
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True, write_checksum=True)
    frame = cctx.compress(raw.tobytes())
    return torch.frombuffer(bytearray(frame), dtype=torch.uint8)


def _decompress(part: torch.Tensor, raw_bytes: int) -> np.ndarray:
    try:
        raw = zstandard.ZstdDecompressor().decompress(part.numpy().tobytes(), max_output_size=raw_bytes)
    except zstandard.ZstdError as e:
        raise CodecError(f"zstd frame is corrupt ({e})") from None
    if len(raw) != raw_bytes:
        raise CodecError(f"decompressed to {len(raw)} bytes, expected {raw_bytes}")
    return np.frombuffer(raw, dtype=np.uint8)


# -- encode / decode ----------------------------------------------------------------------------


def encode(value: torch.Tensor | QuantizedWeight, sparsity: str = "none") -> EncodedTensor:
    """Encode a quantized or sparse-float weight into zstd-compressed byte parts."""
    if sparsity not in SPARSITY_KINDS:
        raise ValueError(f"sparsity={sparsity!r} (choose from {SPARSITY_KINDS})")
    raw: dict[str, np.ndarray] = {}
    if isinstance(value, QuantizedWeight):
        n, k = value.shape
        meta: dict[str, Any] = {"format": "quantized", "bits": value.bits, "group_size": value.group_size,
                                "dtype": "int8"}
        values = value.q
        raw["scale"] = _tensor_bytes(value.scale.to(torch.float32))
    else:
        if value.dim() != 2 or sparsity == "none":
            raise ValueError("a float tensor is encoded only as a 2-D sparse weight (2:4 or unstructured)")
        n, k = value.shape
        meta = {"format": "sparse", "bits": None, "group_size": None, "dtype": _dtype_name(value.dtype)}
        values = value
    meta.update({"sparsity": sparsity, "shape": [n, k]})

    if sparsity == "2:4":
        if k % 4:
            raise ValueError(f"2:4 sparsity needs an input width divisible by 4, got {k}")
        values, pair_idx = _split_2of4(values)
        raw["meta"] = pack_bits(pair_idx, 3)
    elif sparsity == "unstructured":
        mask = _nonzero_mask(values)
        raw["mask"] = np.packbits(mask.reshape(-1).numpy(), bitorder="little")
        values = values.reshape(-1)[mask.reshape(-1)]
    meta["num_values"] = int(values.numel())

    if meta["format"] == "quantized":
        lo, _ = qrange(value.bits)
        unsigned = (values.to(torch.int16) - lo).to(torch.uint8).numpy()
        raw["qweight"] = pack_bits(unsigned, value.bits)
    else:
        raw["values"] = _tensor_bytes(values)

    parts = {name: _compress(data) for name, data in raw.items()}
    meta["parts"] = {name: {"raw_bytes": int(raw[name].size), "bytes": int(parts[name].numel()),
                            "codec": "zstd"} for name in raw}
    return EncodedTensor(parts, meta)


def decode(encoded: EncodedTensor) -> torch.Tensor | QuantizedWeight:
    """Exact inverse of ``encode``; raises CodecError on inconsistent parts or metadata."""
    meta, parts = encoded.meta, encoded.parts
    try:
        fmt, sparsity = meta["format"], meta["sparsity"]
        n, k = (int(x) for x in meta["shape"])
        num_values = int(meta["num_values"])
        described = meta["parts"]
    except (KeyError, TypeError, ValueError) as e:
        raise CodecError(f"tensor description is incomplete ({e!r})") from None
    if set(described) != set(parts):
        raise CodecError(f"parts {sorted(parts)} do not match the description {sorted(described)}")
    raw = {name: _decompress(parts[name], int(described[name]["raw_bytes"])) for name in parts}

    if fmt == "quantized":
        bits, group_size = int(meta["bits"]), int(meta["group_size"])
        if bits not in (3, 4, 8) or group_size < 1 or k % group_size:
            raise CodecError(f"bits={bits}, group_size={group_size} do not fit a {n}x{k} weight")
        lo, _ = qrange(bits)
        unsigned = unpack_bits(raw["qweight"], bits, num_values)
        values = (torch.from_numpy(unsigned.astype(np.int16)) + lo).to(torch.int8)
    elif fmt == "sparse":
        values = _bytes_tensor(raw["values"], _dtype_from_name(meta["dtype"]), num_values)
    else:
        raise CodecError(f"unknown tensor format {fmt!r}")

    if sparsity == "2:4":
        if num_values != n * k // 2:
            raise CodecError(f"2:4 tensor {n}x{k} needs {n * k // 2} values, has {num_values}")
        pair_idx = unpack_bits(raw["meta"], 3, n * k // 4)
        dense = _join_2of4(values.reshape(n, k // 2), pair_idx, n, k)
    elif sparsity == "unstructured":
        mask = torch.from_numpy(np.unpackbits(raw["mask"], count=n * k, bitorder="little").astype(bool))
        if int(mask.sum()) != num_values:
            raise CodecError(f"bitmask marks {int(mask.sum())} values, the tensor holds {num_values}")
        dense = torch.zeros(n * k, dtype=values.dtype)
        dense[mask] = values
        dense = dense.reshape(n, k)
    elif sparsity == "none":
        if num_values != n * k:
            raise CodecError(f"dense tensor {n}x{k} needs {n * k} values, has {num_values}")
        dense = values.reshape(n, k)
    else:
        raise CodecError(f"unknown sparsity {sparsity!r}")

    if fmt == "sparse":
        return dense
    scale = _bytes_tensor(raw["scale"], torch.float32, n * (k // group_size)).reshape(n, k // group_size)
    try:
        return QuantizedWeight(dense, scale, bits, group_size)
    except ValueError as e:
        raise CodecError(str(e)) from None

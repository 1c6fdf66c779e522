"""Codec: bit packing and sparsity layouts by hand, and a bit-for-bit round-trip property."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastserve_ray.quantized.codec import CodecError, EncodedTensor, decode, encode, pack_bits, unpack_bits
from fastserve_ray.quantized.qtensor import QuantizedWeight, qrange


def test_pack_bits_by_hand() -> None:
    # 4-bit values 1, 2, 15 little-endian: byte0 = 1 | 2<<4 = 0x21, byte1 = 15.
    assert pack_bits(np.array([1, 2, 15]), 4).tolist() == [0x21, 0x0F]
    # 3-bit values 5, 3: bits 101 then 110 (LSB first) -> 0b011101 = 29.
    assert pack_bits(np.array([5, 3]), 3).tolist() == [29]
    assert unpack_bits(np.array([29], dtype=np.uint8), 3, 2).tolist() == [5, 3]
    with pytest.raises(CodecError, match="does not fit"):
        pack_bits(np.array([8]), 3)


def test_2of4_stores_half_the_values_and_3_bit_pair_indices() -> None:
    w = torch.tensor([[0.0, 1.5, 0.0, -2.0, 3.0, 0.0, 0.0, 0.0]])
    enc = encode(w, "2:4")
    assert enc.meta["num_values"] == 4  # 2 kept per group of 4
    assert enc.meta["parts"]["meta"]["raw_bytes"] == 1  # 2 groups x 3 bits
    assert torch.equal(decode(enc), w)
    with pytest.raises(CodecError, match="not 2:4"):
        encode(torch.ones(1, 4), "2:4")


def test_quantized_sizes_shrink_with_bits() -> None:
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    raw = {b: encode(QuantizedWeight.from_float(w, b, 64), "none").meta["parts"]["qweight"]["raw_bytes"]
           for b in (3, 4, 8)}
    assert raw == {3: 32 * 128 * 3 // 8, 4: 32 * 128 // 2, 8: 32 * 128}


def test_corrupt_parts_are_errors() -> None:
    enc = encode(QuantizedWeight.from_float(torch.randn(4, 8), 4, 8), "unstructured")
    bad = dict(enc.parts)
    bad["qweight"] = bad["qweight"].clone()
    bad["qweight"][len(bad["qweight"]) // 2] ^= 0xFF
    with pytest.raises(CodecError):
        decode(EncodedTensor(bad, enc.meta))
    with pytest.raises(CodecError, match="do not match"):
        decode(EncodedTensor({"scale": enc.parts["scale"]}, enc.meta))


@st.composite
def _weights(draw):
    n = draw(st.integers(1, 6))
    groups = draw(st.integers(1, 4))
    group_size = draw(st.sampled_from([4, 8]))
    k = groups * group_size
    bits = draw(st.sampled_from([3, 4, 8]))
    sparsity = draw(st.sampled_from(["none", "2:4", "unstructured"]))
    seed = draw(st.integers(0, 2**31 - 1))
    density = draw(st.floats(0.0, 1.0))
    quantized = draw(st.booleans())
    return n, k, group_size, bits, sparsity, seed, density, quantized


@settings(max_examples=150, deadline=None)
@given(_weights())
def test_round_trip_is_bit_exact(case) -> None:
    n, k, group_size, bits, sparsity, seed, density, quantized = case
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) > density] = 0.0
    if sparsity == "2:4":  # keep the 2 largest of every 4
        groups = w.reshape(n, k // 4, 4)
        drop = groups.abs().argsort(dim=-1)[..., :2]
        w = groups.scatter(2, drop, 0.0).reshape(n, k)
    if quantized:
        lo, hi = qrange(bits)
        q = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int8) * (w != 0)
        scale = torch.rand(n, k // group_size, generator=g)
        value = QuantizedWeight(q.to(torch.int8), scale, bits, group_size)
        out = decode(encode(value, sparsity))
        assert isinstance(out, QuantizedWeight)
        assert torch.equal(out.q, value.q) and out.bits == bits and out.group_size == group_size
        assert torch.equal(out.scale.view(torch.int32), value.scale.view(torch.int32))
    else:
        if sparsity == "none":
            sparsity = "unstructured"
        w[0, 0] = -0.0 if w[0, 0] == 0 and sparsity == "unstructured" else w[0, 0]
        for dtype in (torch.float32, torch.bfloat16):
            value = w.to(dtype)
            out = decode(encode(value, sparsity))
            assert out.dtype == dtype
            assert torch.equal(out.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                               value.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))

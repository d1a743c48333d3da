"""The quantized-weight layout (llmc/quant_layout.py): byte order, round trips, the torch twin
that the llmc ops trace against the numpy definition, and its import without torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from llmc import quant_layout as L
from llmc.compiler import ops
from llmc.compiler import quantize as Q


def test_the_even_channel_is_the_low_nibble():
    codes = np.array([[1, 2, 3, 15, 0, 7]], np.uint8)
    packed = L.pack(codes, 4)
    assert packed.tolist() == [[0x21, 0xF3, 0x70]] and packed.dtype == np.uint8
    assert np.array_equal(L.unpack(packed, 4), codes)
    assert np.array_equal(L.pack(codes, 8), codes) and L.unpack(codes, 8) is codes
    assert L.pack_nibbles(np.array([[1, 2, 3]])).tolist() == [[0x21, 0x03]]  # odd: zero-padded
    assert L.packed_width(64, 4) == 32 and L.unpacked_width(32, 4) == 64


def test_widths_and_bit_counts_the_layout_cannot_store_are_refused():
    with pytest.raises(ValueError, match="whole bytes"):
        L.pack(np.zeros((2, 5), np.uint8), 4)
    with pytest.raises(ValueError, match="3-bit"):
        L.pack(np.zeros((2, 8), np.uint8), 3)
    with pytest.raises(ValueError, match="2-bit"):
        L.unpack(np.zeros((2, 8), np.uint8), 2)


@pytest.mark.parametrize(("bits", "sym"), [(4, False), (4, True), (8, True), (8, False)])
def test_torch_twin_matches_the_numpy_layout(bits, sym):
    w = torch.randn(12, 96, generator=torch.Generator().manual_seed(bits))
    q = Q.rtn(w, bits, 32, sym)
    packed = q.packed()
    assert torch.equal(L.unpack(packed, bits), q.codes)  # the torch expression of unpack
    assert np.array_equal(L.unpack(packed.numpy(), bits), q.codes.numpy())
    zeros = None if sym else q.zeros
    traced = ops._dequantize_packed(packed, q.scales, zeros, bits, 32)  # what the ops trace
    z = None if zeros is None else zeros.numpy()
    reference = L.dequantize(packed.numpy(), q.scales.numpy(), z, bits, 32)
    assert np.array_equal(traced.numpy(), reference)
    assert np.array_equal(q.dequantize().numpy(), L.dequantize_codes(*_np(q), 32))


def test_fractional_zero_points_dequantize_the_same_in_both():
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (4, 64), generator=g, dtype=torch.uint8)
    scales, zeros = torch.rand(4, 2, generator=g), torch.rand(4, 2, generator=g) * 15
    packed = torch.from_numpy(L.pack(codes.numpy(), 4))
    traced = ops._dequantize_packed(packed, scales, zeros, 4, 32)
    ours = L.dequantize(packed.numpy(), scales.numpy(), zeros.numpy(), 4, 32)
    assert np.array_equal(traced.numpy(), ours)


def test_layout_and_target_base_import_without_torch():
    code = (
        "import sys\n"
        "import llmc.quant_layout, llmc.targets.base, llmc.targets.onnx.rescore\n"
        "bad = [m for m in ('torch', 'onnx', 'openvino') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def _np(q: Q.Quantized):
    return q.codes.numpy(), q.scales.numpy(), q.zeros.numpy()

"""The llmc quantized-weight layout: packing, unpacking and dequantizing codes (numpy, no torch).

One definition for every stage. The compiler packs the codes the quantize_weights pass makes and
its llmc ops dequantize them; the ONNX target re-blocks them for onnxruntime and its session's
lm_head rescorer reads them back at run time; the OpenVINO lowering unpacks them into u4/u8
constants. The module sits in the torch-free package root beside the other contracts every stage
shares (artifact, config, errors), not in `llmc.compiler`, which is torch, nor in `llmc.runtime`,
which is the generation layer above the sessions.

A weight W [N, K] quantized with `bits` and `group`:
- codes: unsigned integers in [0, 2^bits), packed as [N, K*bits/8] uint8; 8-bit: one per byte;
  4-bit: two per byte, the even channel in the low nibble (onnxruntime's and OpenVINO's u4 order);
- scales and zeros: [N, K/group] float, W = (code - zero) * scale over each group of `group`
  consecutive input channels; no zeros: the symmetric grid's fixed zero 2^(bits-1).

`unpack_nibbles` and `unpack` also take torch tensors: the llmc ops' reference implementation
(compiler/ops.py) unpacks inside the traced graph, so the same function is expressed for both.
"""

from __future__ import annotations

import numpy as np

BITS = (4, 8)  # code widths the layout stores
NIBBLE = 4  # bits per nibble: a 4-bit code's high half of the byte starts here
LOW_NIBBLE = 0x0F  # mask of the low nibble, which holds the even channel


def check_bits(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"{bits}-bit codes are not supported (choose one of {BITS})")
    return bits


def packed_width(k: int, bits: int) -> int:
    """Bytes per row of `k` codes of `bits` bits."""
    if k * check_bits(bits) % 8:
        raise ValueError(f"{k} codes of {bits} bits do not fill whole bytes")
    return k * bits // 8


def unpacked_width(width: int, bits: int) -> int:
    """Codes per row of `width` packed bytes (K of a weight from its packed codes)."""
    return width * 8 // check_bits(bits)


def symmetric_zero(bits: int) -> int:
    """The zero point of a symmetric grid (zeros omitted): 2^(bits-1)."""
    return 2 ** (bits - 1)


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """[..., m] values < 16 -> [..., ceil(m/2)] uint8, the even entry in the low nibble (an odd
    count gets a zero high nibble in its last byte)."""
    values = np.asarray(values, np.uint8)
    if values.shape[-1] % 2:
        pad = np.zeros((*values.shape[:-1], 1), np.uint8)
        values = np.concatenate([values, pad], -1)
    return values[..., 0::2] | (values[..., 1::2] << NIBBLE)


def unpack_nibbles(packed):
    """[..., m] bytes -> [..., 2m] values, the low nibble first: a numpy array, or a torch tensor
    (as traced by the llmc ops' reference, with the same two ops it has always had)."""
    low, high = packed & LOW_NIBBLE, packed >> NIBBLE
    if isinstance(packed, np.ndarray):
        return np.stack((low, high), -1).reshape(*packed.shape[:-1], -1)
    import torch  # a tensor was given, so torch is already loaded

    return torch.stack((low, high), dim=-1).flatten(-2)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [N, K] in [0, 2^bits) -> packed [N, K*bits/8] uint8."""
    codes = np.asarray(codes)
    packed_width(codes.shape[-1], bits)
    packed = codes.astype(np.uint8) if bits == 8 else pack_nibbles(codes)
    return np.ascontiguousarray(packed)


def unpack(packed, bits: int):
    """Packed [N, K*bits/8] -> codes [N, K] (uint8; numpy array or torch tensor, as given)."""
    return packed if check_bits(bits) == 8 else unpack_nibbles(packed)


def dequantize_codes(
    codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | float, group: int
) -> np.ndarray:
    """Codes [N, K], scales and zeros [N, K/group] (or one zero) -> W [N, K] in scales' dtype."""
    n, k = codes.shape
    q = codes.astype(scales.dtype).reshape(n, k // group, group)
    zero = zeros[..., None] if isinstance(zeros, np.ndarray) else zeros
    return ((q - zero) * scales[..., None]).reshape(n, k)


def dequantize(
    packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, bits: int, group: int
) -> np.ndarray:
    """Packed codes [N, K*bits/8], scales and zeros [N, K/group] -> W [N, K] = (q - zero) *
    scale; no zeros: the symmetric 2^(bits-1)."""
    zero = float(symmetric_zero(bits)) if zeros is None else zeros
    return dequantize_codes(unpack(packed, bits), scales, zero, group)

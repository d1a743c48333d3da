"""llmc ops in the ATen forms OpenVINO's converter and CPU plugin fuse.

`llmc::attention` (concat KV mode) becomes concat + the transformers-style GQA broadcast
(unsqueeze, expand, reshape) + `aten.scaled_dot_product_attention` with an additive mask: the
pattern the CPU plugin turns into one stateful SDPA node once the cache is made stateful
(DESIGN.md, "OpenVINO"). Its causal mask is aligned bottom-right (a query at cache index p sees
keys 0..p) and is additive, never boolean, so a padding query that sees no key gets a uniform row
instead of NaN. The other llmc ops use their reference forms (compiler/ops.py).

Why attention keeps a second form beside `attention_ref`: the reference is explicit
(repeat_interleave, matmul, masked softmax, matmul) because it must also express what SDPA
cannot, a logit soft-cap between the two matmuls and a shared cache written at per-row
positions, and because it is the graph every other target decomposes to; an SDPA reference
would change those graphs. Both forms take their q/k/v split and head layouts from the same
helpers (`split_qkv`, `to_heads`, `from_heads` in compiler/ops.py), and the SDPA form hands
every case it cannot express to the reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def attention_sdpa(
    q: Tensor,
    k: Tensor | None,
    v: Tensor | None,
    past_k: Tensor,
    past_v: Tensor,
    seq_info: Tensor,
    total: Tensor | None,
    scale: float,
    window: int,
    softcap: float,
    cos: Tensor | None,
    sin: Tensor | None,
    shared: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from llmc.compiler.ops import attention_ref, from_heads, split_qkv, to_heads

    if shared or softcap > 0 or cos is not None:
        # No SDPA form: a logit soft-cap sits between the two matmuls; the other two are ONNX
        # layouts this target's pipeline never produces.
        return attention_ref(
            q, k, v, past_k, past_v, seq_info, total, scale, window, softcap, cos, sin, shared
        )
    b, s, _ = q.shape
    kv_heads, d = past_k.shape[1], past_k.shape[3]
    q, k, v = split_qkv(q, k, v, kv_heads, d)
    heads = q.shape[-1] // d
    present_k = torch.cat((past_k, to_heads(k, kv_heads, d)), dim=2)
    present_v = torch.cat((past_v, to_heads(v, kv_heads, d)), dim=2)
    t = present_k.shape[2]

    def expand(x: Tensor) -> Tensor:  # [B, KVH, T, D] -> [B, H, T, D]
        x = x.unsqueeze(2).expand(b, kv_heads, heads // kv_heads, t, d)
        return x.reshape(b, heads, t, d)

    queries = torch.arange(s, device=q.device) + (t - s)
    keys = torch.arange(t, device=q.device)
    allowed = keys[None, :] <= queries[:, None]  # [S, T]
    if window > 0:
        allowed = allowed & (keys[None, :] > queries[:, None] - window)
    allowed = allowed[None, None] & seq_info[:, None, None, :].bool()  # [B, 1, S, T]
    zero = torch.zeros((), dtype=q.dtype)
    mask = torch.where(allowed, zero, torch.finfo(q.dtype).min)
    qh = to_heads(q, heads, d)
    out = F.scaled_dot_product_attention(
        qh, expand(present_k), expand(present_v), attn_mask=mask, scale=scale
    )
    return from_heads(out), present_k, present_v


def decompositions() -> dict:
    """The decomposition table: attention as SDPA, the other llmc ops as their references, but
    the quantized ones, which conversion_extensions() lowers to compressed constants."""
    from llmc.compiler import ops

    table = {**ops.OPS, torch.ops.llmc.attention.default: attention_sdpa}
    return {
        op: fn for op, fn in table.items() if op.name().split("::")[1].split(".")[0] not in KEEP
    }


# -- quantized weights: compressed constants the CPU plugin multiplies without unpacking ---------


def _constant(context, index: int):
    """The numpy value of input `index`, which must be a constant (a weight), or None."""
    node = context.get_input(index).get_node()
    if node.get_type_name() != "Constant":
        return None
    return node.get_data()


def _dequantized(context, first: int):
    """W [N, K] f32 from the inputs (qweight, scales, zeros, bits, group) at `first`, as the
    decompression subgraph the plugin fuses into its matmul or gather: a u4/u8 constant (i4/i8
    when symmetric), Convert, Subtract of the zero points, Multiply by the scales, Reshape."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as opset

    from llmc import quant_layout

    packed, scales = _constant(context, first), _constant(context, first + 1)
    zeros = _constant(context, first + 2) if context.get_input_size() > first + 2 else None
    bits = int(context.get_values_from_const_input(first + 3, None, None))
    group = int(context.get_values_from_const_input(first + 4, None, None))
    if packed is None or scales is None:
        raise ValueError("quantized weights must be constants for the OpenVINO lowering")
    codes = quant_layout.unpack(packed, bits)
    n, k = codes.shape
    shape = [n, k // group, group]
    if zeros is None:  # symmetric: signed codes, no subtraction
        signed = codes.astype(np.int16) - quant_layout.symmetric_zero(bits)
        q = opset.constant(
            signed.reshape(shape).astype(np.int8), ov.Type.i4 if bits == 4 else ov.Type.i8
        )
        w = opset.convert(q, ov.Type.f32)
    else:
        kind = ov.Type.u4 if bits == 4 else ov.Type.u8
        q = opset.constant(codes.reshape(shape), kind)
        w = opset.convert(q, ov.Type.f32)
        z = zeros.reshape(n, -1, 1)
        if np.array_equal(z, np.round(z)):
            zp = opset.convert(opset.constant(z.astype(np.uint8), kind), ov.Type.f32)
        else:  # a grid kept exactly (GGUF Q4_1): fractional zero points stay f32
            zp = opset.constant(z.astype(np.float32), ov.Type.f32)
        w = opset.subtract(w, zp)
    w = opset.multiply(w, opset.constant(scales.reshape(n, -1, 1).astype(np.float32)))
    return opset.reshape(w, opset.constant(np.array([n, k], np.int64)), False)


def _linear_nbits(context):
    import openvino.opset13 as opset

    w = _dequantized(context, 1)
    out = opset.matmul(context.get_input(0), w, False, True)
    if context.get_input_size() > 6 and _constant(context, 6) is not None:
        out = opset.add(out, context.get_input(6))
    return [out.output(0)]


def _embedding_nbits(context):
    import openvino as ov
    import openvino.opset13 as opset

    table = _dequantized(context, 1)
    ids = opset.convert(context.get_input(0), ov.Type.i64)
    return [opset.gather(table, ids, opset.constant(0, ov.Type.i64)).output(0)]


def conversion_extensions() -> list:
    """convert_model extensions for the llmc ops the graph keeps (the quantized ones)."""
    from openvino.frontend.pytorch import ConversionExtension

    return [
        ConversionExtension("llmc.linear_nbits.default", _linear_nbits),
        ConversionExtension("llmc.embedding_nbits.default", _embedding_nbits),
    ]


KEEP = ("linear_nbits", "embedding_nbits")  # lowered by conversion_extensions, not decomposed

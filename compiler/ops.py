"""llmc ops: the contract between passes and targets (DESIGN.md, "llmc ops").

Each op is a `torch.library` custom op with a reference implementation, written in the plain ATen
form the back ends already know how to fuse, and a fake kernel for tracing. Because every op runs
in PyTorch, the graph after any pass still executes and is checked numerically against the graph
before it. A target lowers an op to its own fused kernel or decomposes it with `REFERENCE`.

Layouts: activations are packed `[batch, seq, heads * head_dim]` (what fused attention kernels take,
so no transposes are left around them); KV tensors are `[batch, kv_heads, positions, head_dim]`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmc import quant_layout
from llmc.compiler.quantize import dequantize
from llmc.compiler.ssm_ops import DECOMPOSITIONS

# -- references ----------------------------------------------------------------------------------


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x * rsqrt(mean(x², -1) + eps) * weight, computed in fp32 (Gemma's 1+w is folded into w)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def skip_rms_norm_ref(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """(rms_norm(residual + x), residual + x): the residual add and the norm after it."""
    total = residual + x
    return rms_norm_ref(total, weight, eps), total


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """x [..., D]; cos/sin [..., D/2] broadcastable to x's leading dims."""
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    cos2, sin2 = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos2 + rotated * sin2


def rotary_ref(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool) -> Tensor:
    """RoPE on packed x [B, S, H*D] at positions [B, S]; cos/sin tables [max_context, D/2]."""
    d = cos.shape[-1] * 2
    heads = x.unflatten(-1, (-1, d))  # [B, S, H, D]
    c, s = cos[positions].unsqueeze(2), sin[positions].unsqueeze(2)  # [B, S, 1, D/2]
    return _rotate(heads, c, s, interleaved).flatten(-2)


def split_qkv(
    q: Tensor, k: Tensor | None, v: Tensor | None, kv_heads: int, d: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(q, k, v) as given, or split from q packed as [q | k | v] along the last dim."""
    if k is None or v is None:
        q, k, v = q.split([q.shape[-1] - 2 * kv_heads * d, kv_heads * d, kv_heads * d], dim=-1)
    return q, k, v


def to_heads(x: Tensor, heads: int, d: int) -> Tensor:
    """Packed [B, S, heads * D] -> [B, heads, S, D]."""
    return x.unflatten(-1, (heads, d)).transpose(1, 2)


def from_heads(x: Tensor) -> Tensor:
    """[B, H, S, D] -> packed [B, S, H * D]."""
    return x.transpose(1, 2).flatten(2)


def _query_positions(seq_info: Tensor, s: int, past: int, shared: bool) -> Tensor:
    """Cache index of every new token, [B, S]."""
    steps = torch.arange(s, device=seq_info.device)
    if shared:  # seq_info: seqlens_k [B] int32, total length - 1 per row
        return (seq_info.to(torch.int64) + 1 - s).unsqueeze(1) + steps
    return (steps + past).unsqueeze(0).expand(seq_info.shape[0], s)


def attention_ref(
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
    """Causal grouped-query attention with its KV-cache update.

    q, k, v: [B, S, heads * D]; or q packed as [q | k | v] with k and v None.

    concat mode: seq_info is the attention mask [B, past+S]; present = past ++ new.
    shared mode: past is a buffer [B, KVH, capacity, D]; seq_info is seqlens_k [B] (int32, total
    length - 1 per row); the new keys/values are written at their positions; present is the
    buffer. `total` (int32 scalar, max total length) is only used by lowerings. `cos`/`sin` fuse
    RoPE (shared mode only: positions are cache indices). window 0: none; softcap 0: none.
    OpenVINO decomposes the concat case to SDPA instead (targets/openvino/lowering.py, which says
    why), through the same split_qkv / to_heads / from_heads.
    """
    b, s, _ = q.shape
    kv_heads, d = past_k.shape[1], past_k.shape[3]
    q, k, v = split_qkv(q, k, v, kv_heads, d)
    positions = _query_positions(seq_info, s, past_k.shape[2], shared)
    if cos is not None and sin is not None:
        q = rotary_ref(q, cos, sin, positions, False)
        k = rotary_ref(k, cos, sin, positions, False)
    k_new = to_heads(k, kv_heads, d)  # [B, KVH, S, D]
    v_new = to_heads(v, kv_heads, d)
    if shared:
        index = positions[:, None, :, None].expand(b, kv_heads, s, d)
        present_k = past_k.scatter(2, index, k_new)
        present_v = past_v.scatter(2, index, v_new)
    else:
        present_k = torch.cat((past_k, k_new), dim=2)
        present_v = torch.cat((past_v, v_new), dim=2)
    heads = q.shape[-1] // d
    qh = to_heads(q, heads, d)  # [B, H, S, D]
    keys = present_k.repeat_interleave(heads // kv_heads, dim=1)
    values = present_v.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.matmul(qh, keys.transpose(2, 3)) * scale  # [B, H, S, T]
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    key_pos = torch.arange(present_k.shape[2], device=q.device)
    allowed = key_pos[None, None, :] <= positions[:, :, None]  # [B, S, T]
    if window > 0:
        allowed = allowed & (key_pos[None, None, :] > positions[:, :, None] - window)
    if not shared:
        allowed = allowed & seq_info[:, None, :].bool()
    scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = from_heads(torch.matmul(probs, values))  # [B, S, H*D]
    return out, present_k, present_v


def _dequantize_packed(
    qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group: int
) -> Tensor:
    """`llmc.quant_layout.dequantize` on tensors, in the traced graph: packed codes
    [N, K*bits/8], scales and zeros [N, K/group] -> W [N, K] = (q - zero) * scale."""
    codes = quant_layout.unpack(qweight, bits)
    zero = zeros if zeros is not None else float(quant_layout.symmetric_zero(bits))
    return dequantize(codes, scales, zero, group)


def linear_nbits_ref(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    bits: int,
    group: int,
    bias: Tensor | None,
) -> Tensor:
    """Weight-only quantized linear: x @ dequantize(qweight)ᵀ + bias."""
    weight = _dequantize_packed(qweight, scales, zeros, bits, group).to(x.dtype)
    return torch.nn.functional.linear(x, weight, bias)


def embedding_nbits_ref(
    ids: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group: int
) -> Tensor:
    """Rows `ids` of a quantized embedding table (the same layout as linear_nbits)."""
    table = _dequantize_packed(qweight, scales, zeros, bits, group)
    return torch.nn.functional.embedding(ids, table)


# -- registration: the references are the ops' implementations ----------------------------------

rms_norm = torch.library.custom_op("llmc::rms_norm", mutates_args=())(rms_norm_ref)
skip_rms_norm = torch.library.custom_op("llmc::skip_rms_norm", mutates_args=())(skip_rms_norm_ref)
rotary = torch.library.custom_op("llmc::rotary", mutates_args=())(rotary_ref)
attention = torch.library.custom_op("llmc::attention", mutates_args=())(attention_ref)
linear_nbits = torch.library.custom_op("llmc::linear_nbits", mutates_args=())(linear_nbits_ref)
embedding_nbits = torch.library.custom_op("llmc::embedding_nbits", mutates_args=())(
    embedding_nbits_ref
)


@linear_nbits.register_fake
def _(x, qweight, scales, zeros, bits, group, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@embedding_nbits.register_fake
def _(ids, qweight, scales, zeros, bits, group):
    return scales.new_empty((*ids.shape, quant_layout.unpacked_width(qweight.shape[1], bits)))


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@skip_rms_norm.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@rotary.register_fake
def _(x, cos, sin, positions, interleaved):
    return torch.empty_like(x)


@attention.register_fake
def _(q, k, v, past_k, past_v, seq_info, total, scale, window, softcap, cos, sin, shared):
    b, kv_heads, past, d = past_k.shape
    out = torch.empty_like(q) if k is not None else q[..., : q.shape[-1] - 2 * kv_heads * d]
    out = torch.empty_like(out)
    if shared:
        return out, torch.empty_like(past_k), torch.empty_like(past_v)
    shape = (b, kv_heads, past + q.shape[1], d)
    return out, past_k.new_empty(shape), past_v.new_empty(shape)


OPS = {
    torch.ops.llmc.rms_norm.default: rms_norm_ref,
    torch.ops.llmc.skip_rms_norm.default: skip_rms_norm_ref,
    torch.ops.llmc.rotary.default: rotary_ref,
    torch.ops.llmc.attention.default: attention_ref,
    torch.ops.llmc.linear_nbits.default: linear_nbits_ref,
    torch.ops.llmc.embedding_nbits.default: embedding_nbits_ref,
    **DECOMPOSITIONS,  # state-space models' ops (compiler/ssm_ops.py)
}


def decompose(
    program: torch.export.ExportedProgram, keep: set | None = None
) -> torch.export.ExportedProgram:
    """Replace every llmc op (but those in `keep`) by its reference ATen graph, leaving every
    other op as it is."""
    used = {n.target for n in program.graph.nodes if n.op == "call_function"}
    table = {op: fn for op, fn in OPS.items() if op in used and op not in (keep or set())}
    return program.run_decompositions(table) if table else program

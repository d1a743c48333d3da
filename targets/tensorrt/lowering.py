"""llmc ops as standard ONNX (opset 23), the forms TensorRT's ONNX parser maps to its own layers.

- `rms_norm` -> `RMSNormalization`; `skip_rms_norm` -> `Add` + `RMSNormalization`;
- `rotary` -> `RotaryEmbedding` on the packed [B, S, H*D] activations (position ids given);
- `attention` (concat KV mode) -> `Attention` with the cache as `past_key`/`past_value` in and
  `present_key`/`present_value` out, grouped-query heads from `q_num_heads`/`kv_num_heads`, a
  soft-cap as `softcap`, and an additive float mask [B, 1, S, T] built from the attention mask:
  causal aligned bottom-right (a query at cache index p sees keys 0..p; ONNX's `is_causal` aligns
  top-left), a sliding window where the model has one, padded keys masked. Additive, never
  boolean: a padding query that sees no key gets a uniform row, not NaN in its values;
- `linear_nbits` / `embedding_nbits` -> placeholder nodes of the `llmc.trt` domain that
  `quantized.py` rewrites after export into block-wise `DequantizeLinear` + `MatMul` / `Gather`
  (the exporter cannot emit an initializer in another layout than the graph's).
"""

from __future__ import annotations

import functools

PLACEHOLDER_DOMAIN = "llmc.trt"
OPSET = 23


@functools.cache
def register_schemas() -> None:
    """The placeholder ops' schemas (the exporter emits only ops `onnx.defs` knows)."""
    import onnx
    from onnx.defs import OpSchema

    def param(name, type_str, optional=False):
        option = OpSchema.FormalParameterOption.Optional if optional else None
        option = option or OpSchema.FormalParameterOption.Single
        return OpSchema.FormalParameter(name, type_str, "", param_option=option)

    INT = OpSchema.AttrType.INT
    float_types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    constraints = [
        ("T", float_types, ""),
        ("Q", ["tensor(uint8)"], ""),
        ("I", ["tensor(int64)", "tensor(int32)"], ""),
    ]
    attrs = [OpSchema.Attribute(n, INT, "", required=False) for n in ("bits", "group")]
    schemas = [
        OpSchema(
            "LinearNBits",
            PLACEHOLDER_DOMAIN,
            1,
            inputs=[
                param("x", "T"),
                param("qweight", "Q"),
                param("scales", "T"),
                param("bias", "T", optional=True),
            ],  # fmt: skip
            outputs=[param("y", "T")],
            type_constraints=constraints,
            attributes=attrs,
        ),
        OpSchema(
            "EmbeddingNBits",
            PLACEHOLDER_DOMAIN,
            1,
            inputs=[param("ids", "I"), param("qweight", "Q"), param("scales", "T")],
            outputs=[param("y", "T")],
            type_constraints=constraints,
            attributes=attrs,
        ),
    ]
    for schema in schemas:
        try:
            onnx.defs.get_schema(schema.name, 1, PLACEHOLDER_DOMAIN)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(schema)


def _symmetric(zeros) -> None:
    from llmc.errors import TargetError

    if zeros is not None:
        raise TargetError(
            "TensorRT dequantizes weights with zero points of 0 only: quantize symmetrically "
            "(the tensorrt pipeline does; a graph with zero points cannot be emitted)."
        )


def translation_table() -> dict:
    """llmc op -> onnxscript function, for `torch.onnx.export(custom_translation_table=...)`."""
    import torch
    from onnxscript import opset23 as op
    from onnxscript.values import Opset

    register_schemas()
    trt = Opset(PLACEHOLDER_DOMAIN, 1)

    def rms_norm(x, weight, eps: float):
        return op.RMSNormalization(x, weight, axis=-1, epsilon=eps, stash_type=1)

    def skip_rms_norm(x, residual, weight, eps: float):
        total = op.Add(residual, x)
        return op.RMSNormalization(total, weight, axis=-1, epsilon=eps, stash_type=1), total

    def rotary(x, cos, sin, positions, interleaved: bool):
        heads = x.shape[-1] // (2 * cos.shape[-1])
        return op.RotaryEmbedding(
            x, cos, sin, positions, interleaved=int(interleaved), num_heads=heads
        )

    def scalar(shape_slice):
        return op.Squeeze(shape_slice, op.Constant(value_ints=[0]))

    def columns(x, start: int, end: int):
        starts, ends = op.Constant(value_ints=[start]), op.Constant(value_ints=[end])
        return op.Slice(x, starts, ends, op.Constant(value_ints=[-1]))

    def attention(
        q, k, v, past_k, past_v, seq_info, total, scale: float, window: int, softcap: float,
        cos, sin, shared: bool,
    ):  # fmt: skip
        kv_heads, d = past_k.shape[1], past_k.shape[3]
        if k is None:  # packed [q | k | v]
            width, kv = q.shape[-1], kv_heads * d
            q, k, v = (columns(q, 0, width - 2 * kv), columns(q, width - 2 * kv, width - kv),
                       columns(q, width - kv, width))  # fmt: skip
        heads = q.shape[-1] // d
        past = scalar(op.Shape(past_k, start=2, end=3))
        new = scalar(op.Shape(q, start=1, end=2))
        t = op.Add(past, new)
        one = op.Constant(value_int=1)
        keys = op.Unsqueeze(op.Range(op.Constant(value_int=0), t, one), [0])  # [1, T]
        queries = op.Unsqueeze(op.Range(past, t, one), [1])  # [S, 1]
        allowed = op.LessOrEqual(keys, queries)  # [S, T]
        if window > 0:
            allowed = op.And(allowed, op.Greater(keys, op.Sub(queries, window)))
        padded = op.Unsqueeze(op.Cast(seq_info, to=9), [1, 2])  # [B, 1, 1, T] bool
        allowed = op.And(allowed, padded)  # [B, 1, S, T]
        lowest = op.Constant(value_float=float(torch.finfo(torch.float32).min))
        mask = op.Where(allowed, op.Constant(value_float=0.0), lowest)
        mask = op.CastLike(mask, q)
        outputs = op.Attention(
            q, k, v, mask, past_k, past_v,
            q_num_heads=heads, kv_num_heads=kv_heads, scale=scale, softcap=softcap, is_causal=0,
        )  # fmt: skip
        return outputs[0], outputs[1], outputs[2]

    def linear_nbits(x, qweight, scales, zeros, bits: int, group: int, bias):
        _symmetric(zeros)
        return trt.LinearNBits(x, qweight, scales, bias, bits=bits, group=group)

    def embedding_nbits(ids, qweight, scales, zeros, bits: int, group: int):
        _symmetric(zeros)
        return trt.EmbeddingNBits(ids, qweight, scales, bits=bits, group=group)

    return {
        torch.ops.llmc.rms_norm.default: rms_norm,
        torch.ops.llmc.skip_rms_norm.default: skip_rms_norm,
        torch.ops.llmc.rotary.default: rotary,
        torch.ops.llmc.attention.default: attention,
        torch.ops.llmc.linear_nbits.default: linear_nbits,
        torch.ops.llmc.embedding_nbits.default: embedding_nbits,
    }

"""Lowering of llmc ops to onnxruntime's fused CPU kernels.

onnxruntime implements these contrib ops, but the ONNX exporter only emits an op whose schema
`onnx.defs` knows, so the schemas are registered here first (inputs, attributes and type
constraints as onnxruntime declares them; only what llmc uses).
"""

from __future__ import annotations

import functools

from llmc import quant_layout

MS_DOMAIN = "com.microsoft"
# MatMulNBits' activation precision: 4 quantizes each row of A to int8 per block and runs integer
# dot products (the fast decode path on CPU; 0 dequantizes B to fp32 instead).
ACCURACY_LEVEL = 4


def _schema(name, domain, inputs, outputs, attributes, floats=True):
    import onnx
    from onnx.defs import OpSchema

    float_types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    constraints = [("T", float_types, "float tensors")] if floats else []
    if any(p[2] == "M" for p in inputs):
        constraints.append(("M", ["tensor(int32)"], "int32 tensors"))
    if any(p[2] == "I" for p in inputs):
        constraints.append(("I", ["tensor(int64)"], "int64 tensors"))
    if any(p[2] == "Q" for p in inputs):
        constraints.append(("Q", ["tensor(uint8)"], "packed quantized codes"))
    if any(p[2] == "Z" for p in inputs):
        # float while exporting; emit rewrites integer zero points to the uint8 kernels take
        constraints.append(("Z", ["tensor(uint8)", "tensor(float)"], "zero points"))

    def param(name, type_str, optional):
        option = (
            OpSchema.FormalParameterOption.Optional
            if optional
            else OpSchema.FormalParameterOption.Single
        )
        return OpSchema.FormalParameter(name, type_str, "", param_option=option)

    attrs = [OpSchema.Attribute(n, t, "", required=False) for n, t in attributes]
    schema = OpSchema(
        name,
        domain,
        1,
        inputs=[param(n, t, opt) for n, opt, t in inputs],
        outputs=[param(n, t, opt) for n, opt, t in outputs],
        type_constraints=constraints,
        attributes=attrs,
    )
    try:
        onnx.defs.get_schema(name, 1, domain)
    except onnx.defs.SchemaError:
        onnx.defs.register_schema(schema)


@functools.cache
def register_schemas() -> None:
    from onnx.defs import OpSchema

    INT, FLOAT = OpSchema.AttrType.INT, OpSchema.AttrType.FLOAT
    _schema(
        "SimplifiedLayerNormalization",
        "",
        [("X", False, "T"), ("scale", False, "T")],
        [("Y", False, "T")],  # inv_std_var (optional) is never used
        [("axis", INT), ("epsilon", FLOAT), ("stash_type", INT)],
    )
    _schema(
        "SkipSimplifiedLayerNormalization",
        MS_DOMAIN,
        [("input", False, "T"), ("skip", False, "T"), ("gamma", False, "T"), ("bias", True, "T")],
        [
            ("output", False, "T"),
            ("mean", True, "T"),
            ("inv_std_var", True, "T"),
            ("input_skip_bias_sum", True, "T"),
        ],
        [("epsilon", FLOAT)],
    )
    _schema(
        "RotaryEmbedding",
        MS_DOMAIN,
        [
            ("input", False, "T"),
            ("position_ids", False, "I"),
            ("cos_cache", False, "T"),
            ("sin_cache", False, "T"),
        ],
        [("output", False, "T")],
        [
            ("interleaved", INT),
            ("num_heads", INT),
            ("rotary_embedding_dim", INT),
            ("scale", FLOAT),
            ("is_packed_batching", INT),
        ],
    )
    _schema(
        "GroupQueryAttention",
        MS_DOMAIN,
        [
            ("query", False, "T"),
            ("key", True, "T"),
            ("value", True, "T"),
            ("past_key", True, "T"),
            ("past_value", True, "T"),
            ("seqlens_k", False, "M"),
            ("total_sequence_length", False, "M"),
            ("cos_cache", True, "T"),
            ("sin_cache", True, "T"),
        ],
        [("output", False, "T"), ("present_key", False, "T"), ("present_value", False, "T")],
        [
            ("num_heads", INT),
            ("kv_num_heads", INT),
            ("scale", FLOAT),
            ("softcap", FLOAT),
            ("local_window_size", INT),
            ("do_rotary", INT),
            ("rotary_interleaved", INT),
        ],
    )
    _schema(
        "MatMulNBits",
        MS_DOMAIN,
        [
            ("A", False, "T"),
            ("B", False, "Q"),
            ("scales", False, "T"),
            ("zero_points", True, "Z"),
            ("g_idx", True, "M"),
            ("bias", True, "T"),
        ],
        [("Y", False, "T")],
        [("K", INT), ("N", INT), ("bits", INT), ("block_size", INT), ("accuracy_level", INT)],
    )
    _schema(
        "GatherBlockQuantized",
        MS_DOMAIN,
        [
            ("data", False, "Q"),
            ("indices", False, "I"),
            ("scales", False, "T"),
            ("zero_points", True, "Z"),
        ],
        [("output", False, "T")],
        [("gather_axis", INT), ("quantize_axis", INT), ("block_size", INT), ("bits", INT)],
    )


def translation_table(shared_kv: bool) -> dict:
    """llmc op -> onnxscript function, for `torch.onnx.export(custom_translation_table=...)`."""
    import torch
    from onnxscript.values import Opset

    register_schemas()
    ms = Opset(MS_DOMAIN, 1)
    default = Opset("", 1)

    def rms_norm(x, weight, eps: float):
        return default.SimplifiedLayerNormalization(x, weight, axis=-1, epsilon=eps, stash_type=1)

    def skip_rms_norm(x, residual, weight, eps: float):
        y, _, _, total = ms.SkipSimplifiedLayerNormalization(x, residual, weight, epsilon=eps)
        return y, total

    def rotary(x, cos, sin, positions, interleaved: bool):
        return ms.RotaryEmbedding(x, positions, cos, sin, interleaved=int(interleaved))

    def attention(
        q,
        k,
        v,
        past_k,
        past_v,
        seq_info,
        total,
        scale: float,
        window: int,
        softcap: float,
        cos,
        sin,
        shared: bool,
    ):
        kv_heads, head_dim = past_k.shape[1], past_k.shape[3]
        heads_dim = q.shape[-1] - (0 if k is not None else 2 * kv_heads * head_dim)
        rotary = cos is not None
        return ms.GroupQueryAttention(
            q,
            k,
            v,
            past_k,
            past_v,
            seq_info,
            total,
            *((cos, sin) if rotary else ()),
            num_heads=heads_dim // head_dim,
            kv_num_heads=kv_heads,
            scale=scale,
            softcap=softcap,
            local_window_size=window if window > 0 else -1,
            do_rotary=int(rotary),
            rotary_interleaved=0,
        )

    def linear_nbits(x, qweight, scales, zeros, bits: int, group: int, bias):
        n, k = qweight.shape[0], quant_layout.unpacked_width(qweight.shape[1], bits)
        return ms.MatMulNBits(
            x,
            qweight,
            scales,
            zeros,
            None,
            bias,
            K=k,
            N=n,
            bits=bits,
            block_size=group,
            accuracy_level=ACCURACY_LEVEL,
        )

    def embedding_nbits(ids, qweight, scales, zeros, bits: int, group: int):
        return ms.GatherBlockQuantized(
            qweight, ids, scales, zeros, gather_axis=0, quantize_axis=1, block_size=group, bits=bits
        )

    table = {
        torch.ops.llmc.linear_nbits.default: linear_nbits,
        torch.ops.llmc.embedding_nbits.default: embedding_nbits,
        torch.ops.llmc.rms_norm.default: rms_norm,
        torch.ops.llmc.skip_rms_norm.default: skip_rms_norm,
        torch.ops.llmc.rotary.default: rotary,
    }
    if shared_kv:
        table[torch.ops.llmc.attention.default] = attention
    return table

"""The TensorRT target's pass pipeline.

The KV cache stays in the concat mode (explicit past inputs and present outputs, as TensorRT
takes them, bounded by the build spec's profiles); attention, RoPE and RMSNorm become llmc ops
that lower to ONNX's own `Attention`, `RotaryEmbedding` and `RMSNormalization`; weights are
quantized symmetrically, since TensorRT dequantizes with zero points of 0 only."""

from __future__ import annotations

import dataclasses


def pipeline(quant=None) -> list:
    """The passes, in order; `quant` (a QuantConfig) adds symmetric weight quantization."""
    from llmc.passes.eliminate_dead_code import EliminateDeadCode
    from llmc.passes.fold_layout import FoldLayout
    from llmc.passes.fuse_projections import FuseQkv
    from llmc.passes.fuse_rms_norm import FuseRmsNorm
    from llmc.passes.fuse_rotary import FuseRotary
    from llmc.passes.fuse_skip_rms_norm import FuseSkipRmsNorm
    from llmc.passes.prune_lm_head import PruneLmHead
    from llmc.passes.quantize_weights import QuantizeWeights
    from llmc.passes.remove_assertions import RemoveAssertions
    from llmc.passes.remove_noop_casts import RemoveNoopCasts
    from llmc.passes.replace_attention import ReplaceAttention

    if quant is not None:
        quant = dataclasses.replace(quant, sym=True)
    return [
        ReplaceAttention(),  # concat KV mode: no rewire_kv_cache
        RemoveAssertions(),
        RemoveNoopCasts(),
        FuseRmsNorm(),
        FuseSkipRmsNorm(),
        FuseRotary(),
        FuseQkv(),
        FoldLayout(),
        PruneLmHead(),
        *([QuantizeWeights(quant)] if quant else []),
        EliminateDeadCode(),
    ]

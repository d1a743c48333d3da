"""The AOTInductor target's pass pipeline: the TVM target's (shared KV buffers, RMSNorm and RoPE
as llmc ops, fused QKV and gate-up projections, logits only where read); Inductor then compiles
the llmc ops' reference ATen forms, fusing their elementwise chains into its own kernels."""

from __future__ import annotations


def pipeline(quant=None) -> list:
    from llmc.targets.tvm.pipeline import pipeline as shared_buffer_pipeline

    return shared_buffer_pipeline(quant)

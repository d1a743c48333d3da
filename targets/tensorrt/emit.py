"""Emit the standard-ONNX network TensorRT's parser takes, its build spec, and the engine where
TensorRT and a CUDA device exist (engine.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from llmc.contract import KVMode
from llmc.errors import TargetError
from llmc.targets.base import EmitResult

if TYPE_CHECKING:
    from llmc.compiler.graph import Graph

MODEL_FILE = "model.onnx"


def _decompose_sdpa(program):
    """A model that keeps its own attention (falcon) has ATen's SDPA, which the exporter maps to
    ONNX `Attention` only when query and key heads match (falcon is multi-query): decompose it
    into matmuls and a softmax instead."""
    import torch

    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    if not any(n.target is sdpa for n in program.graph.nodes):
        return program
    table = {k: v for k, v in torch.export.default_decompositions().items() if k is sdpa}
    return program.run_decompositions(table)


def emit(graph: Graph, out_dir: Path, options=None) -> EmitResult:
    import onnx

    from llmc.compiler import ops
    from llmc.targets.onnx.emit import export
    from llmc.targets.tensorrt import engine, parser_support, quantized
    from llmc.targets.tensorrt.lowering import OPSET, PLACEHOLDER_DOMAIN, translation_table

    if graph.kv_mode not in (KVMode.CONCAT, KVMode.RECURRENT):
        raise TargetError(
            "the tensorrt target takes the concat KV mode only (explicit past/present)."
        )
    out_dir = Path(out_dir)
    path = out_dir / MODEL_FILE
    table = translation_table()
    program = graph.program
    if graph.io.recurrent:  # a Mamba's convolution as multiply-adds: no 1D convolutions
        import torch

        from llmc.compiler.ssm_ops import causal_conv1d_taps

        program = program.run_decompositions(
            {torch.ops.llmc.causal_conv1d.default: causal_conv1d_taps}
        )
    program = _decompose_sdpa(ops.decompose(program, keep=set(table)))
    export(program, graph, table, path, OPSET)
    model = onnx.load(str(path), load_external_data=False)
    rewritten = 0
    if any(n.domain == PLACEHOLDER_DOMAIN for n in model.graph.node):
        model = onnx.load(str(path))  # quantized weights are small: rewrite them in memory
        rewritten = quantized.rewrite(model)
        for p in out_dir.glob(MODEL_FILE + "*"):
            p.unlink()
        # saving moves the weights out of `model`, which keeps only their references
        onnx.save(model, str(path), save_as_external_data=True, location=MODEL_FILE + ".data")
    onnx.checker.check_model(str(path), full_check=False)
    problems = parser_support.check(model)
    if problems:
        shown = "; ".join(problems[:5]) + (
            f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        )
        raise TargetError(f"the network has what TensorRT's parser does not take: {shown}.")
    unused = set(graph.input_names) - {i.name for i in model.graph.input}
    io = graph.io.without_inputs(unused)
    version = parser_support.ops_since(model)
    version = max(
        version, parser_support.TENSORRT_VERSION, key=lambda v: tuple(map(int, v.split(".")))
    )
    spec = engine.build_spec(io, [i.name for i in model.graph.input], "fp32", version)
    engine.write_spec(out_dir, spec)
    built, notes = None, []
    why_not = engine.available()
    if why_not is None:  # pragma: no cover - no TensorRT on this project's machines
        built = engine.build_engine(out_dir, spec)
    else:
        needs = engine.NEEDS.format(version=version, spec=engine.SPEC_FILE)
        notes.append(f"network and build spec written, no engine ({why_not}): {needs}")
    histogram = Counter(n.op_type for n in model.graph.node)
    files = sorted(p.name for p in out_dir.iterdir() if p.name.startswith(MODEL_FILE))
    files += [engine.SPEC_FILE] + ([engine.ENGINE_FILE, engine.TIMING_CACHE] if built else [])
    toolchain = {
        "onnx": onnx.__version__,
        "opset": str(OPSET),
        **({"tensorrt": built["tensorrt"]} if built else {}),
    }
    target = {
        "tensorrt_min_version": version,
        "build_spec": engine.SPEC_FILE,
        "engine": built["engine"] if built else None,
        "engine_missing_reason": why_not,
        "quantized_matmuls": rewritten,
        "parser_check": "passed",
    }
    return EmitResult(
        files, dict(sorted(histogram.items())), toolchain, "tensorrt", io, target, notes
    )

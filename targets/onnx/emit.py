"""Emit a Graph as ONNX with external weights, checked by onnx.checker."""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from llmc.contract import KVMode
from llmc.targets.base import EmitResult

if TYPE_CHECKING:
    from llmc.compiler.graph import Graph

MODEL_FILE = "model.onnx"
log = logging.getLogger(__name__)


# Contrib ops whose trailing outputs are optional: an unused one left named is still computed
# and allocated on every step (SkipSimplifiedLayerNormalization's mean and inverse std).
_OPTIONAL_OUTPUTS = {("com.microsoft", "SkipSimplifiedLayerNormalization"): 1}


def _drop_unused_optional_outputs(model) -> int:
    """Blank the optional outputs nothing reads; return how many."""
    read = {name for node in model.graph.node for name in node.input}
    read |= {o.name for o in model.graph.output}
    dropped = 0
    for node in model.graph.node:
        first = _OPTIONAL_OUTPUTS.get((node.domain, node.op_type))
        if first is None:
            continue
        outputs = list(node.output)
        for i in range(first, len(outputs)):
            if outputs[i] and outputs[i] not in read:
                outputs[i] = ""
                dropped += 1
        while outputs and not outputs[-1]:
            outputs.pop()
        del node.output[:]
        node.output.extend(outputs)
    return dropped


def export(program, graph: Graph, table: dict, path: Path, opset: int | None = None) -> None:
    """`torch.onnx.export` of `program` with the graph's input and output names and llmc's
    translation `table`, saved to `path` with its weights in one external file (no 2 GB
    protobuf limit, and the graph stays small)."""
    import torch

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.onnx.export(
            program,
            (),
            dynamo=True,
            optimize=True,
            verbose=False,
            input_names=graph.input_names,
            output_names=graph.output_names,
            custom_translation_table=table,
            **({"opset_version": opset} if opset else {}),
        )
    exported.save(str(path), external_data=True)


def emit(graph: Graph, out_dir: Path, options=None) -> EmitResult:
    import onnx
    import onnxruntime
    import onnxscript

    from llmc.compiler import ops
    from llmc.targets.onnx.lowering import translation_table

    path = Path(out_dir) / MODEL_FILE
    table = translation_table(shared_kv=graph.kv_mode is KVMode.SHARED)
    # Ops onnxruntime has no kernel for in this form go back to plain ATen (DESIGN.md).
    export(ops.decompose(graph.program, keep=set(table)), graph, table, path)
    model = onnx.load(str(path), load_external_data=False)
    if any(n.op_type in ("MatMulNBits", "GatherBlockQuantized") for n in model.graph.node):
        from llmc.targets.onnx import layouts

        model = onnx.load(str(path))  # quantized weights are small: rewrite them in memory
        layouts.apply(model)
        for p in Path(out_dir).glob(MODEL_FILE + "*"):
            p.unlink()
        _drop_unused_optional_outputs(model)
        onnx.save(model, str(path), save_as_external_data=True, location=MODEL_FILE + ".data")
        model = onnx.load(str(path), load_external_data=False)
    elif _drop_unused_optional_outputs(model):
        onnx.save(model, str(path))  # the graph only: initializers still point to model.onnx.data
    unused = set(graph.input_names) - {i.name for i in model.graph.input}  # dropped by the exporter
    io = graph.io.without_inputs(unused)
    if options is not None and options.compat:
        from llmc.targets.onnx.compat import onnxruntime_genai_form

        io = onnxruntime_genai_form(model, io)
        onnx.save(model, str(path))  # the graph only, as above
    onnx.checker.check_model(str(path), full_check=False)
    histogram = Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        for n in model.graph.node
    )
    files = sorted(p.name for p in Path(out_dir).iterdir() if p.name.startswith(MODEL_FILE))
    toolchain = {
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxscript": onnxscript.__version__,
        "opset": str(max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))),
    }
    return EmitResult(files, dict(sorted(histogram.items())), toolchain, io=io)

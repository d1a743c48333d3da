"""Emit a Graph as stateful OpenVINO IR (openvino_model.xml/.bin).

Recipe (DESIGN.md, "OpenVINO"):
1. decompose the llmc ops into the ATen forms the plugin fuses (lowering.py), in the same retrace
   as OpenVINO's own decompositions;
2. `openvino.convert_model`, then name the inputs and outputs;
3. add a `beam_idx` input with a Gather in front of every past-KV use (the plugin's stateful
   SDPA fusion expects it), and make the KV cache state (ReadValue/Assign);
4. `save_model` without fp16 compression.
Converting from the ExportedProgram rather than the ONNX target's file keeps the ATen SDPA that
OpenVINO fuses; the ONNX file holds onnxruntime contrib ops OpenVINO cannot read. The fusions
the CPU plugin then makes are counted on the compiled model and recorded."""

from __future__ import annotations

import re
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from llmc.contract import KVMode
from llmc.targets.base import EmitResult
from llmc.targets.openvino.session import compile_properties

if TYPE_CHECKING:
    from llmc.compiler.graph import Graph

MODEL_FILE = "openvino_model.xml"
WEIGHTS_FILE = "openvino_model.bin"
# Plugin layer types that show a fusion happened (the compiled model's, after its passes).
FUSED = ("RMS", "RoPE", "ScaledDotProductAttention", "MemoryInput", "MemoryOutput")


def lower(graph: Graph):
    """The graph as a decoder for `openvino.convert_model`: one `run_decompositions` with
    OpenVINO's own table (what its converter would run on an ExportedProgram) plus the llmc ops'
    lowerings. Retracing once instead of twice halves emission time (about 40 s of SmolLM2's)."""
    from openvino.frontend.pytorch.fx_decoder import TorchFXPythonDecoder
    from openvino.frontend.pytorch.torchdynamo.export_decompositions import ops_to_not_decompose
    from torch.export.decomp_utils import CustomDecompTable

    from llmc.targets.openvino.lowering import decompositions

    table = CustomDecompTable()
    for op in ops_to_not_decompose():
        if op in table:
            table.pop(op)
    program = graph.program
    used = {n.target for n in program.graph.nodes if n.op == "call_function"}
    for op, fn in decompositions().items():
        if op in used:
            table[op] = fn
    program = program.run_decompositions(table)
    _cancel_head_round_trips(program.graph_module)
    return TorchFXPythonDecoder(program.module(), dynamic_shapes=True)


def _cancel_head_round_trips(module) -> int:
    """Remove swap -> flatten -> unflatten -> swap chains that give back their input.

    transformers hands attention q/k as [B, H, S, D] (after RoPE); the llmc op takes [B, S, H*D]
    and its SDPA lowering goes back to [B, H, S, D]. The plugin keeps both transposes (two per
    layer, about 1% of a SmolLM2 decode step). A swap of dims 1 and 2 is a `transpose` or, once
    decomposed, a `permute`."""
    import torch

    aten = torch.ops.aten

    def is_swap(node) -> bool:
        target = getattr(node, "target", None)
        if target == aten.transpose.int:
            return tuple(sorted(d % 4 for d in node.args[1:3])) == (1, 2)
        return target == aten.permute.default and [d % 4 for d in node.args[1]] == [0, 2, 1, 3]

    def is_view(node) -> bool:
        views = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
        return getattr(node, "target", None) in views

    done = 0
    for node in list(module.graph.nodes):
        if not is_swap(node) or not is_view(unflat := node.args[0]):
            continue
        flat = unflat.args[0]
        if getattr(flat, "target", None) == aten.clone.default:  # a copy before the view
            flat = flat.args[0]
        if not is_view(flat) or not is_swap(first := flat.args[0]):
            continue
        source = first.args[0]
        val, want = source.meta.get("val"), node.meta.get("val")
        if val is None or want is None or val.dim() != 4 or want.dim() != 4:
            continue
        pairs = zip(val.shape[1::2], want.shape[1::2], strict=True)
        if not all(isinstance(a, int) and a == b for a, b in pairs):
            continue  # heads and head_dim must be the same static sizes
        node.replace_all_uses_with(source)
        done += 1
    if done:
        module.graph.eliminate_dead_code()
        module.recompile()
    return done


def make_stateful(model, past: list[str], present: list[str], kv_heads: int, head_dim: int) -> None:
    """Route each past KV input through Gather(beam_idx) and turn past/present pairs into state.
    The state's heads and head size are static: OpenVINO GenAI's paged-attention conversion
    reads them off it (with them dynamic it sized SmolLM2's cache blocks for one head and
    failed on the first prompt)."""
    import openvino as ov
    import openvino.opset13 as opset
    from openvino._offline_transformations import apply_make_stateful_transformation

    for name in past:
        model.input(name).get_node().set_partial_shape(
            ov.PartialShape([-1, kv_heads, -1, head_dim])
        )
    model.validate_nodes_and_infer_types()
    beam = opset.parameter([-1], ov.Type.i32, name="beam_idx")
    beam.output(0).get_tensor().set_names({"beam_idx"})
    for name in past:
        port = model.input(name)
        users = list(port.get_target_inputs())
        gathered = opset.gather(port, beam, opset.constant(0, ov.Type.i32))
        for user in users:
            user.replace_source_output(gathered.output(0))
    model.add_parameters([beam])
    apply_make_stateful_transformation(model, dict(zip(past, present, strict=True)))
    # Each state starts as zeros [batch, kv_heads, 0, head_dim], the batch read off input_ids:
    # a ReadValue without that initializer cannot be compiled. The sizes come from the model
    # spec: the converted graph leaves kv_heads dynamic where no SDPA pins it (a soft-capped
    # attention).
    batch = opset.gather(
        opset.shape_of(model.input("input_ids"), "i64"),
        opset.constant([0], ov.Type.i64),
        opset.constant(0, ov.Type.i64),
    )
    rest = opset.constant([kv_heads, 0, head_dim], ov.Type.i64)
    for op in model.get_ops():
        if op.get_type_name() != "ReadValue":
            continue
        zeros = opset.constant(0.0, op.get_output_element_type(0))
        op.set_arguments([opset.broadcast(zeros, opset.concat([batch, rest], 0))])
    model.validate_nodes_and_infer_types()


def runtime_ops(compiled) -> dict[str, int]:
    """Layer types of a compiled model (after the plugin's fusions), and "StatefulSDPA": the
    attention nodes that read their KV cache straight from the state (no concat per step)."""

    def kind(op) -> str:
        return op.get_rt_info()["layerType"].astype(str)

    ops = compiled.get_runtime_model().get_ops()
    counts = Counter(kind(op) for op in ops)
    counts["StatefulSDPA"] = sum(
        kind(op) == "ScaledDotProductAttention"
        and any(kind(i.get_source_output().get_node()) == "MemoryInput" for i in op.inputs())
        for op in ops
    )
    return dict(sorted(counts.items()))


def _emitted_io(graph: Graph, saved, options):
    if graph.io.recurrent:
        return graph.io
    io = _stateful_io(graph, saved)
    return io.last_position_only() if options.compat else io


def _vendor_form(model, graph: Graph) -> None:
    """OpenVINO GenAI's form (llmc build --compat openvino-genai): it feeds input_ids,
    attention_mask, position_ids and beam_idx only, so the logits' position is chosen inside
    (the last one: all it reads); and the model says how it must be compiled to compute what
    was verified (the plugin would otherwise pick bf16 and an 8-bit cache by CPU), in the
    `runtime_options` every OpenVINO runtime applies when it compiles a model."""
    import openvino as ov
    import openvino.opset13 as opset

    from llmc.targets.openvino.session import vendor_properties

    if "logits_index" in graph.input_names:
        index = model.input("logits_index")
        shape = opset.shape_of(model.input("input_ids"), "i64")
        length = opset.gather(
            shape, opset.constant([1], ov.Type.i64), opset.constant(0, ov.Type.i64)
        )
        last = opset.subtract(length, opset.constant([1], ov.Type.i64))
        for user in list(index.get_target_inputs()):
            user.replace_source_output(last.output(0))
        model.remove_parameter(index.get_node())
    for key, value in vendor_properties().items():
        model.set_rt_info(value, ["runtime_options", key])
    model.validate_nodes_and_infer_types()


def _stateful_io(graph: Graph, saved):
    """The traced contract with the cache moved into the model and `beam_idx` added, less any
    input the converter dropped because nothing read it (as the ONNX emitter records them)."""
    io = graph.io.stateful(("beam_idx",))
    got = {p.get_any_name() for p in saved.inputs}
    if got - set(io.inputs):
        raise RuntimeError(
            f"the stateful IR takes {sorted(got - set(io.inputs))} beyond its contract"
        )
    return io.without_inputs(set(io.inputs) - got)


def _largest_window(graph: Graph) -> int:
    """The widest sliding attention window of the graph's llmc attention ops (0: none)."""
    import torch

    from llmc.compiler.op_args import AttentionCall
    from llmc.passes._util import is_call

    attention = torch.ops.llmc.attention.default
    calls = [AttentionCall.from_node(n) for n in graph.fx.nodes if is_call(n, attention)]
    return max((c.window for c in calls), default=0)


def emit(graph: Graph, out_dir: Path, options) -> EmitResult:
    import openvino as ov

    from llmc.targets.openvino.lowering import conversion_extensions

    if graph.kv_mode not in (KVMode.CONCAT, KVMode.RECURRENT):
        raise ValueError("the OpenVINO target takes a concat-mode graph (no rewire_kv_cache)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's pytree deprecations, raised inside the converter
        model = ov.convert_model(lower(graph), extension=conversion_extensions())
    for port, name in zip(model.inputs, graph.input_names, strict=True):
        port.get_tensor().set_names({name})
    for port, name in zip(model.outputs, graph.output_names, strict=True):
        port.get_tensor().set_names({name})
    io = graph.io
    if not io.recurrent:  # a recurrent state stays explicit inputs and outputs: session.py says why
        make_stateful(
            model, io.past_inputs, io.present_outputs, io.cache.kv_heads, io.cache.head_dim
        )
    if options.compat:
        _vendor_form(model, graph)
    _stable_names(model)
    path = Path(out_dir) / MODEL_FILE
    ov.save_model(model, str(path), compress_to_fp16=False)
    core = ov.Core()
    saved = core.read_model(str(path))
    histogram = Counter(op.get_type_name() for op in saved.get_ordered_ops())
    compiled = core.compile_model(saved, "CPU", compile_properties("f32", None))
    fused = {k: v for k, v in runtime_ops(compiled).items() if k in (*FUSED, "StatefulSDPA")}
    return EmitResult(
        files=[MODEL_FILE, WEIGHTS_FILE],
        op_histogram=dict(sorted(histogram.items())),
        toolchain={"openvino": ov.__version__.split("-")[0]},
        flavor="openvino-cpu",
        io=_emitted_io(graph, saved, options),
        target={
            "precision": options.precision,  # verification still runs at f32
            "fused_ops": fused,
            "weights": WEIGHTS_FILE,
            # the runtime keeps no masked holes then
            "sliding_window": 0 if io.recurrent else _largest_window(graph),
            **({"dynamic_quantization": _integer_zero_points(graph)} if graph.quantization else {}),
        },
    )


def _stable_names(model) -> None:
    """Name the model and the nodes OpenVINO named from its process-wide counter (`Constant_9469`)
    by their place in the graph instead, so the same graph serializes to the same bytes in any
    process (reproducible builds)."""
    model.set_friendly_name("llmc")
    for index, op in enumerate(model.get_ordered_ops()):
        kind = op.get_type_name()
        if re.fullmatch(rf"{kind}_\d+", op.get_friendly_name()):
            op.set_friendly_name(f"{kind}_{index}")


def _integer_zero_points(graph: Graph) -> bool:
    """Whether every quantized weight has integer zero points (or none): the plugin's dynamic
    quantization speeds those up only. On SmolLM2's Q4_1 grid, kept with fractional zero points,
    it ran no faster (132.7 against 135.6 tok/s exact) and cost 0.12% perplexity, so such an
    artifact runs exactly by default."""
    import torch

    ops = (torch.ops.llmc.linear_nbits.default, torch.ops.llmc.embedding_nbits.default)
    for node in graph.fx.nodes:
        if node.op == "call_function" and node.target in ops and len(node.args) > 3:
            zeros = graph.tensor(node.args[3]) if node.args[3] is not None else None
            if zeros is not None and not torch.equal(zeros, zeros.round()):
                return False
    return True

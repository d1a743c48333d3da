"""Emit a Graph as a TVM Relax module compiled for this CPU, its weights in a file beside it.

Steps: decompose the llmc ops the converters do not take; make every weight, buffer and
constant a parameter (TVM's importer would bind buffers and constants into the library);
import with the converters of lowering.py; drop the export's upper bounds on the symbolic
lengths (memory planning would reserve the worst case: ~34 GB of attention scores, DESIGN.md);
lift the weight packing into `main_transform_params`; compile for the host CPU (`llvm` with the
CPU name and its features) and write `model.so` (~1 MB of code); run the packing once here and
write its results, the weights in the layout the kernels read, to `params.bin` (each weight
once, 64-byte aligned, so that a session maps the file instead of reading and copying it)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from llmc.targets.base import EmitResult

if TYPE_CHECKING:
    from llmc.compiler.graph import Graph

LIBRARY = "model.so"
PARAMS = "params.bin"


def host_target():
    """TVM's target for this machine: llvm with the host CPU's name and its cores."""
    import os

    import tvm
    from tvm.target import codegen

    cores = len(os.sched_getaffinity(0))
    return tvm.target.Target(
        {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": cores}
    )


def _as_parameters(program):
    """The program with its buffers and constant tensors turned into parameters: they become
    inputs of the Relax function, saved with the weights, never constants in the library. The
    program's dictionaries and signature are replaced, not changed: they are shared with the
    graph that verification runs afterwards."""
    import torch
    from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec

    state, constants = dict(program.state_dict), dict(program.constants)
    specs = []
    for spec in program.graph_signature.input_specs:
        if spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            value = state.pop(spec.target, None)
            value = constants.pop(spec.target) if value is None else value
            state[spec.target] = torch.nn.Parameter(value, requires_grad=False)
            spec = InputSpec(InputKind.PARAMETER, spec.arg, spec.target, None)
        specs.append(spec)
    program._state_dict, program._constants = state, constants
    program._graph_signature = ExportGraphSignature(specs, program.graph_signature.output_specs)
    return program


def _weights(program) -> dict:
    """Placeholder name -> tensor of every parameter of the program."""
    from torch.export.graph_signature import InputKind

    return {
        spec.arg.name: program.state_dict[spec.target]
        for spec in program.graph_signature.input_specs
        if spec.kind is InputKind.PARAMETER
    }


def import_graph(graph: Graph):
    """(Relax module with `main(inputs..., params...)`, parameter arrays in that order, what the
    converters lowered)."""
    import torch
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from llmc.compiler import ops
    from llmc.targets.tvm import lowering

    calls = [n for n in graph.fx.nodes if n.target == lowering.ATTENTION]
    attention = all(lowering.attention_supported(n) for n in calls)
    keep = {
        torch.ops.llmc.rms_norm.default,
        torch.ops.llmc.skip_rms_norm.default,
        torch.ops.llmc.rotary.default,
        torch.ops.llmc.linear_nbits.default,
        torch.ops.llmc.embedding_nbits.default,
        *([lowering.ATTENTION] if attention else []),
    }
    program = ops.decompose(graph.program, keep=keep)
    # Core ATen, as TVM's importer wants it, but for the ops the converters take whole.
    table = torch.export.default_decompositions()
    for op in (torch.ops.aten.linear.default, torch.ops.aten.embedding.default):
        table.pop(op, None)
    program = _as_parameters(program.run_decompositions(table))
    weights = _weights(program)
    converters = lowering.Converters()
    mod = from_exported_program(
        program,
        keep_params_as_input=True,
        custom_convert_map=converters.table(attention),
        run_ep_decomposition=False,
    )
    main = mod["main"].without_attr("tir_var_upper_bound").without_attr("params")
    mod["main"] = main
    inputs = int(main.attrs["num_input"])
    names = [p.name for p in main.params[inputs:]]
    params = [weights[n].detach().contiguous().numpy() for n in names]
    mod = relax.transform.LiftTransformParams()(mod)
    return mod, names, params, converters.counts


def relax_pipeline(target):
    """TVM's CPU pipeline without RewriteDataflowReshape (it inspects every kernel's body for a
    reshape, and llmc's kernels are loop nests without schedulable blocks): legalize the Relax
    ops left (norms, activations, residual adds), fuse those into one loop nest per chain,
    lower to the VM with statically planned memory."""
    import tvm
    from tvm.relax import transform as t

    passes = [
        t.LegalizeOps(),
        t.AnnotateTIROpPattern(),
        t.FoldConstant(),
        t.FuseOps(),
        t.FuseTIR(),
        t.DeadCodeElimination(),
        t.ToNonDataflow(),
        t.RemovePurityChecking(),
        t.CallTIRRewrite(),
        t.StaticPlanBlockMemory(),
        t.LowerAllocTensor(),
        t.KillAfterLastUse(),
        t.LowerRuntimeBuiltin(),
        t.ComputePrimValue(),
        t.VMShapeLower(),
        ordered_shape_stores(),
        t.AttachGlobalSymbol(),
    ]

    @tvm.transform.module_pass(opt_level=0)
    def pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return pipeline


def ordered_shape_stores():
    """VMShapeLower writes the shape function's independent stores (`H[k] = f(H[inputs])`) in an
    order that changes from process to process (a hash map it walks), and LLVM follows it: the
    library's bytes differed between two builds of one model. Sort them by slot, which keeps
    their meaning (no store reads a slot another one writes) and makes the build reproducible."""
    import tvm
    from tvm import tirx

    def reads(expr, found: set[int]) -> bool:
        """Add the slots `expr` loads to `found`; False where it holds a node not walked here."""
        if type(expr).__name__ in ("TensorLoad", "BufferLoad"):  # its name in this TVM
            found.add(int(expr.indices[0]))
            return isinstance(expr.indices[0], tirx.IntImm)
        if isinstance(expr, (tirx.IntImm, tirx.Var)):
            return True
        if hasattr(expr, "a") and hasattr(expr, "b"):  # the binary arithmetic nodes
            return reads(expr.a, found) and reads(expr.b, found)
        return False

    def ordered(body):
        if not isinstance(body, tirx.SeqStmt):
            return None
        stores = list(body.seq)
        if not all(
            isinstance(s, tirx.BufferStore) and isinstance(s.indices[0], tirx.IntImm)
            for s in stores
        ):
            return None
        written, read = {int(s.indices[0]) for s in stores}, set()
        if not all(reads(s.value, read) for s in stores) or read & written:
            return None
        return tirx.SeqStmt(sorted(stores, key=lambda s: int(s.indices[0])))

    @tvm.transform.module_pass(opt_level=0)
    def sort_stores(mod, _ctx):
        for gv, func in list(mod.functions.items()):
            if isinstance(func, tirx.PrimFunc) and gv.name_hint.startswith("shape_func"):
                body = ordered(func.body)
                if body is not None:
                    mod[gv] = func.with_body(body)
        return mod

    return sort_stores


def save_params(path: Path, arrays) -> list[dict]:
    """The arrays back to back in one file, each at an offset aligned for TVM's kernels, so
    that a session maps them without copying; returns where each is."""
    import numpy as np

    from llmc.targets.tvm.session import ALIGN

    index, offset = [], 0
    with open(path, "wb") as out:
        for array in arrays:
            array = np.asarray(array, order="C")  # (ascontiguousarray makes a 0-d array 1-d)
            pad = -offset % ALIGN
            out.write(b"\0" * pad)
            offset += pad
            out.write(memoryview(array).cast("B"))
            index.append({"offset": offset, "shape": list(array.shape), "dtype": str(array.dtype)})
            offset += array.nbytes
    return index


def emit(graph: Graph, out_dir: Path, options=None) -> EmitResult:
    import tvm
    from tvm import relax

    out_dir = Path(out_dir)
    mod, names, params, lowered = import_graph(graph)
    target = host_target()
    executable = tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target))
    executable.export_library(str(out_dir / LIBRARY))
    # The weights are saved in the layout the kernels read (packed here, once, not at load).
    transform = relax.VirtualMachine(executable, tvm.cpu())["main_transform_params"]
    packed = transform([tvm.runtime.tensor(p) for p in params])
    del params
    index = save_params(out_dir / PARAMS, (t.numpy() for t in packed))
    histogram = Counter(graph.op_histogram())
    histogram.update({f"llmc_tvm::{k}": v for k, v in lowered.items()})
    return EmitResult(
        files=[LIBRARY, PARAMS],
        op_histogram=dict(sorted(histogram.items())),
        toolchain={"tvm": tvm.__version__},
        flavor="tvm-llvm-cpu",
        target={
            "library": LIBRARY,
            "params": PARAMS,
            "param_index": index,
            "source_params": names,
            "cpu": str(target.attrs["mcpu"]),
            "llvm_target": str(target),
        },
    )

"""Compile the passed graph with AOTInductor into one `.pt2` package (kernels, weights, and the
wrapper that runs them), for this machine's CPU or, when the build runs where CUDA is, its GPU."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from llmc.contract import KVMode
from llmc.errors import TargetError
from llmc.targets.base import EmitResult

if TYPE_CHECKING:
    from llmc.compiler.graph import Graph

PACKAGE = "model.pt2"


def device() -> str:
    """Where the package runs: `LLMC_INDUCTOR_DEVICE` (cpu or cuda), else CUDA when a device is
    visible, else the CPU."""
    import torch

    chosen = os.environ.get("LLMC_INDUCTOR_DEVICE")
    if chosen:
        return chosen
    return "cuda" if torch.cuda.is_available() else "cpu"


def inductor_configs(where: str, autotune: bool = True) -> dict:
    """Inductor's options. On the CPU: weights frozen into the package and every matmul choice
    autotuned between ATen's and Inductor's own C++ GEMM template, which packs the frozen
    weight for its vector micro-kernel (SmolLM2's gate-up and down projections at one token, 2
    threads: 93 us, against 179 us through ATen's mm and 403 us in eager PyTorch). On CUDA:
    the defaults (cuBLAS and Triton)."""
    if where == "cuda":
        return {"max_autotune": autotune}
    if not autotune:
        return {"freezing": True}
    return {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"}


def emit(graph: Graph, out_dir: Path, options=None) -> EmitResult:
    import torch
    import torch._inductor

    from llmc.compiler import ops

    if graph.kv_mode not in (KVMode.SHARED, KVMode.RECURRENT):
        raise TargetError(
            f"the inductor target needs llmc attention on a shared KV cache, which this "
            f"{graph.spec.architecture} graph does not have (it keeps its own attention); "
            "build it for --target onnx or openvino."
        )
    where = device()
    configs = inductor_configs(where, options.autotune if options is not None else True)
    program = ops.decompose(graph.program)  # every llmc op in its reference ATen form
    if where != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, where)
    histogram = Counter(
        str(n.target).replace("aten.", "").split(".")[0]
        for n in program.graph.nodes
        if n.op == "call_function"
    )
    path = Path(out_dir) / PACKAGE
    torch._inductor.aoti_compile_and_package(
        program, package_path=str(path), inductor_configs=configs
    )
    reproducible_package(path)
    toolchain = {"torch": torch.__version__}
    target = {
        "device": where,
        "inputs": list(graph.input_names),
        "outputs": list(graph.output_names),
        "inductor_configs": configs,
    }
    return EmitResult(
        [PACKAGE], dict(sorted(histogram.items())), toolchain, flavor=f"aotinductor-{where}",
        target=target,
    )  # fmt: skip


def reproducible_package(path: Path) -> None:
    """Rewrite the package without what changes from one build of the same graph to the next:
    the random `.data/serialization_id` (made from the contents instead) and the compile and
    link commands Inductor appends to its C++ sources as comments (temporary paths, and present
    or not depending on its compile cache). The library and everything the loader reads are kept
    byte for byte, in their order, stored uncompressed with the same fixed time stamps."""
    import hashlib
    import zipfile

    with zipfile.ZipFile(path) as package:
        records = [(info, package.read(info)) for info in package.infolist()]
    digest = hashlib.sha256()
    kept = []
    for info, data in records:
        if info.filename.endswith(".cpp"):
            data = data.split(b"\n// Compile cmd\n", 1)[0]
        if not info.filename.endswith("serialization_id"):
            digest.update(info.filename.encode() + data)
        kept.append((info, data))
    serial = str(int(digest.hexdigest(), 16))[:40].encode()
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as package:
        for info, data in kept:
            fresh = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            package.writestr(fresh, serial if info.filename.endswith("serialization_id") else data)
    tmp.replace(path)

"""AOTInductor target: the passed graph, llmc ops decomposed to ATen, compiled ahead of time by
PyTorch's Inductor into a `.pt2` package (C++ kernels for this CPU; Triton/CUDA where the build
runs on a GPU), loaded and run by torch's AOTInductor runtime."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Options:
    """`llmc build --target inductor` options."""

    autotune: bool = True  # matmuls: Inductor's C++ GEMM template or ATen's, the faster of them

"""The CPU facts that decide which kernels a back end picks, recorded beside measured numbers."""

from __future__ import annotations

import functools
import platform

# Instruction sets for which OpenVINO's CPU plugin and onnxruntime's MLAS take other kernel
# paths (bf16 compute, int8 dot products, AMX tiles).
KERNEL_FEATURES = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)

# Features that give int8 dot products: where a CPU has none, onnxruntime's int8-activation
# kernels are slow for many rows and OpenVINO's dynamic quantization is not applied (on a Zen 3
# with AVX2 alone, an int8 artifact's "fast" logits were the exact ones within 7e-5).
INT8_DOT = ("avx512_vnni", "avx_vnni", "amx_int8")


def int8_dot() -> bool:
    """Whether this CPU has int8 dot products (INT8_DOT)."""
    return any(f in INT8_DOT for f in _cpuinfo()[1])


def host_cpu() -> dict:
    """{"model": name, "features": the KERNEL_FEATURES this CPU has} (Linux; elsewhere the
    processor string and no features): a fresh dict each call, read once per process."""
    model, features = _cpuinfo()
    return {"model": model, "features": list(features)}


@functools.cache
def _cpuinfo() -> tuple[str, tuple[str, ...]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, tuple(f for f in KERNEL_FEATURES if f in flags)


def describe(host: dict) -> str:
    return f"{host['model']} ({', '.join(host['features']) or 'no AVX2'})"


def peak_rss_mb() -> float:
    """This process's own peak resident memory, in MB: the kernel's high-water mark of its
    address space (VmHWM). `getrusage(RUSAGE_SELF).ru_maxrss` is not that after an exec: Linux
    carries the spawning process's high-water mark into it, so a child of an 800 MB parent
    reports at least 800 MB whatever it uses itself."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux

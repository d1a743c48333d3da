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

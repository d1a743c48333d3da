"""The target registry: which back ends exist, whether they are installed, and how to get them."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from dataclasses import dataclass

from llmc.contract import KVMode
from llmc.errors import TargetError

# BuildConfig fields (and `llmc build` flags) that only some targets take: a target takes those its
# `Options` dataclass (in its package's __init__) has a field for.
TARGET_FLAGS = ("precision", "autotune", "compat")


@dataclass(frozen=True)
class TargetOptions:
    """The build options of a target without any of its own."""


@dataclass(frozen=True)
class KVVariant:
    """A KV-cache mode a target's artifacts can have, and the `--passes` edit that gives it
    (None: the default pipeline). The conformance suite builds every one."""

    mode: KVMode
    passes: str | None = None
    # Which tiny families the suite builds it for (None: all of its list). A target whose every
    # build compiles C++ (inductor: ~40 s a tiny model) runs a spread, to keep CI in time.
    families: tuple[str, ...] | None = None
    quant_families: tuple[str, ...] | None = None
    quant_levels: tuple[str, ...] = ("int8", "int4")


@dataclass(frozen=True)
class TargetInfo:
    name: str
    module: str  # sub-package with pipeline.pipeline(), emit.emit() and session.<session class>
    requires: tuple[str, ...]  # importable modules its build and runtime need
    install: str
    ready: bool = True  # False: planned, not implemented in this version
    runtime: str = ""  # the module (and distribution) its session needs, version-checked at load
    description: str = ""
    kv_variants: tuple[KVVariant, ...] = (KVVariant(KVMode.CONCAT),)
    # the state-space families (a recurrent state, `recurrent` mode) the conformance suite
    # builds for it (tests/test_recurrent.py); none: it refuses state-space models
    recurrent_families: tuple[str, ...] = ()
    # positions per call of its recurrent graphs (None: the scan's 64; 1: static, one a call)
    recurrent_step: int | None = None

    @property
    def recurrent(self) -> bool:
        return bool(self.recurrent_families)

    def missing(self, for_runtime: bool = False) -> list[str]:
        needed = (self.runtime,) if for_runtime and self.runtime else self.requires
        return [m for m in needed if importlib.util.find_spec(m) is None]

    # Each target sub-package has the same three modules; they are imported only when used, so the
    # runtime (session) never pulls in the compiler's torch.
    def pipeline(self, **options) -> list:
        return importlib.import_module(f"{self.module}.pipeline").pipeline(**options)

    def emit(self, graph, out_dir, options: TargetOptions | None = None):
        emit = importlib.import_module(f"{self.module}.emit").emit
        return emit(graph, out_dir, options or self.options_class()())

    def options_class(self) -> type:
        return getattr(importlib.import_module(self.module), "Options", TargetOptions)

    def option_names(self) -> set[str]:
        return {f.name for f in dataclasses.fields(self.options_class())}

    def options(self, config) -> TargetOptions:
        """This target's typed options from a BuildConfig; a flag it does not take is refused."""
        given = {k: v for k in TARGET_FLAGS if (v := getattr(config, k, None)) is not None}
        for flag in sorted(given.keys() - self.option_names()):
            owners = [t.name for t in TARGETS.values() if t.ready and flag in t.option_names()]
            raise TargetError(
                f"--{flag} applies to --target {' or '.join(owners)}, not {self.name}."
            )
        return self.options_class()(**given)

    def model_class(self, verify: bool = False):
        """The runtime Model class of the target (runtime/session.py's protocol); `verify`: the
        one a build verifies with (a target whose own runtime cannot run here has another)."""
        session = importlib.import_module(f"{self.module}.session")
        return getattr(session, "VerifyModel", session.Model) if verify else session.Model


# Inductor compiles the llmc ops' ATen forms, which every other target's suite also runs: one
# family (its C++ compile makes each build ~40 s here).
INDUCTOR_FAMILIES = ("llama",)

# Every state-space family: Mamba, Falcon Mamba (norms on Δ, B, C), Mamba2 (heads, groups).
SSM_FAMILIES = ("mamba", "falcon_mamba", "mamba2")

TVM_FAMILIES = ("llama", "phi3", "gpt2", "gemma2", "phi", "falcon")

TARGETS: dict[str, TargetInfo] = {
    t.name: t
    for t in (
        TargetInfo(
            "onnx",
            "llmc.targets.onnx",
            ("onnx", "onnxruntime", "onnxscript"),
            "pip install 'llmc[onnx]'",
            description="ONNX graph run by onnxruntime (CPU)",
            runtime="onnxruntime",
            recurrent_families=SSM_FAMILIES,
            kv_variants=(
                KVVariant(KVMode.SHARED),
                # the second mode of the same lowering: a spread of families (plain, partial
                # rotary with LayerNorm), one quantized
                KVVariant(
                    KVMode.CONCAT,
                    "-rewire_kv_cache",
                    families=("llama", "phi"),
                    quant_families=("llama",),
                ),
            ),
        ),
        TargetInfo(
            "openvino",
            "llmc.targets.openvino",
            ("openvino",),
            "pip install 'llmc[openvino]'",
            description="stateful OpenVINO IR run by OpenVINO's CPU plugin",
            runtime="openvino",
            kv_variants=(KVVariant(KVMode.STATEFUL),),
            recurrent_families=SSM_FAMILIES,
        ),
        TargetInfo(
            "tvm",
            "llmc.targets.tvm",
            ("tvm",),
            "pip install 'llmc[tvm]'",
            description="TVM Relax module compiled for this CPU, run by TVM's Relax VM",
            runtime="tvm",
            # TVM's suite runs the families its importer and kernels meet differently (the
            # llama-like qwen2, mistral, olmo2, granite and smollm3, and gemma, qwen3 and cohere
            # pass too; out of CI for time)
            kv_variants=(KVVariant(KVMode.SHARED, families=TVM_FAMILIES),),
            recurrent_families=SSM_FAMILIES,
            # TVM's legalization does not finish on the scan's shifted symbolic lengths (over
            # 10 min for tiny Mamba): its graphs take one position a call, prompts included
            recurrent_step=1,
        ),
        TargetInfo(
            "tensorrt",
            "llmc.targets.tensorrt",
            ("onnx", "onnxruntime", "onnxscript"),
            "pip install 'llmc[onnx]' for the network; the engine needs TensorRT >= 10.15 "
            "(NVIDIA's index) and an NVIDIA GPU",
            description="standard-ONNX network + build spec; TensorRT engine where TensorRT runs",
            runtime="tensorrt",
            recurrent_families=("mamba",),  # its network, run by onnxruntime here
        ),
        TargetInfo(
            "inductor",
            "llmc.targets.inductor",
            ("torch",),
            "pip install 'llmc[compile]' (torch, with a C++ compiler for CPU packages)",
            description="AOTInductor package (.pt2) run by torch (CPU; CUDA where a GPU is)",
            runtime="torch",
            kv_variants=(
                KVVariant(
                    KVMode.SHARED,
                    families=INDUCTOR_FAMILIES,
                    quant_families=INDUCTOR_FAMILIES,
                    quant_levels=("int4",),  # int8 runs the same dequantize-then-matmul graph
                ),
            ),
            recurrent_families=("mamba",),  # each build compiles C++: one family (CI time)
        ),
    )
}


def get(name: str) -> TargetInfo:
    """The usable target called `name`, or a TargetError that says what to do."""
    info = TARGETS.get(name)
    if info is None:
        raise TargetError(
            f"unknown target {name!r}; choose one of: {', '.join(TARGETS)} (see `llmc targets`)."
        )
    if not info.ready:
        ready = ", ".join(t.name for t in TARGETS.values() if t.ready)
        raise TargetError(f"the {name} target is not implemented yet; use one of: {ready}.")
    missing = info.missing()
    if missing:
        raise TargetError(
            f"the {name} target needs {', '.join(missing)}; install it with `{info.install}`."
        )
    return info

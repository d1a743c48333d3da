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
TARGET_FLAGS = ("precision",)


@dataclass(frozen=True)
class TargetOptions:
    """The build options of a target without any of its own."""


@dataclass(frozen=True)
class KVVariant:
    """A KV-cache mode a target's artifacts can have, and the `--passes` edit that gives it
    (None: the default pipeline). The conformance suite builds every one."""

    mode: KVMode
    passes: str | None = None


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

    def model_class(self):
        """The runtime Model class of the target (runtime/session.py's protocol)."""
        return importlib.import_module(f"{self.module}.session").Model


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
            kv_variants=(KVVariant(KVMode.SHARED), KVVariant(KVMode.CONCAT, "-rewire_kv_cache")),
        ),
        TargetInfo(
            "openvino",
            "llmc.targets.openvino",
            ("openvino",),
            "pip install 'llmc[openvino]'",
            description="stateful OpenVINO IR run by OpenVINO's CPU plugin",
            runtime="openvino",
            kv_variants=(KVVariant(KVMode.STATEFUL),),
        ),
        TargetInfo(
            "tvm",
            "llmc.targets.tvm",
            ("tvm",),
            "pip install 'llmc[tvm]'",
            description="TVM Relax module compiled for this CPU, run by TVM's Relax VM",
            runtime="tvm",
            kv_variants=(KVVariant(KVMode.SHARED),),
        ),
        TargetInfo(
            "tensorrt",
            "llmc.targets.tensorrt",
            ("tensorrt",),
            "pip install 'llmc[tensorrt]' from NVIDIA's index",
            ready=False,
            description="TensorRT engine (planned)",
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

"""Turn a model that cannot be traced or emitted into one sentence naming the module or op."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from llmc.errors import LlmcError, UnsupportedModelError, refused_write

# An op as torch, the ONNX exporter and OpenVINO's converter name it, most specific first:
# OpOverload(op='transformers.grouped_mm_fallback', overload='default'), torch.ops.ns.name,
# aten.add.Tensor, aten::scaled_dot_product_attention, llmc.attention.default.
_OPS = (
    re.compile(r"operations: ([\w.:]+(?:, [\w.:]+)*)"),  # OpenVINO's unconverted-ops summary
    re.compile(r"OpOverload\(op='([\w.]+)', overload='(\w+)'\)"),
    re.compile(r"\btorch\.ops\.(\w+\.\w+(?:\.\w+)?)"),
    re.compile(r"\b((?:aten|llmc|prims|prim)(?:\.|::)[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)"),
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Where OpenVINO's C++ says the error came from, before what it is.
_PREAMBLE = re.compile(r"^(Check '.*' failed at |Exception from src/|FrontEnd API failed with)")
_MAX = 240  # characters of the library's own message kept in the sentence


class CannotCompileError(UnsupportedModelError):
    """The model loaded, but tracing or a back end could not handle one of its modules or ops.
    Exit code 2: the model is not (yet) supported, not an llmc crash."""


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and its causes/contexts, outermost first."""
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines()]
    lines = [line for line in lines if line and not _PREAMBLE.match(line)]
    text = lines[0] if lines else type(exc).__name__
    text = text if len(text) <= _MAX else text[: _MAX - 1] + "…"
    return f"{type(exc).__name__}: {text.rstrip('.')}"


def innermost_module(exc: BaseException, model) -> str | None:
    """`name (Class)` of the deepest module of `model` whose code the traceback went through."""
    names = {id(m): name for name, m in model.named_modules()}
    found = None
    for e in reversed(_chain(exc)):  # the root cause first
        tb = e.__traceback__
        while tb is not None:
            owner = tb.tb_frame.f_locals.get("self")
            if id(owner) in names:
                found = f"{names[id(owner)] or 'the top-level model'} ({type(owner).__name__})"
            tb = tb.tb_next
        if found:
            return found
    return None


def named_op(exc: BaseException) -> str | None:
    """The op the root cause names (or, failing that, the nearest exception that names one)."""
    for e in reversed(_chain(exc)):
        for pattern in _OPS:
            match = pattern.search(str(e))
            if match:
                return ".".join(match.groups())
    return None


def _raised_by_llmc(exc: BaseException) -> bool:
    """Whether the root cause was raised in llmc's own code (a bug to report: exit 1), not in
    transformers, torch or a back end's converter (a model llmc cannot handle yet: exit 2)."""
    import llmc
    import llmc.compiler
    import llmc.passes
    import llmc.runtime
    import llmc.targets

    ours = [str(Path(m.__file__).parent) for m in (llmc, llmc.compiler, llmc.passes, llmc.runtime,
                                                     llmc.targets)]  # fmt: skip
    tb = _chain(exc)[-1].__traceback__
    last = None
    while tb is not None:
        last, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    return last is not None and any(last.startswith(d + os.sep) for d in ours)


@contextlib.contextmanager
def _diagnosed(what: Callable[[BaseException], str]) -> Iterator[None]:
    """Turn an error of a library into CannotCompileError("<what>: <its first line>"); llmc's
    own errors and bugs pass through."""
    try:
        yield
    except LlmcError:
        raise
    except Exception as exc:
        if _raised_by_llmc(exc) or refused_write(exc):  # a full disk: the CLI says so
            raise
        raise CannotCompileError(
            f"{what(exc)}: {_first_line(_chain(exc)[-1])}; re-run with --debug for the traceback."
        ) from exc


def tracing(model, architecture: str):
    """Tracing errors name the module (and op, where the message names one) that stopped them."""

    def what(exc: BaseException) -> str:
        where, op = innermost_module(exc, model), named_op(exc)
        at = " at " + ", ".join(x for x in (where, op and f"op {op}") if x) if where or op else ""
        return f"{architecture!r} cannot be traced{at}"

    return _diagnosed(what)


def emitting(target: str, architecture: str):
    """Back-end errors name the op the exporter or converter could not lower."""

    def what(exc: BaseException) -> str:
        op = named_op(exc)
        at = f" (op{'s' if ', ' in op else ''} {op})" if op else ""
        return f"the {target} back end cannot emit this {architecture!r} graph{at}"

    return _diagnosed(what)

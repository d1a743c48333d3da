"""What an artifact is checked for before anything in it is read or run: the manifest's structure
and types, file paths that stay inside the artifact directory, native code whose checksum
matches the manifest. An artifact is code (see the README's "Security"): these checks turn a
corrupt or malformed one into one ArtifactError, they are not a signature."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from llmc.errors import ArtifactError

_SHA256 = re.compile(r"[0-9a-f]{64}")
_REBUILD = "rebuild the artifact"


def _fail(directory, what: str) -> ArtifactError:
    return ArtifactError(f"{directory}/llmc.json is malformed: {what}; {_REBUILD}.")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def reason(exc: BaseException, limit: int = 300) -> str:
    """An exception's first line (a library's messages run to pages), for a one-line error."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__


def inside(directory: str | os.PathLike, rel, what: str = "a file") -> Path:
    """The path of `rel` in the artifact, refused unless it is a relative path that stays inside
    the directory once symbolic links are followed (ArtifactError naming it)."""
    directory = Path(directory)
    if not isinstance(rel, str) or not rel or "\0" in rel or os.path.isabs(rel):
        raise ArtifactError(
            f"{directory} names {what} {rel!r} that is not a relative path inside the artifact; "
            f"{_REBUILD}."
        )
    root = directory.resolve()
    path = (root / rel).resolve()
    if path != root and root not in path.parents:
        raise ArtifactError(
            f"{directory} names {what} {rel!r} outside the artifact directory; refusing to read "
            f"it ({_REBUILD} from a trusted source)."
        )
    return directory / rel


def artifact_file(directory: str | os.PathLike, rel, what: str = "a file") -> Path:
    """`inside`, and a regular file (not missing, not a device or a pipe a read would hang on)."""
    path = inside(directory, rel, what)
    if not path.is_file():
        raise ArtifactError(f"{directory} is missing {shown(rel)} ({what}); {_REBUILD}.")
    return path


def shown(name: str) -> str:
    """A file name as an error sentence shows it: quoted when it holds control characters."""
    return name if name.isprintable() else repr(name)


_KV_DTYPES = ("float32", "float16")  # what a session allocates its KV cache as (numpy)


def check_structure(directory, manifest) -> None:
    """The types of every field the runtime reads; ArtifactError naming the first wrong one."""
    if not isinstance(manifest, dict):
        raise _fail(directory, f"it holds a {type(manifest).__name__}, not an object")
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise _fail(directory, "'files' is not an object")
    for rel, meta in files.items():
        inside(directory, rel, "a file in its files table")
        if not isinstance(meta, dict) or not is_int(meta.get("size")) or meta["size"] < 0:
            raise _fail(directory, f"files[{rel!r}] has no size")
        if not isinstance(meta.get("sha256"), str) or not _SHA256.fullmatch(meta["sha256"]):
            raise _fail(directory, f"files[{rel!r}] has no sha256")
    target = _section(directory, manifest, "target")
    if not isinstance(target.get("name"), str):
        raise _fail(directory, "target.name is not a string")
    model_files = target.get("files", {})
    if not isinstance(model_files, dict):
        raise _fail(directory, "target.files is not an object")
    for key, rel in model_files.items():
        inside(directory, rel, f"target file {key!r}")
    model = _section(directory, manifest, "model")
    # a recurrent model (Mamba) has no attention heads: its state's geometry is checked instead
    heads = () if model.get("recurrent") else ("num_kv_heads", "head_dim")
    for key in ("vocab_size", "num_layers", *heads):
        if key in model or key == "vocab_size":
            _positive(directory, model.get(key), f"model.{key}")
    io = _section(directory, manifest, "io", required=False)
    if "max_context" in io:
        _positive(directory, io["max_context"], "io.max_context")
    geometry = io.get("kv_geometry") or {}
    if not isinstance(geometry, dict):
        raise _fail(directory, "io.kv_geometry is not an object")
    for key, value in geometry.items():
        _positive(directory, value, f"io.kv_geometry.{key}")
    state = io.get("state_geometry") or {}
    if not isinstance(state, dict):
        raise _fail(directory, "io.state_geometry is not an object")
    for key, value in state.items():
        if key != "dtype":
            _positive(directory, value, f"io.state_geometry.{key}")
    if not isinstance(io.get("inputs", []), list):
        raise _fail(directory, "io.inputs is not a list")
    if io.get("kv_dtype", "float32") not in _KV_DTYPES:
        raise _fail(directory, f"io.kv_dtype is not one of {', '.join(_KV_DTYPES)}")
    _check_generation(directory, _section(directory, manifest, "generation"), model["vocab_size"])
    toolchain = _section(directory, manifest, "toolchain", required=False)
    if not all(isinstance(v, str) for v in toolchain.values()):
        raise _fail(directory, "a toolchain version is not a string")
    for key in ("quantization", "source", "verification", "graph", "build", "evaluation"):
        if not isinstance(manifest.get(key), (dict, type(None))):
            raise _fail(directory, f"'{key}' is not an object")
    source = manifest.get("source") or {}
    if not all(isinstance(source.get(k, ""), str) for k in ("kind", "ref", "weights_sha256")):
        raise _fail(directory, "source.kind or source.ref is not a string")
    passes = manifest.get("passes", [])
    if not isinstance(passes, list) or not all(isinstance(p, dict) for p in passes):
        raise _fail(directory, "'passes' is not a list of pass reports")


def _section(directory, manifest: dict, key: str, required: bool = True) -> dict:
    value = manifest.get(key, None if required else {})
    if not isinstance(value, dict):
        raise _fail(directory, f"'{key}' is {'missing or ' if required else ''}not an object")
    return value


def _positive(directory, value, name: str) -> None:
    if not is_int(value) or value < 1:
        raise _fail(directory, f"{name} is not a positive integer")


def _check_generation(directory, gen: dict, vocab: int) -> None:
    eos = gen.get("eos_token_ids", [])
    if not isinstance(eos, list) or not all(is_int(t) for t in eos):
        raise _fail(directory, "generation.eos_token_ids is not a list of token ids")
    if not isinstance(gen.get("bos_token_id"), (int, type(None))):
        raise _fail(directory, "generation.bos_token_id is not a token id")
    pad = gen.get("pad_token_id")
    if pad is not None and (not is_int(pad) or not 0 <= pad < vocab):  # it pads prompts
        raise _fail(directory, f"generation.pad_token_id is not a token id below {vocab}")
    if not isinstance(gen.get("chat_template"), (str, type(None))):
        raise _fail(directory, "generation.chat_template is not a string")
    special = gen.get("special_tokens", {})
    if not isinstance(special, dict) or not all(
        isinstance(k, str) and k.endswith("_token") and isinstance(v, str)
        for k, v in special.items()
    ):
        raise _fail(directory, "generation.special_tokens is not an object of token strings")


class Manifest(dict):
    """A manifest as read_manifest returns it: `verified` names the files whose checksums it
    checked (a session then loads its native code without hashing it again)."""

    verified: frozenset[str] = frozenset()


def check_native(directory: str | os.PathLike, manifest: dict, rel, what: str) -> Path:
    """The path of native code in the artifact (a library dlopened, a package whose compiled
    kernels load), after checking its size and sha256 against the manifest's files table,
    whether or not the caller checked every file: ArtifactError naming it otherwise."""
    from llmc.artifact import read_manifest, sha256_file

    path = artifact_file(directory, rel, what)
    if "files" not in manifest:  # a build's manifest in memory: the table is the one on disk
        manifest = read_manifest(directory, check_files=False)
    meta = manifest.get("files", {}).get(rel)
    if meta is None:
        raise ArtifactError(
            f"{directory}/{shown(rel)} ({what}, native code) has no checksum in the manifest; "
            f"refusing to load it ({_REBUILD})."
        )
    if rel in getattr(manifest, "verified", ()):
        return path
    if path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
        raise ArtifactError(
            f"{directory}/{shown(rel)} ({what}, native code) does not match its checksum in the "
            f"manifest (modified or corrupt); refusing to load it ({_REBUILD})."
        )
    return path

"""The build stage cache: finished artifacts, traces and quantized weights, kept under
`$LLMC_CACHE/stages` by a key of everything that decides their bytes, with a size cap and
least-recently-used eviction.

An artifact entry is a whole verified artifact (so a hit skips the trace, the passes, the
quantization, the emission and the verification, which ran on the same inputs); a quantized
weight entry is one weight's codes, scales and zeros, reused by any build that quantizes the
same tensor the same way (another target of the same model, a rebuild with other passes); a
trace entry is torch.export's program, reused by builds whose trace-time passes ask for the same
trace (ONNX and TVM share one). What the other passes make is not kept: their rewritten programs
are no longer ones torch.export.save accepts, and they rerun in seconds from a cached trace."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from llmc.artifact import MANIFEST, check_files_match, sha256_file
from llmc.errors import ArtifactError, LlmcError

KINDS = ("artifacts", "trace", "quant")
DEFAULT_MAX_GB = 20.0
USED = ".last_used"  # an artifact entry's marker; its mtime is the entry's last use


def root() -> Path:
    from llmc.compiler.sources import cache_dir

    return cache_dir() / "stages"


def max_bytes() -> int:
    """The cap: `LLMC_CACHE_MAX_GB` (default 20)."""
    raw = os.environ.get("LLMC_CACHE_MAX_GB", str(DEFAULT_MAX_GB))
    try:
        value = float(raw)
    except ValueError:
        raise LlmcError(f"LLMC_CACHE_MAX_GB={raw!r} is not a number; set it to e.g. 20.") from None
    return int(value * 1e9)


_CODE_DIGEST: str | None = None


def code_digest() -> str:
    """A digest of llmc's own source files: a changed pass or emitter is another cache key even
    when the version number is not bumped."""
    global _CODE_DIGEST
    if _CODE_DIGEST is None:
        import llmc

        base = Path(llmc.__file__).resolve().parent.parent
        h = hashlib.sha256()
        for folder in ("llmc", "compiler", "passes", "targets", "runtime"):
            for path in sorted((base / folder).rglob("*.py")):
                h.update(path.relative_to(base).as_posix().encode())
                h.update(path.read_bytes())
        _CODE_DIGEST = h.hexdigest()
    return _CODE_DIGEST


def digest(material) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


def source_fingerprint(source) -> str | None:
    """What the source's bytes are, without loading it: the file (GGUF), every file of the
    directory (weights, config, tokenizer), or the tiny family's name (tiny models are made by
    llmc's own seeded code, in the code digest). None: cannot tell before loading (hub ids)."""
    from llmc.compiler.sources import _dir_weights_sha256

    if source.kind == "tiny":
        return source.ref
    if source.kind in ("gguf", "default"):
        from llmc.compiler.sources import file_sha256

        source.weights_sha256 = source.weights_sha256 or file_sha256(Path(source.ref))
        return source.weights_sha256
    if source.kind == "hf-dir":
        path = Path(source.ref)
        h = hashlib.sha256(_dir_weights_sha256(path).encode())
        for f in sorted(os.listdir(path)):
            if (path / f).is_file() and not f.endswith((".safetensors", ".bin", ".pt")):
                h.update(f.encode())
                sha256_file(path / f, h)
        return h.hexdigest()
    return None


# BuildConfig fields that do not change what is built (where it goes, debugging dumps)
_NOT_IN_KEY = ("out", "dump_after", "dump_dir", "cache", "model", "target")


def artifact_key(config, source, target, passes) -> str | None:
    """The key of a build: the source's bytes, every option that shapes the artifact (and the
    text files it reads), the pass pipeline, llmc's code and the toolchain's versions, the
    target, and this CPU (native code is compiled for it; verification ran on its kernels).
    None when the source cannot be fingerprinted before loading."""
    import dataclasses
    import platform

    from llmc import __version__
    from llmc.host import host_cpu

    fingerprint = source_fingerprint(source)
    if fingerprint is None:
        return None
    options = {}
    for field in dataclasses.fields(config):
        if field.name in _NOT_IN_KEY:
            continue
        value = getattr(config, field.name)
        if field.name in ("calib", "eval_file") and value is not None:
            value = sha256_file(Path(value))
        options[field.name] = value
    return digest(
        {
            "source": [source.kind, fingerprint],
            "options": options,
            "pipeline": [[type(p).__name__, repr(sorted(vars(p).items()))] for p in passes],
            "llmc": [__version__, code_digest()],
            "toolchain": toolchain_versions(target),
            "python": platform.python_version(),
            "target": target.name,
            "host": host_cpu(),
        }
    )


def toolchain_versions(target) -> dict[str, str]:
    from importlib import metadata

    owners = metadata.packages_distributions()
    found = {}
    for module in ("torch", "transformers", "tokenizers", *target.requires, target.runtime):
        for dist in owners.get(module, []):
            try:
                found[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
    return found


@dataclass
class Hit:
    key: str
    path: Path
    manifest: dict


class StageCache:
    def __init__(self, directory: Path | None = None):
        self.root = Path(directory) if directory else root()

    # -- artifacts ------------------------------------------------------------------------------
    def artifact(self, key: str) -> Hit | None:
        """The cached artifact of `key` if it is there and intact (an entry whose files no longer
        match its manifest is dropped)."""
        entry = self.root / "artifacts" / key
        manifest_path = entry / MANIFEST
        if not manifest_path.is_file():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
            check_files_match(entry, manifest)
        except (ValueError, ArtifactError, OSError):
            shutil.rmtree(entry, ignore_errors=True)
            return None
        (entry / USED).touch()
        return Hit(key, entry, manifest)

    def store_artifact(self, key: str, directory: Path, description: dict) -> None:
        """Keep a finished artifact (hard links where the file system allows, else copies)."""
        entry = self.root / "artifacts" / key
        tmp = entry.with_name(f".{key}.tmp-{os.getpid()}")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            link_tree(directory, tmp)
            (tmp / "entry.json").write_text(json.dumps(description, indent=1))
            (tmp / USED).touch()
            shutil.rmtree(entry, ignore_errors=True)
            tmp.rename(entry)
        except OSError:  # a full or read-only cache never fails the build it would speed up
            shutil.rmtree(tmp, ignore_errors=True)
            return
        self.evict()

    # -- traces -----------------------------------------------------------------------------------
    def trace_key(self, source, spec, options, draft_layers) -> str | None:
        """A trace depends on the source, the model spec (context), what the trace-time passes
        asked for, a draft's layer count, llmc's code and torch and transformers."""
        import torch
        import transformers

        fingerprint = source_fingerprint(source)
        if fingerprint is None:
            return None
        return digest(
            [source.kind, fingerprint, spec.to_dict(), repr(options), draft_layers,
             code_digest(), torch.__version__, transformers.__version__]
        )  # fmt: skip

    def trace(self, key: str):
        path = self.root / "trace" / f"{key}.pt2"
        if not path.is_file():
            return None
        import torch

        try:
            program = torch.export.load(path)
        except Exception:  # noqa: BLE001 (a torn or foreign entry is a miss)
            path.unlink(missing_ok=True)
            return None
        os.utime(path)
        return program

    def store_trace(self, key: str, program) -> None:
        import torch

        path = self.root / "trace" / f"{key}.pt2"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{key}.tmp-{os.getpid()}.pt2")
            torch.export.save(program, tmp)
            tmp.replace(path)
        except OSError:
            return
        self.evict()

    # -- quantized weights ----------------------------------------------------------------------
    def has_quantized(self, key: str) -> bool:
        return (self.root / "quant" / f"{key}.pt").is_file()

    def quantized(self, key: str):
        path = self.root / "quant" / f"{key}.pt"
        if not path.is_file():
            return None
        import torch

        try:
            found = torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 (a torn entry is a miss)
            path.unlink(missing_ok=True)
            return None
        os.utime(path)
        return found

    def store_quantized(self, key: str, tensors: dict) -> None:
        import torch

        path = self.root / "quant" / f"{key}.pt"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{key}.tmp-{os.getpid()}")
            torch.save(tensors, tmp)
            tmp.replace(path)
        except OSError:
            return

    # -- listing and eviction -------------------------------------------------------------------
    def entries(self) -> list[dict]:
        """Every entry: kind, key, bytes, last use (seconds since the epoch), description."""
        found = []
        for kind in KINDS:
            folder = self.root / kind
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if path.name.startswith("."):
                    continue
                if path.is_dir():
                    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
                    used = (path / USED).stat().st_mtime if (path / USED).exists() else 0.0
                    info = path / "entry.json"
                    about = json.loads(info.read_text()) if info.is_file() else {}
                else:
                    size, used, about = path.stat().st_size, path.stat().st_mtime, {}
                found.append(
                    {"kind": kind, "key": path.name.split(".")[0], "bytes": size,
                     "last_used": used, "about": about, "path": str(path)}
                )  # fmt: skip
        return sorted(found, key=lambda e: e["last_used"], reverse=True)

    def evict(self, limit: int | None = None) -> list[dict]:
        """Drop least recently used entries until the cache holds at most `limit` bytes."""
        limit = max_bytes() if limit is None else limit
        entries = self.entries()
        total = sum(e["bytes"] for e in entries)
        dropped = []
        for entry in reversed(entries):  # oldest first
            if total <= limit:
                break
            remove(Path(entry["path"]))
            total -= entry["bytes"]
            dropped.append(entry)
        return dropped

    def clear(self, kind: str | None = None) -> int:
        """Remove every entry (of `kind`); return the bytes freed."""
        freed = 0
        for entry in self.entries():
            if kind in (None, entry["kind"]):
                remove(Path(entry["path"]))
                freed += entry["bytes"]
        return freed


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def link_tree(source: Path, destination: Path) -> None:
    """Copy a directory tree, hard-linking files where source and destination share a file
    system (no bytes copied) and copying them where they do not."""
    destination.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.rglob("*")):
        target = destination / path.relative_to(source)
        if path.is_dir():
            target.mkdir(exist_ok=True)
            continue
        if path.name in (USED, "entry.json") and path.parent == source:
            continue
        if path.name == MANIFEST:  # rewritten in place later (cross-checks): never shared
            shutil.copy2(path, target)
            continue
        try:
            os.link(path, target)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            shutil.copy2(path, target)

"""Artifact directories: the manifest (llmc.json), checksums and atomic writing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from llmc.artifact_checks import Manifest, check_structure, inside, is_int, shown
from llmc.errors import ArtifactError
from llmc.interrupts import interrupts_ignored

MANIFEST = "llmc.json"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is kilobytes; more is not one


def sha256_file(path: Path, h=None) -> str:
    """sha256 of a file; with `h`, feed the file into that running hash and return its digest."""
    h = h if h is not None else hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_table(directory: Path) -> dict[str, dict]:
    """Size and sha256 of every file in `directory` except the manifest, by relative path."""
    table = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            rel = path.relative_to(directory).as_posix()
            table[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return table


# What changes from one build of the same thing to the next (when, how long, on which host, cache
# use) lives in this field, left out of the content hash; everything else is reproducible.
BUILD_FIELD = "build"


def content_digest(manifest: dict) -> str:
    """sha256 of the manifest without its `build` field and this hash: with the file table in
    it, two artifacts with the same content digest are the same bytes and the same record."""
    kept = {k: v for k, v in manifest.items() if k not in (BUILD_FIELD, "content_sha256")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def write_manifest(directory: Path, manifest: dict, files: dict | None = None) -> dict:
    """Write llmc.json with the file table (computed unless given) and the content digest;
    return the table."""
    files = files if files is not None else file_table(directory)
    manifest = {**manifest, "format_version": FORMAT_VERSION, "files": files}
    manifest["content_sha256"] = content_digest(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return files


def read_manifest(directory: str | os.PathLike, check_files: bool = True) -> dict:
    """Read and check an artifact's manifest; raise ArtifactError with one actionable line."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"{directory} does not exist; build one with `llmc build`.")
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"{directory} is not an llmc artifact (no {MANIFEST}); build one with `llmc build`."
        )
    inside(directory, MANIFEST, "its manifest")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path} is too large to be a manifest; rebuild the artifact.")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSON, UTF-8 or a number too long to read
        why = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise ArtifactError(f"{path} is not valid JSON ({why}); rebuild the artifact.") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not is_int(version) or version != FORMAT_VERSION:
        raise ArtifactError(
            f"{directory} has artifact format {version if is_int(version) else 'unknown'}, this "
            f"llmc reads format {FORMAT_VERSION}; rebuild it with this llmc."
        )
    check_structure(directory, manifest)
    manifest = Manifest(manifest)
    if check_files:
        check_files_match(directory, manifest)
        manifest.verified = frozenset(manifest.get("files", {}))
    return manifest


def check_files_match(directory: Path, manifest: dict) -> None:
    for rel, meta in manifest.get("files", {}).items():
        path = inside(directory, rel, "a file in its files table")
        if not path.is_file():
            raise ArtifactError(f"{directory} is missing {shown(rel)}; rebuild the artifact.")
        if path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
            raise ArtifactError(
                f"{directory}/{shown(rel)} does not match its checksum (modified or corrupt); "
                "rebuild the artifact."
            )


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; on success rename it into place, otherwise delete it.

    An existing artifact at `final` is replaced only after the new one is complete, in one
    atomic exchange where Linux has it (a reader sees the old artifact or the new one, never
    none); an error before then (a full disk) leaves it as it was.
    """
    final = Path(final).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        with interrupts_ignored():
            _replace(tmp, final)
    except BaseException:  # includes KeyboardInterrupt: nothing half-written stays on disk
        with interrupts_ignored():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(tmp: Path, final: Path) -> None:
    """Put directory `tmp` at `final`; the old `final` (if any) is removed after."""
    if not final.exists():
        tmp.rename(final)
        return
    if _exchange(tmp, final):  # tmp now holds the old artifact
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        old.rename(final)  # the previous artifact back in place
        raise
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without it (glibc < 2.28, musl)
        return False
    at_fdcwd, rename_exchange = -100, 2
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return done == 0

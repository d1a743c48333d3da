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

from llmc.errors import ArtifactError
from llmc.interrupts import interrupts_ignored

MANIFEST = "llmc.json"
FORMAT_VERSION = 1


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


def write_manifest(directory: Path, manifest: dict, files: dict | None = None) -> dict:
    """Write llmc.json with the file table (computed unless given); return the table."""
    files = files if files is not None else file_table(directory)
    manifest = {**manifest, "format_version": FORMAT_VERSION, "files": files}
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
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc.msg}); rebuild the artifact.") from exc
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{directory} has artifact format {version}, this llmc reads format {FORMAT_VERSION}; "
            "rebuild it with this llmc."
        )
    if check_files:
        check_files_match(directory, manifest)
    return manifest


def check_files_match(directory: Path, manifest: dict) -> None:
    for rel, meta in manifest.get("files", {}).items():
        path = directory / rel
        if not path.is_file():
            raise ArtifactError(f"{directory} is missing {rel}; rebuild the artifact.")
        if path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
            raise ArtifactError(
                f"{directory}/{rel} does not match its checksum (modified or corrupt); "
                "rebuild the artifact."
            )


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; on success rename it into place, otherwise delete it.

    An existing artifact at `final` is replaced only after the new one is complete.
    """
    final = Path(final).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:  # includes KeyboardInterrupt: nothing half-written stays on disk
        with interrupts_ignored():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

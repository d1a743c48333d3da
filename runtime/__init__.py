"""The llmc runtime: load any artifact and generate text (imports numpy and tokenizers, never torch)."""

from __future__ import annotations

import os

from llmc.runtime.generator import GenerationConfig, Generator
from llmc.runtime.sampling import SamplingParams

__all__ = ["load", "Generator", "GenerationConfig", "SamplingParams"]


def load(directory: str | os.PathLike, threads: int | None = None, check: bool = True) -> Generator:
    """Open an artifact: check its manifest and checksums, start its target's session."""
    from llmc.artifact import read_manifest
    from llmc.errors import ArtifactError
    from llmc.runtime.tokenizer import Tokenizer
    from llmc.targets import TARGETS

    manifest = read_manifest(directory, check_files=check)
    name = manifest.get("target", {}).get("name")
    info = TARGETS.get(name)
    if info is None or not info.ready:
        raise ArtifactError(f"{directory} was built for target {name!r}, which this llmc cannot run.")
    missing = info.missing()
    if missing:
        raise ArtifactError(f"running a {name} artifact needs {', '.join(missing)}; `{info.install}`.")
    session = info.session_class()(directory, manifest, threads=threads)
    return Generator(session, Tokenizer(directory, manifest["generation"]), manifest)

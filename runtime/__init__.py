"""The llmc runtime: load any artifact and generate text (numpy and tokenizers, never torch)."""

from __future__ import annotations

import os

from llmc.runtime.generator import GenerationConfig, Generator, StepEvent, Usage
from llmc.runtime.sampling import SamplingParams

__all__ = ["load", "Generator", "GenerationConfig", "SamplingParams", "StepEvent", "Usage"]


def load(
    directory: str | os.PathLike,
    threads: int | None = None,
    check: bool = True,
    huge_pages: bool = True,
    **session_options,
) -> Generator:
    """Open an artifact: check its manifest and checksums, load its target's model (once: every
    generation runs on a sequence of its own over the same weights, from any thread).

    huge_pages: back the loaded weights with transparent huge pages where Linux allows it
    (faster decode; see runtime/memory.py). session_options go to the target's session, e.g.
    OpenVINO's `precision="bf16"` or `static_decode=False` (targets/openvino/session.py)."""
    from llmc.artifact import read_manifest
    from llmc.errors import ArtifactError
    from llmc.targets import TARGETS

    manifest = read_manifest(directory, check_files=check)
    name = manifest.get("target", {}).get("name")
    info = TARGETS.get(name)
    if info is None or not info.ready:
        raise ArtifactError(
            f"{directory} was built for target {name!r}, which this llmc cannot run."
        )
    missing = info.missing(for_runtime=True)
    if missing:
        raise ArtifactError(
            f"running a {name} artifact needs {', '.join(missing)}; `{info.install}`."
        )
    _check_toolchain(directory, manifest, info.runtime)
    tokenizer = _tokenizer(directory, manifest)
    model = info.model_class().open(directory, manifest, threads=threads, **session_options)
    if huge_pages:
        from llmc.runtime.memory import use_huge_pages

        use_huge_pages()
    return Generator(model, tokenizer, manifest)


def _tokenizer(directory, manifest: dict):
    """The artifact's tokenizer; one tokenizers cannot read is an ArtifactError."""
    from llmc.artifact_checks import artifact_file, reason
    from llmc.errors import ArtifactError, LlmcError
    from llmc.runtime.tokenizer import Tokenizer

    path = artifact_file(directory, "tokenizer.json", "its tokenizer")
    try:
        return Tokenizer(directory, manifest["generation"])
    except LlmcError:
        raise
    except Exception as exc:  # tokenizers' own errors, on a malformed file
        raise ArtifactError(
            f"{path} cannot be read ({reason(exc)}); rebuild the artifact."
        ) from None


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _check_toolchain(directory, manifest: dict, package: str) -> None:
    """Refuse an artifact built with a newer back-end runtime than the one installed here."""
    from importlib.metadata import PackageNotFoundError, version

    from llmc.errors import ArtifactError

    built = manifest.get("toolchain", {}).get(package)
    if not package or not built:
        return
    try:
        here = version(package)
    except PackageNotFoundError:
        return  # reported as a missing module by load()
    if _version_tuple(here)[:2] < _version_tuple(built)[:2]:
        raise ArtifactError(
            f"{directory} was built with {package} {built} but {here} is installed; "
            f"upgrade it with `pip install -U {package}`."
        )

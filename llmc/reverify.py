"""`llmc verify`: re-run an existing artifact's parity check against its source model."""

from __future__ import annotations

from pathlib import Path

from llmc.errors import ArtifactError


def reverify(directory: Path, tolerance: float | None = None):
    """(llmc's verification, the vendor runtime's record or None): a --compat artifact is also
    run by its vendor's runtime where that is installed (llmc.compat.check_artifact)."""
    from llmc.artifact import read_manifest
    from llmc.compiler import sources
    from llmc.compiler.verify import default_tolerance, verify_artifact
    from llmc.targets import get

    manifest = read_manifest(directory)
    if manifest.get("quantization"):
        raise ArtifactError(
            f"{directory} is quantized: it was verified against its own graph at build time; "
            "rebuild it to verify again."
        )
    recorded = manifest["source"]
    source = sources.resolve(None if recorded["kind"] == "default" else recorded["ref"])
    loaded = sources.load(source)
    if recorded.get("weights_sha256") and source.weights_sha256 != recorded["weights_sha256"]:
        raise ArtifactError(
            f"the source model {recorded['ref']} has changed since {directory} was built; "
            "rebuild the artifact."
        )
    model_class = get(manifest["target"]["name"]).model_class(verify=True)
    tol = tolerance or manifest["verification"].get("tolerance") or default_tolerance(source.kind)
    steps = manifest["verification"].get("decode_steps", 8)
    found = verify_artifact(
        model_class, directory, manifest, loaded.model, loaded.tokenizer, tol, steps
    )
    compat = manifest["target"].get("compat")
    if not compat:
        return found.exact, None
    from llmc.compat import check_artifact

    return found.exact, {"runtime": compat, **check_artifact(compat, directory, manifest, loaded)}

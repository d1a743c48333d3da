"""Error types that map to the CLI's exit codes."""

import errno


class LlmcError(Exception):
    """A user error: bad input, unsupported model, corrupt artifact. Exit code 2.

    The message is one actionable sentence.
    """

    exit_code = 2


class SourceError(LlmcError):
    """The model source cannot be found, read or recognised."""


class UnsupportedModelError(LlmcError):
    """The architecture is not one llmc can trace."""


class TargetError(LlmcError):
    """The target is unknown or its back end is not installed."""


class ArtifactError(LlmcError):
    """The artifact is missing, corrupt or incompatible with this installation."""


class SessionError(LlmcError):
    """A runtime session was used in a way it cannot serve (bad ids, decode before prefill)."""


class ContextLengthError(LlmcError):
    """The input does not fit the artifact's context."""


class VerificationError(Exception):
    """The built artifact does not match PyTorch within tolerance. Exit code 3."""

    exit_code = 3


class QualityGateError(VerificationError):
    """The artifact's perplexity is worse than `--max-ppl-increase` allows. Exit code 3."""


def refused_write(exc: BaseException) -> str | None:
    """One sentence for an OSError the system gave a write (no space, no permission: the user's
    to fix, exit 2), else None."""
    full = (errno.ENOSPC, errno.EDQUOT)
    refused = (*full, errno.EACCES, errno.EROFS, errno.EPERM)
    if not isinstance(exc, OSError) or exc.errno not in refused:
        return None
    where = f" ({exc.filename})" if exc.filename else ""
    fix = "free some space" if exc.errno in full else "choose a location you can write"
    return f"{exc.strerror or exc}{where}; {fix} and retry (nothing half-written was kept)."

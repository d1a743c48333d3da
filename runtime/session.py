"""The Session base class every target's runtime session derives from, its typed options, and
shared position/mask bookkeeping (numpy only; never torch)."""

from __future__ import annotations

import dataclasses
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from llmc.contract import IOContract
from llmc.errors import ContextLengthError, SessionError


@dataclass(frozen=True)
class SessionOptions:
    """Options every target's session takes; a target's `Options` subclass adds its own.

    threads: intra-op threads (None: the back end's default, all cores).
    exact: quantized matmuls computed exactly as the llmc ops define them (what verification
        compares with the graph), instead of the target's faster kernels, if it has any."""

    threads: int | None = None
    exact: bool = False


class Session(ABC):
    """One batch of sequences on one loaded artifact: prefill a prompt batch, then decode one
    token per row at a time, or score one sequence. numpy in, numpy out.

    The public methods check what a caller passes and raise SessionError (an LlmcError: the CLI
    exits 2 with its sentence) for misuse; a target implements the underscored ones.

    fast_kernels: what the default session computes differently from the exact one (None: the
        same kernels); the build measures and records its distance. fast_prompts: whether
        prompts and scoring run on those kernels too (else only decode steps do)."""

    Options: ClassVar[type[SessionOptions]] = SessionOptions
    fast_kernels: str | None = None
    fast_prompts: bool = False

    def __init__(self, directory: str | os.PathLike, manifest: dict, options=None):
        self.directory = Path(directory)
        self.options = options if options is not None else self.Options()
        self.io = IOContract.from_manifest(manifest)
        self.max_context = self.io.max_context
        self.vocab_size = int(manifest["model"]["vocab_size"])
        self._rows: int | None = None  # rows of the live batch (None: nothing prefilled)

    @classmethod
    def open(cls, directory: str | os.PathLike, manifest: dict, **options) -> Session:
        """A session with options by keyword, each checked against this target's Options."""
        names = [f.name for f in dataclasses.fields(cls.Options)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise SessionError(
                f"unknown session option {', '.join(unknown)}; this target takes: "
                f"{', '.join(names)}."
            )
        return cls(directory, manifest, cls.Options(**options))

    # -- the protocol ------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the live sequences (the next call must be prefill or score)."""
        self._rows = None
        self._reset()

    def prefill(self, ids, attention_mask=None) -> np.ndarray:
        """ids [B, S] (left-padded; mask 0 on padding) -> logits of the last position [B, V]."""
        ids = self._check_ids(ids)
        mask = None if attention_mask is None else self._check_mask(attention_mask, ids)
        self.reset()
        logits = self._prefill(ids, mask)
        self._rows = ids.shape[0]
        return logits

    def decode(self, ids) -> np.ndarray:
        """ids [B, 1], one new token per row of the prefilled batch -> logits [B, V]."""
        if self._rows is None:
            raise SessionError("decode() needs a prefill() first: there is no sequence to extend.")
        ids = self._check_ids(ids)
        if ids.shape != (self._rows, 1):
            raise SessionError(
                f"decode() takes one token per row, ids of shape ({self._rows}, 1); got "
                f"{ids.shape}."
            )
        return self._decode(ids)

    def score(self, ids) -> np.ndarray:
        """ids [S] of one sequence, on a fresh cache -> logits at every position [S, V]
        (perplexity). The cache is left holding the sequence."""
        row = np.asarray(ids)
        if row.ndim != 1:
            raise SessionError(f"score() takes one sequence of token ids [S]; got {row.shape}.")
        row = self._check_ids(row[None])[0]
        self.reset()
        logits = self._score(row)
        self._rows = 1
        return logits

    @abstractmethod
    def _reset(self) -> None: ...

    @abstractmethod
    def _prefill(self, ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray: ...

    @abstractmethod
    def _decode(self, ids: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _score(self, ids: np.ndarray) -> np.ndarray: ...

    # -- input checks ------------------------------------------------------------------------
    def _check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 2 or 0 in ids.shape:
            raise SessionError(
                f"token ids must be a non-empty [batch, seq] array; got {ids.shape}."
            )
        if not np.issubdtype(ids.dtype, np.integer):
            raise SessionError(f"token ids must be integers; got {ids.dtype}.")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            bad = int(ids.min() if ids.min() < 0 else ids.max())
            raise SessionError(
                f"token id {bad} is outside the vocabulary (0 to {self.vocab_size - 1})."
            )
        return np.ascontiguousarray(ids, dtype=np.int64)

    @staticmethod
    def _check_mask(mask, ids: np.ndarray) -> np.ndarray:
        mask = np.asarray(mask)
        if mask.shape != ids.shape or not np.isin(mask, (0, 1)).all():
            raise SessionError(
                f"attention_mask must be 0/1 of the ids' shape {ids.shape}; got {mask.shape}."
            )
        if not mask.any(axis=1).all():
            raise SessionError("every row of a prefill needs at least one unmasked token.")
        return mask.astype(np.int64)


def check_context(needed: int, max_context: int) -> None:
    """ContextLengthError unless `needed` positions fit the artifact's context."""
    if needed > max_context:
        raise ContextLengthError(
            f"the sequence needs {needed} positions but the artifact's context is "
            f"{max_context}; shorten the prompt or lower max_new_tokens."
        )


class PositionTracker:
    """The attention mask and position ids of a left-padded batch as it grows."""

    def __init__(self, max_context: int):
        self.max_context = max_context
        self.mask: np.ndarray | None = None  # [B, T] int64

    def reset(self) -> None:
        self.mask = None

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def extend(self, new_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append the new tokens' mask; return (full mask [B, T], new positions [B, S])."""
        new_mask = new_mask.astype(np.int64)
        check_context(self.length + new_mask.shape[1], self.max_context)
        self.mask = new_mask if self.mask is None else np.concatenate([self.mask, new_mask], 1)
        positions = np.cumsum(self.mask, axis=1) - 1
        positions = np.where(self.mask == 0, 1, positions)  # padding: any valid position
        return self.mask, positions[:, -new_mask.shape[1] :]

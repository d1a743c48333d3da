"""The runtime protocol every target implements: a `Model` (one loaded artifact, shared) and
its `Sequence`s (a batch of rows with its own KV cache: prefill, extend, truncate, decode,
score), and the typed options (numpy only; never torch). Caches of left-padded rows share
their bookkeeping in runtime/padded.py."""

from __future__ import annotations

import dataclasses
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from llmc.contract import IOContract, Logits
from llmc.errors import ContextLengthError, SessionError


@dataclass(frozen=True)
class SessionOptions:
    """Options every target's session takes; a target's `Options` subclass adds its own.

    threads: intra-op threads (None: the back end's default, all cores).
    exact: quantized matmuls computed exactly as the llmc ops define them (what verification
        compares with the graph), instead of the target's faster kernels, if it has any.
    spin: let idle worker threads spin, waiting for the next step (onnxruntime; back-to-back
        steps start sooner: int8 SmolLM2 decodes 20% faster). A draft model is opened without:
        its spinning threads take the cores of the model it drafts for (13% slower decode)."""

    threads: int | None = None
    exact: bool = False
    spin: bool = True


class Model(ABC):
    """One loaded artifact: its weights and compiled sessions, loaded once and read-only, so
    one model is safe to share between threads. Its `sequence()`s hold what changes (KV cache,
    positions, bindings): any number of them run on one copy of the weights.

    fast_kernels: what the default model computes differently from the exact one (None: the
        same kernels); the build measures and records its distance. fast_prompts: whether
        prompts and scoring run on those kernels too (else only decode and short extend steps
        do)."""

    Options: ClassVar[type[SessionOptions]] = SessionOptions
    form: str = "default"  # which form of the artifact this model runs (verification records it)
    fast_kernels: str | None = None
    fast_prompts: bool = False
    spins: ClassVar[bool] = False  # whether options.spin changes anything

    def __init__(self, directory: str | os.PathLike, manifest: dict, options=None):
        self.directory = Path(directory)
        self.options = options if options is not None else self.Options()
        self.io = IOContract.from_manifest(manifest)
        self.max_context = self.io.max_context
        self.vocab_size = int(manifest["model"]["vocab_size"])

    @classmethod
    def open(cls, directory: str | os.PathLike, manifest: dict, **options) -> Model:
        """A model with options by keyword, each checked against this target's Options."""
        names = [f.name for f in dataclasses.fields(cls.Options)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise SessionError(
                f"unknown session option {', '.join(unknown)}; this target takes: "
                f"{', '.join(names)}."
            )
        return cls(directory, manifest, cls.Options(**options))

    @abstractmethod
    def sequence(self) -> Sequence:
        """A new, empty sequence (batch of rows) on this model."""

    def check_io(self, inputs, outputs: dict, what: str) -> None:
        """ArtifactError unless the loaded model takes only inputs the runtime feeds (the
        manifest's contract), gives the outputs it reads, and logits over the manifest's
        vocabulary. outputs: name -> shape (entries None or a name where it is dynamic)."""
        from llmc.errors import ArtifactError

        missing = sorted(set(inputs) - set(self.io.inputs)) + sorted(
            set(self.io.outputs) - set(outputs)
        )
        vocab = (outputs.get("logits") or [None])[-1]
        if missing or (isinstance(vocab, int) and vocab != self.vocab_size):
            why = f"{', '.join(missing)} unmatched" if missing else f"vocabulary {vocab}"
            raise ArtifactError(
                f"the manifest of {self.directory} does not describe {what} ({why}); rebuild "
                "the artifact."
            )

    def other_forms(self) -> dict[str, dict]:
        """Other forms the same artifact runs in (name -> the options that load it so), which a
        build verifies too: where this model runs a rewrite of the file other runtimes load."""
        return {}

    def prepare_batching(self) -> None:  # noqa: B027 (optional: most targets need nothing)
        """Get ready for a batch whose rows come and go (compile what its steps need now, not
        on the first step a client waits for)."""


class Sequence(ABC):
    """One batch of rows on a loaded model, with its own KV cache: prefill a prompt batch, then
    extend every row by S tokens (S = 1: a decode step), roll rows back with `truncate`, or score
    one row. numpy in, numpy out.

    The public methods check what a caller passes and raise SessionError (an LlmcError: the CLI
    exits 2 with its sentence) for misuse; a target implements the underscored ones."""

    def __init__(self, model: Model):
        self.model = model
        self.max_context = model.max_context
        self.vocab_size = model.vocab_size
        self._rows: int | None = None  # rows of the live batch (None: nothing prefilled)

    @property
    def extend_sizes(self) -> tuple[int, ...] | None:
        """The token counts a one-row `extend` runs at without padding, where a target pads
        short extend steps to a few fixed sizes (a speculative step then drafts up to one of
        them: the padding costs as much as drafted tokens); None: any count."""
        return None

    @property
    def lengths(self) -> np.ndarray:
        """Tokens in each row's cache [B] (empty before a prefill)."""
        return np.zeros(0, np.int64) if self._rows is None else self._lengths()

    # -- the protocol ------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the live rows (the next call must be prefill or score)."""
        self._rows = None
        self._reset()

    def prefill(self, ids, attention_mask=None) -> np.ndarray:
        """ids [B, S] (left-padded; mask 0 on padding) -> logits of the last position [B, V]."""
        ids = self._check_ids(ids)
        mask = None if attention_mask is None else self._check_mask(attention_mask, ids)
        self.reset()
        logits = self._extend(ids, mask, last_only=True)[:, -1]
        self._rows = ids.shape[0]
        return logits

    def decode(self, ids) -> np.ndarray:
        """ids [B, 1], one new token per row of the prefilled batch -> logits [B, V]."""
        ids = self._check_live(ids, "decode")
        if ids.shape[1] != 1:
            raise SessionError(
                f"decode() takes one token per row, ids of shape ({self._rows}, 1); got "
                f"{ids.shape}."
            )
        return self._extend(ids, None, last_only=True)[:, -1]

    def step(self, last: np.ndarray) -> np.ndarray:
        """The token loop's decode step: `last` [B] int64, one token per live row, made by the
        caller -> logits [B, V], which may be the sequence's own output buffer, valid until its
        next step. decode() without its checks and its copy: around a SmolLM2 decode step of
        8 ms, Python spent 0.4 ms, each operation slowed by caches the weights had just swept."""
        return self._extend(last[:, None], None, last_only=True)[:, -1]

    def extend(self, ids, last_only: bool = False) -> np.ndarray:
        """ids [B, S]: S new tokens for every row of the live batch -> logits of each [B, S, V]
        (with last_only, of the last [B, 1, V]). Short S runs on the decode kernels (verifying
        drafted tokens), long S as a prefill."""
        ids = self._check_live(ids, "extend")
        check_context(int(self._lengths().max()) + ids.shape[1], self.max_context)
        if not last_only:
            self._check_every_position("extend() by several tokens (speculative decoding)")
        return self._extend(ids, None, last_only=last_only)

    def truncate(self, lengths) -> None:
        """Roll each row's cache back to its first `lengths[b]` tokens (a rejected draft)."""
        if self._rows is None:
            raise SessionError("truncate() needs a prefill() first: there is nothing to cut.")
        held = self._lengths()
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if lengths.shape != held.shape or (lengths < 1).any() or (lengths > held).any():
            raise SessionError(
                f"truncate() takes one length per row, from 1 to what the row holds "
                f"({held.tolist()}); got {lengths.tolist()}."
            )
        if (lengths < held).any():
            self._truncate(lengths)

    def add(self, prompts) -> np.ndarray:
        """Prefill new rows (one list of token ids each) after the live ones, which keep their
        caches: continuous batching, where requests join a running batch between steps ->
        logits of each new row's last position [n, V]. The new rows come last, in order."""
        rows = [self._check_ids(np.asarray(p).reshape(1, -1))[0] for p in prompts]
        if not rows:
            raise SessionError("add() takes at least one prompt.")
        if self._rows is None:
            ids, mask = left_pad(rows)
            return self.prefill(ids, mask)
        logits = self._add(rows)
        self._rows += len(rows)
        return logits

    def remove(self, rows) -> None:
        """Drop rows (indices into the live batch) and free their cache; the rows after them
        move up, in order. Removing every row resets the sequence."""
        if self._rows is None:
            raise SessionError("remove() needs live rows; there are none.")
        drop = np.unique(np.asarray(rows, dtype=np.int64).reshape(-1))
        if drop.size and (drop.min() < 0 or drop.max() >= self._rows):
            raise SessionError(f"remove() takes rows 0 to {self._rows - 1}; got {drop.tolist()}.")
        keep = np.setdiff1d(np.arange(self._rows), drop)
        if keep.size == 0:
            self.reset()
            self._release()
        elif keep.size < self._rows:
            self._remove(keep)
            self._rows = int(keep.size)

    def keep_rollback(self, steps: int) -> None:  # noqa: B027 (a KV cache rolls back anywhere)
        """Be ready to roll back up to `steps` steps (a recurrent state keeps what that needs;
        runtime/recurrent.py)."""

    @property
    def kv_bytes(self) -> int:
        """Bytes of KV cache this sequence holds now (what is allocated, padding included)."""
        return 0 if self._rows is None else self._kv_bytes()

    def score(self, ids) -> np.ndarray:
        """ids [S] of one sequence, on a fresh cache -> logits at every position [S, V]
        (perplexity). The cache is left holding the sequence."""
        try:
            row = np.asarray(ids)
        except (ValueError, TypeError, OverflowError):  # ragged, or values numpy cannot hold
            row = None
        if row is None or row.ndim != 1:
            shape = "" if row is None else f"; got {row.shape}"
            raise SessionError(f"score() takes one sequence of token ids [S]{shape}.")
        row = self._check_ids(row[None])
        self._check_every_position("score() (perplexity)")
        self.reset()
        logits = self._extend(row, None, last_only=False)[0]
        self._rows = 1
        return logits

    @abstractmethod
    def _reset(self) -> None: ...

    @abstractmethod
    def _extend(self, ids: np.ndarray, mask: np.ndarray | None, last_only: bool) -> np.ndarray:
        """ids [B, S] after what the cache holds (nothing after a reset: a prefill, with `mask`
        marking left padding) -> logits [B, 1 if last_only else S, V]."""

    @abstractmethod
    def _truncate(self, lengths: np.ndarray) -> None: ...

    @abstractmethod
    def _lengths(self) -> np.ndarray: ...

    @abstractmethod
    def _add(self, rows: list[np.ndarray]) -> np.ndarray:
        """Prefill `rows` (token ids [S_i] each) as new rows after the live ones -> [n, V]."""

    @abstractmethod
    def _remove(self, keep: np.ndarray) -> None:
        """Keep only rows `keep` (sorted indices, at least one), in that order."""

    @abstractmethod
    def _kv_bytes(self) -> int: ...

    def _release(self) -> None:  # noqa: B027 (optional: most targets hold nothing more)
        """Free what a reset sequence still holds for reuse (its rows all left)."""

    # -- input checks ------------------------------------------------------------------------
    def _check_live(self, ids, call: str) -> np.ndarray:
        if self._rows is None:
            raise SessionError(f"{call}() needs a prefill() first: there is no sequence to extend.")
        ids = self._check_ids(ids)
        if ids.shape[0] != self._rows:
            raise SessionError(
                f"{call}() takes tokens for each of the {self._rows} rows; got ids of shape "
                f"{ids.shape}."
            )
        return ids

    def _check_every_position(self, what: str) -> None:
        """SessionError if the artifact computes logits for the last position only."""
        if self.model.io.logits is Logits.LAST:
            raise SessionError(
                f"{self.model.directory} computes logits for the last position only (a --compat "
                f"build, or one from before logits_index), so it cannot run {what}; build it "
                "without --compat for that."
            )

    def _check_ids(self, ids) -> np.ndarray:
        try:
            ids = np.asarray(ids)
        except (ValueError, TypeError, OverflowError):  # ragged rows, values numpy cannot hold
            raise SessionError("token ids must be a [batch, seq] array of integers.") from None
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
        try:
            mask = np.asarray(mask)
        except (ValueError, TypeError, OverflowError):
            raise SessionError(
                f"attention_mask must be 0/1 of the ids' shape {ids.shape}."
            ) from None
        if mask.shape != ids.shape or not np.isin(mask, (0, 1)).all():
            raise SessionError(
                f"attention_mask must be 0/1 of the ids' shape {ids.shape}; got {mask.shape}."
            )
        if not mask.any(axis=1).all():
            raise SessionError("every row of a prefill needs at least one unmasked token.")
        return mask.astype(np.int64)


def left_pad(rows: list[np.ndarray], pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of token ids as one left-padded batch: (ids [B, S], mask [B, S])."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :], mask[b, width - len(row) :] = row, 1
    return ids, mask


def token_bytes(cache) -> int:
    """Bytes one position of one row takes in the KV cache (every layer's key and value)."""
    return 2 * cache.layers * cache.kv_heads * cache.head_dim * np.dtype(cache.dtype).itemsize


def check_context(needed: int, max_context: int) -> None:
    """ContextLengthError unless `needed` positions fit the artifact's context."""
    if needed > max_context:
        raise ContextLengthError(
            f"the sequence needs {needed} positions but the artifact's context is "
            f"{max_context}; shorten the prompt or lower max_new_tokens."
        )

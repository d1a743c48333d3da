"""Calibration text for GPTQ/AWQ: windows of tokens spread over a text, and what the manifest
records of them. The default text ships inside the package (data/calibration.txt, written for
llmc), so an installed llmc calibrates anywhere; pass `--calib FILE` for text like your own."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llmc.errors import LlmcError

DEFAULT_TEXT = Path(__file__).resolve().parent / "data" / "calibration.txt"


@dataclass
class Calibration:
    file: str
    sha256: str
    samples: int
    seqlen: int
    rows: list = field(repr=False, default_factory=list)  # token tensors [seqlen], not recorded

    def record(self) -> dict:
        """The manifest's entry: what was used, never the tokens themselves."""
        return {"file": self.file, "sha256": self.sha256, "samples": self.samples,
                "seqlen": self.seqlen}  # fmt: skip


def calibration(
    path: Path | None, tokenizer, samples: int, seqlen: int, max_context: int
) -> Calibration:
    """`samples` windows of `seqlen` tokens (at most the context), spread evenly over the text
    at `path` (None: the shipped text)."""
    import torch

    from llmc.artifact import sha256_file

    path = Path(path) if path else DEFAULT_TEXT
    if not path.is_file():
        raise LlmcError(f"--calib {path} is not a file; pass a UTF-8 text file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LlmcError(f"--calib {path} is not UTF-8 text; pass a plain text file.") from None
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"])
    seqlen = min(seqlen, max_context, len(ids))
    if seqlen < 8:
        raise LlmcError(f"--calib {path} is too short; pass a text of a few hundred words.")
    count = min(samples, len(ids) // seqlen)
    starts = torch.linspace(0, len(ids) - seqlen, count).long().tolist()
    rows = [ids[s : s + seqlen] for s in starts]
    return Calibration(path.name, sha256_file(path), count, seqlen, rows)

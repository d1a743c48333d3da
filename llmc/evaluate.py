"""`llmc eval` and `llmc build --eval`: perplexity of an artifact on a text file, and the quality
gate that compares it with the fp32 PyTorch model on the same windows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from llmc.artifact import sha256_file
from llmc.config import BuildConfig
from llmc.errors import LlmcError

DEFAULT_WINDOW = 512
DEFAULT_MAX_TOKENS = BuildConfig.eval_tokens  # of the text; 0 scores all of it


def text_tokens(path: Path, encode: Callable[[str], list[int]], max_tokens: int) -> np.ndarray:
    """The file's tokens (the first `max_tokens`; 0: all), with a clear error for a bad file."""
    path = Path(path)
    if not path.is_file():
        raise LlmcError(f"{path} is not a file; pass a UTF-8 text file to score.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LlmcError(f"{path} is not UTF-8 text; pass a plain text file.") from exc
    ids = np.asarray(encode(text), dtype=np.int64)
    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise LlmcError(f"{path} has fewer than two tokens; pass a longer text.")
    return ids


def window_sizes(max_context: int, window: int | None, stride: int | None) -> tuple[int, int]:
    window = min(window or DEFAULT_WINDOW, max_context)
    stride = stride or max(1, window // 2)
    if window < 2 or not 0 < stride <= window:
        raise LlmcError(
            f"--window {window} / --stride {stride}: need a window of at least 2 and "
            "0 < stride <= window."
        )
    return window, stride


DECODE_CHECK_TOKENS = 1024  # of the --eval text, scored on both paths by a quantized build's gate


class DecodeScorer:
    """`score(ids) -> logits [S, V]` through the decode path: the first token as a prompt of one,
    then one decode step per token, teacher-forced (the kernels that generate text; a prompt's
    multi-row steps may run other ones)."""

    def __init__(self, sequence):
        self.sequence = sequence
        self.max_context = sequence.max_context

    def score(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        rows = [self.sequence.prefill(ids[None, :1])[0]]
        for token in ids[1:]:
            rows.append(self.sequence.decode(np.array([[token]], dtype=np.int64))[0])
        return np.stack(rows)

    def reset(self) -> None:
        self.sequence.reset()


def evaluate_session(
    session,
    encode: Callable[[str], list[int]],
    path: Path,
    window: int | None = None,
    stride: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    progress: Callable[[int, int], None] | None = None,
    reference=None,
) -> dict:
    """Perplexity of `path` under a session (any target): the manifest's `evaluation` entry.
    `reference` (anything with `score`, e.g. TorchScorer) is scored on the same windows; its
    perplexity goes under "reference_perplexity"."""
    from llmc.runtime.perplexity import perplexity

    ids = text_tokens(path, encode, max_tokens)
    window, stride = window_sizes(session.max_context, window, stride)
    result = perplexity(session.score, ids, window, stride, progress)
    session.reset()
    entry = {"file": Path(path).name, "sha256": sha256_file(Path(path)), **result.to_dict()}
    if reference is not None:
        entry["reference_perplexity"] = perplexity(reference.score, ids, window, stride).perplexity
    return entry


def evaluate_artifact(
    directory: Path,
    path: Path,
    threads: int | None = None,
    exact: bool = False,
    scoring: str = "prefill",
    **kwargs,
) -> dict:
    """`scoring`: "prefill" scores each window in one step; "decode" one token per step."""
    import llmc.runtime as rt

    gen = rt.load(directory, threads=threads, exact=exact)
    encode = gen.tokenizer.encode
    sequence = gen.model.sequence()
    if scoring == "decode":
        sequence = DecodeScorer(sequence)
    return {**evaluate_session(sequence, encode, path, **kwargs), "path": scoring}


class TorchScorer:
    """`score(ids) -> logits [S, V]` of the PyTorch model (the fp32 reference of the gate)."""

    def __init__(self, model):
        self.model = model

    def score(self, ids: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.model(input_ids=torch.as_tensor(ids)[None], use_cache=False)
        return out.logits[0].float().numpy()


# -- llmc build --eval and its quality gate ---------------------------------------------------
def evaluate_build(model_class, directory: Path, manifest: dict, config, model, tokenizer):
    """The artifact's perplexity (its default session: what users run, and what the gate
    judges) and the fp32 PyTorch model's, on the same windows; where the default session
    scores text on fast kernels, the exact kernels' perplexity too."""

    def encode(text: str) -> list[int]:
        return tokenizer(text, verbose=False)["input_ids"]

    def measure(session, reference=None) -> dict:
        tokens = config.eval_tokens
        return evaluate_session(
            session, encode, config.eval_file, max_tokens=tokens, reference=reference
        )

    loaded = model_class.open(directory, manifest)
    ours = measure(loaded.sequence(), TorchScorer(model))
    reference = ours.pop("reference_perplexity")
    entry = {
        **ours,
        "reference": {"engine": "pytorch-fp32", "perplexity": reference},
        "increase": ours["perplexity"] / reference - 1,
        "max_increase": config.max_ppl_increase,
    }
    if loaded.fast_kernels:  # the decode path's kernels may differ from the prompts': the
        # first DECODE_CHECK_TOKENS scored both ways, the worse one judged
        tokens = min(config.eval_tokens or DECODE_CHECK_TOKENS, DECODE_CHECK_TOKENS)
        paths = {
            name: evaluate_session(scorer, encode, config.eval_file, max_tokens=tokens)
            for name, scorer in (
                ("prefill", loaded.sequence()),
                ("decode", DecodeScorer(loaded.sequence())),
            )
        }
        ratio = paths["decode"]["perplexity"] / paths["prefill"]["perplexity"]
        entry["decode_path"] = {
            "tokens": paths["decode"]["tokens"],
            "perplexity": paths["decode"]["perplexity"],
            "prefill_perplexity": paths["prefill"]["perplexity"],
            "increase": entry["perplexity"] * max(ratio, 1.0) / reference - 1,
        }
    if loaded.fast_prompts:
        del loaded
        exact = measure(model_class.open(directory, manifest, exact=True).sequence())["perplexity"]
        entry["exact"] = {"perplexity": exact, "increase": exact / reference - 1}
    return entry


def judged_increase(e: dict) -> float:
    """The increase the gate judges: the worse of the prompt and decode paths."""
    return max(e["increase"], e.get("decode_path", {}).get("increase", e["increase"]))


def describe(e: dict) -> str:
    exact = f"; exact kernels {e['exact']['increase']:+.2%}" if "exact" in e else ""
    if "decode_path" in e:
        d = e["decode_path"]
        exact += f"; decode path {d['increase']:+.2%} (first {d['tokens']} tokens scaled)"
    return (
        f"perplexity {e['perplexity']:.3f} on {e['tokens']} tokens of {e['file']} "
        f"(fp32 PyTorch {e['reference']['perplexity']:.3f}, {e['increase']:+.2%}{exact})"
    )


def quality_gate(evaluation: dict) -> None:
    """Refuse (QualityGateError, exit 3) an artifact past its --max-ppl-increase."""
    from llmc.errors import QualityGateError

    limit = evaluation["max_increase"]
    if limit is not None and judged_increase(evaluation) > limit:
        raise QualityGateError(
            f"{describe(evaluation)} exceeds --max-ppl-increase {limit:.1%}; "
            "nothing was written. Try a gentler --quant, a smaller --group-size, or gptq/awq."
        )

"""Target conformance: every ready target of the registry, each KV-cache variant it registers,
every tiny family at fp32 and a spread of families at int8 and int4. Build, parity with PyTorch,
32 greedy tokens against transformers, a batch equal to its rows, rows joining and leaving a
running batch, perplexity close to PyTorch's,
and clear errors for bad use. A new target joins by being registered (targets/__init__.py),
not by copying a test file."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import llmc.runtime as rt
from llmc.artifact import read_manifest
from llmc.contract import IOContract, KVMode
from llmc.errors import ContextLengthError, SessionError
from llmc.evaluate import TorchScorer, evaluate_session
from llmc.targets import TARGETS
from tests.conftest import TINY_ARCHS
from tests.test_batching import check_join_and_leave
from tests.test_speculative import IDS, check_extend_and_truncate, check_speculative_greedy
from tests.test_tiny_end_to_end import PROMPT, check_batch_equals_rows, hf_greedy

DATA = "../shared/data/tinyshakespeare-dev.txt"
# Targets whose artifacts run here (tensorrt's engine cannot: tests/test_tensorrt.py checks its
# network in onnxruntime instead).
RUNNABLE = {
    name: info
    for name, info in TARGETS.items()
    if info.ready and not info.missing() and not info.missing(for_runtime=True)
}
VARIANTS = [
    pytest.param(name, v.mode, v.passes, id=f"{name}-{v.mode.value}")
    for name, info in RUNNABLE.items()
    for v in info.kv_variants
]
# Quantized on families that differ where quantization meets the graph, its linear layers and
# embeddings: a plain llama with a tied embedding, and phi (biased fused QKV, untied lm_head,
# partial rotary, LayerNorm). Norm and attention variants do not change what is quantized.
QUANT_FAMILIES = ["llama", "phi"]
# The runtime's own checks (batches, extend/truncate, speculative decoding, rows joining and
# leaving, perplexity) run on a spread of families per variant: they exercise the target's
# sequences, which are the same for every family; parity and greedy tokens run on every family.
RUNTIME_FAMILIES = {"llama", "gemma2", "phi", "gpt2", "falcon", "qwen3"}


def _cases(quant: bool) -> list:
    """(arch, target, mode, passes[, quant]) of every build the suite checks: each variant on
    its families and quantization levels (targets/__init__.py's KVVariant)."""
    cases = []
    for name, info in RUNNABLE.items():
        for v in info.kv_variants:
            if quant:
                families, levels = v.quant_families or QUANT_FAMILIES, v.quant_levels
            else:
                families, levels = v.families or TINY_ARCHS, (None,)
            for arch, level in itertools.product(families, levels):
                if level == "int8" and arch != families[0]:
                    continue  # 8 bits run the graph 4 bits do: on the first family only (CI time)
                args = (arch, name, v.mode, v.passes, *([level] if level else []))
                case_id = "-".join([arch, name, v.mode.value, *([level] if level else [])])
                cases.append(pytest.param(*args, id=case_id))
    return cases


PPL_TOKENS = 300


def _build(tiny_artifact, arch: str, target: str, passes: str | None, **more):
    return tiny_artifact(arch, target=target, **({"passes": passes} if passes else {}), **more)


def _check_mode(manifest: dict, mode: KVMode) -> None:
    """The artifact has the variant's KV mode; a shared cache needs llmc attention, so a model
    that keeps its own (falcon: no AttentionInterface) stays concat, as its report says."""
    report = next(r for r in manifest["passes"] if r["name"] == "replace_attention")
    replaced = report["counts"]["attention"] > 0
    want = KVMode.CONCAT if mode is KVMode.SHARED and not replaced else mode
    assert IOContract.from_manifest(manifest).kv_mode is want


def _perplexities(gen, model, tokenizer) -> tuple[float, float]:
    """(the artifact's, PyTorch's) perplexity on the same windows of the dev text."""

    def encode(text):
        return tokenizer(text)["input_ids"]

    result = evaluate_session(
        gen.model.sequence(), encode, DATA, max_tokens=PPL_TOKENS, reference=TorchScorer(model)
    )
    return result["perplexity"], result["reference_perplexity"]


@pytest.mark.parametrize(("arch", "target", "mode", "passes"), _cases(quant=False))
def test_fp32_family(arch, target, mode, passes, tiny_artifact, tiny_model, monkeypatch):
    path = _build(tiny_artifact, arch, target, passes)
    m = read_manifest(path)
    _check_mode(m, mode)
    ver = m["verification"]
    assert ver["passed"] and ver["max_abs_diff"] <= 1e-4 and ver["greedy_agreement"] == 18
    model, tokenizer = tiny_model(arch)
    gen = rt.load(path)
    ids = tokenizer(PROMPT)["input_ids"]
    assert gen.encode(PROMPT) == ids  # the runtime's tokenizer agrees with transformers'
    ours = [int(t[0]) for t in gen.generate_ids([ids], rt.GenerationConfig(32, ignore_eos=True))]
    assert ours == hf_greedy(model, ids, 32)
    # an independent check: a prefill and 4 decode steps against one full eager forward (two
    # of them the token loop's step(), whose logits may be the sequence's buffer: copied)
    seq = gen.model.sequence()
    got = [seq.prefill(np.array([ids]))]
    extra = [5, 17, 42, 99]
    got += [seq.decode(np.array([[t]])) for t in extra[:2]]
    got += [seq.step(np.array([t])).copy() for t in extra[2:]]
    with torch.no_grad():
        full = model(torch.tensor([ids + extra])).logits[0].numpy()
    assert np.abs(np.concatenate(got) - full[len(ids) - 1 :]).max() <= 1e-4
    if arch not in RUNTIME_FAMILIES:
        return
    check_batch_equals_rows(gen)
    # multi-token steps and rollback, and speculative greedy decoding on them
    check_extend_and_truncate(gen, ids)
    usage = check_speculative_greedy(gen, ids, None, monkeypatch)  # drafts partly wrong
    assert 0 < usage.accepted < usage.drafted
    assert check_speculative_greedy(gen, ids, gen, monkeypatch).accepted > 0  # its own draft
    check_join_and_leave(gen)  # continuous batching: rows join and leave a running batch
    ours, reference = _perplexities(gen, model, tokenizer)
    assert abs(ours / reference - 1) <= 1e-5


@pytest.mark.parametrize(("arch", "target", "mode", "passes", "quant"), _cases(quant=True))
def test_quantized_family(
    arch, target, mode, passes, quant, tiny_artifact, tiny_model, monkeypatch
):
    """Verified against its own graph in PyTorch (the lowering is exact); the default session,
    fast kernels included, keeps rows independent and perplexity near fp32's."""
    path = _build(tiny_artifact, arch, target, passes, quant=quant)
    m = read_manifest(path)
    _check_mode(m, mode)
    assert m["quantization"]["bits"] == int(quant[3:])
    ver = m["verification"]
    assert ver["passed"] and ver["reference"] == "pytorch-llmc-graph"
    assert ver["max_abs_diff"] <= 1e-4 and ver["greedy_agreement"] == 18
    model, tokenizer = tiny_model(arch)
    gen = rt.load(path)
    check_batch_equals_rows(gen)
    # speculative greedy: identical on the exact kernels; on the fast ones (top logits rescored
    # at every drafted position), identical up to the first near-tie
    usage = check_speculative_greedy(rt.load(path, exact=True), IDS, None, monkeypatch)
    assert 0 < usage.accepted < usage.drafted
    if gen.model.fast_kernels:
        check_speculative_greedy(gen, IDS, None, monkeypatch, near_tie=5e-3)
    ours, reference = _perplexities(gen, model, tokenizer)
    # random tiny weights: int8 loses almost nothing, round-to-nearest int4 a little more
    assert ours / reference - 1 <= (0.01 if quant == "int8" else 0.05)


@pytest.mark.parametrize(("target", "mode", "passes"), VARIANTS)
def test_clear_errors_for_bad_use(target, mode, passes, tiny_artifact):
    """Misuse a caller can reach is a SessionError (the CLI's exit 2 with its sentence), never
    a back end's own exception."""
    path = _build(tiny_artifact, "llama", target, passes)
    session = rt.load(path).model.sequence()
    vocab = session.vocab_size
    session.reset()
    with pytest.raises(SessionError, match="needs a prefill"):
        session.decode(np.array([[1]]))
    with pytest.raises(SessionError, match=f"token id {vocab} is outside the vocabulary"):
        session.prefill(np.array([[1, vocab]]))
    with pytest.raises(SessionError, match="token id -1 is outside"):
        session.prefill(np.array([[-1, 2]]))
    with pytest.raises(SessionError, match="must be integers"):
        session.prefill(np.array([[1.0, 2.0]]))
    with pytest.raises(SessionError, match=r"non-empty \[batch, seq\]"):
        session.prefill(np.array([1, 2, 3]))
    with pytest.raises(SessionError, match="at least one unmasked token"):
        session.prefill(np.array([[1, 2], [3, 4]]), np.array([[1, 1], [0, 0]]))
    session.prefill(np.array([[1, 2], [3, 4]]))
    with pytest.raises(SessionError, match=r"tokens for each of the 2 rows; got .*\(1, 1\)"):
        session.decode(np.array([[1]]))
    with pytest.raises(SessionError, match=r"one token per row, ids of shape \(2, 1\)"):
        session.decode(np.array([[1, 2], [3, 4]]))
    with pytest.raises(SessionError, match="one sequence of token ids"):
        session.score(np.array([[1, 2]]))
    with pytest.raises(SessionError, match="unknown session option colour"):
        rt.load(path, colour="blue")
    gen = rt.load(path)
    too_long = "word " * (gen.model.max_context + 8)
    with pytest.raises(ContextLengthError, match="shorten the prompt"):
        gen.generate(too_long, max_new_tokens=4)
    # after all that, the session still works
    assert session.prefill(np.array([[1, 2, 3]])).shape == (1, vocab)

"""Strided-window perplexity: every token scored once, and the number PyTorch's own loss gives."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llmc.evaluate import TorchScorer
from llmc.runtime.perplexity import perplexity, windows


@pytest.mark.parametrize(
    ("n", "window", "stride"), [(10, 4, 2), (5, 8, 4), (1000, 512, 256), (33, 7, 7)]
)
def test_windows_score_every_token_once(n, window, stride):
    scored = []
    for begin, end, first in windows(n, window, stride):
        assert end - begin <= window and begin < first < end
        assert first - begin >= min(window - stride, first), "too little context"
        scored += range(first, end)
    assert scored == sorted(set(scored))  # once each
    if stride < window:
        assert scored == list(range(1, n))
    else:  # disjoint windows: all but each window's first token
        assert len(scored) == n - len(range(0, n, stride))


def test_one_window_equals_pytorch_loss(tiny_model):
    model, _ = tiny_model("llama")
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, 40)
    scorer = TorchScorer(model)
    ours = perplexity(scorer.score, ids, window=64, stride=32)
    with torch.no_grad():
        loss = model(input_ids=torch.tensor(ids)[None], labels=torch.tensor(ids)[None]).loss
    assert ours.tokens == 39 and ours.windows == 1
    assert math.isclose(ours.perplexity, math.exp(float(loss)), rel_tol=1e-5)


def test_onnx_session_scores_like_pytorch(tiny_artifact, tiny_model):
    import llmc.runtime as rt

    model, _ = tiny_model("llama")
    gen = rt.load(tiny_artifact("llama"))
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, 300)
    ours = perplexity(gen.model.sequence().score, ids, window=128, stride=64)
    ref = perplexity(TorchScorer(model).score, ids, window=128, stride=64)
    assert ours.windows == ref.windows == 4
    assert math.isclose(ours.perplexity, ref.perplexity, rel_tol=1e-5)

"""The model/sequence runtime and speculative decoding: multi-token extend and rollback against
step-by-step decoding, greedy speculative output equal to plain greedy output, the rejection
rule's output distribution (seeded, with enough draws to fail if it were wrong), drafts built
from the first layers of a model, and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import llmc.runtime as rt
from llmc.artifact import read_manifest
from llmc.cli import cli
from llmc.errors import LlmcError, SessionError
from llmc.runtime.drafters import PromptLookup
from llmc.runtime.sampling import Sampler, SamplingParams
from llmc.runtime.speculative import Draft, DraftPolicy, StepClock, verify_row

VARIANTS = [("onnx", None), ("onnx", "-rewire_kv_cache"), ("openvino", None)]
IDS = [1, 5, 9, 23, 5, 9, 23, 7, 5, 9, 40, 41, 42, 5, 9, 23]  # repeats: prompt lookup finds them


def check_extend_and_truncate(gen, ids: list[int], tolerance: float = 1e-4) -> None:
    """extend(S tokens) gives the logits S decode steps give; truncate rolls back to them."""
    extra = np.array([[5, 17, 42, 99]])
    seq, ref = gen.model.sequence(), gen.model.sequence()
    seq.prefill(np.array([ids]))
    ref.prefill(np.array([ids]))
    extended = seq.extend(extra)[0]
    stepped = np.stack([ref.decode(extra[:, i : i + 1])[0] for i in range(4)])
    assert extended.shape == stepped.shape and np.abs(extended - stepped).max() <= tolerance
    seq.truncate([len(ids) + 1])  # keep the first of the four
    assert seq.lengths.tolist() == [len(ids) + 1]
    again = seq.extend(np.array([[17, 42]]))[0]
    assert np.abs(again - stepped[1:3]).max() <= tolerance
    assert seq.lengths.tolist() == [len(ids) + 3]


class OracleDrafter:
    """Drafts the plain greedy continuation with every `wrong`-th drafted token changed: drafts
    are accepted up to a wrong token, so verification and rollback run at every offset."""

    cost = 0.0

    def __init__(self, prompt: list[int], continuation: list[int], wrong: int = 3):
        self.text, self.wrong, self.count = prompt + continuation, wrong, 0

    def start(self, prompts):
        pass

    def propose(self, histories, ks, sampler):
        drafts = []
        for history, k in zip(histories, ks, strict=True):
            tokens = np.array(self.text[len(history) : len(history) + k], np.int64)
            for i in range(len(tokens)):
                self.count += 1
                if self.count % self.wrong == 0:
                    tokens[i] = (tokens[i] + 1) % 50
            drafts.append(Draft(tokens))
        return drafts

    def commit(self, accepted):
        pass


def _margins(gen, ids: list[int], tokens: list[int]) -> np.ndarray:
    """The gap between the best and second-best logit at each plain decode step."""
    seq = gen.model.sequence()
    logits = [seq.prefill(np.array([ids]))[0]]
    logits += [seq.decode(np.array([[t]]))[0] for t in tokens[:-1]]
    top2 = np.sort(np.stack(logits), axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def check_speculative_greedy(
    gen, ids: list[int], draft, monkeypatch, n: int = 32, near_tie: float = 0.0
) -> dict:
    """Greedy output with drafts (drafting as much as allowed) is plain greedy output. draft
    None: an OracleDrafter of that output. near_tie > 0 (fast int8 kernels, whose activation
    rounding makes a multi-token step differ from single steps; a tiny model's greedy text
    flipped at a gap of 4e-3): identical
    up to the first step whose two best logits are closer than that."""
    plain = [e.token for e in gen.events(ids, max_new_tokens=n, ignore_eos=True)]
    draft = draft or OracleDrafter(ids, plain)
    with monkeypatch.context() as patch:
        patch.setattr(DraftPolicy, "choose", lambda self: self.limit)
        events = list(gen.events(ids, max_new_tokens=n, ignore_eos=True, draft=draft, num_draft=3))
    upto = n
    if near_tie:
        upto = int(np.argmax(np.append(_margins(gen, ids, plain) < near_tie, True)))
    assert [e.token for e in events][:upto] == plain[:upto]
    usage = events[-1].usage
    assert usage.completion_tokens == n and usage.steps == n - 1 - usage.accepted
    return usage


@pytest.mark.parametrize(("target", "passes"), VARIANTS)
def test_rows_roll_back_independently(target, passes, tiny_artifact):
    """Two left-padded rows extended together and cut to different lengths continue exactly as
    each row alone: the mask-tracked caches (concat, stateful) and the shared buffers."""
    gen = rt.load(tiny_artifact("llama", target=target, passes=passes))
    rows = [[3, 8, 12, 19, 4], [6, 2]]
    seq = gen.model.sequence()
    seq.prefill(np.array([rows[0], [0, 0, 0, *rows[1]]]), np.array([[1] * 5, [0, 0, 0, 1, 1]]))
    seq.extend(np.array([[30, 31, 32], [40, 41, 42]]))
    assert seq.lengths.tolist() == [8, 5]
    seq.truncate([6, 5])  # row 0 keeps one drafted token, row 1 all three
    got = seq.extend(np.array([[50, 51], [60, 61]]))
    for row, kept, new in ((0, [30], [50, 51]), (1, [40, 41, 42], [60, 61])):
        alone = gen.model.sequence()
        alone.prefill(np.array([rows[row] + kept]))
        want = alone.extend(np.array([new]))[0]
        assert np.abs(got[row] - want).max() <= 1e-4
    with pytest.raises(SessionError, match="from 1 to what the row holds"):
        seq.truncate([9, 1])
    with pytest.raises(SessionError, match="tokens for each of the 2 rows"):
        seq.extend(np.array([[1, 2]]))
    with pytest.raises(SessionError, match="needs a prefill"):
        gen.model.sequence().truncate([1])


@pytest.mark.parametrize(("target", "passes"), VARIANTS)
def test_speculative_batch_equals_plain_batch(target, passes, tiny_artifact, monkeypatch):
    gen = rt.load(tiny_artifact("llama", target=target, passes=passes))
    prompts = [IDS, IDS[:6], IDS[3:]]
    plain = gen.generate_batch(prompts, max_new_tokens=24, ignore_eos=True)
    with monkeypatch.context() as patch:
        patch.setattr(DraftPolicy, "choose", lambda self: self.limit)
        for draft in ("prompt-lookup", rt.load(gen.model.directory)):
            got = gen.generate_batch(prompts, max_new_tokens=24, ignore_eos=True, draft=draft)
            assert got == plain


def _draws(p: np.ndarray, q: np.ndarray | None, draft_token: int, n: int) -> np.ndarray:
    """The first token verify_row keeps over n seeded trials, as counts per token."""
    sampler = Sampler(SamplingParams(temperature=1.0, seed=7))
    logits = np.log(np.stack([p, p]))  # the target's distribution at the drafted position
    rng = np.random.default_rng(3)
    counts = np.zeros(len(p))
    for _ in range(n):
        x = draft_token if q is None else int(rng.choice(len(q), p=q))
        draft = Draft(np.array([x]), None if q is None else q[None])
        counts[verify_row(logits, draft, np.zeros(0, np.int64), sampler)[0]] += 1
    return counts


def _chi2(counts: np.ndarray, p: np.ndarray) -> float:
    expected = counts.sum() * p
    return float(((counts - expected) ** 2 / expected).sum())


def test_rejection_rule_keeps_the_target_distribution():
    """Accepting a draft x ~ q with probability min(1, p(x)/q(x)) and resampling from
    max(p - q, 0) yields p: a chi-square test on 6000 seeded draws (5 categories; the 0.1%
    critical value is 18.5). The same statistic against q shows the test can tell them apart."""
    p = np.array([0.45, 0.25, 0.15, 0.1, 0.05])
    q = np.array([0.1, 0.1, 0.2, 0.3, 0.3])  # a poor draft model
    counts = _draws(p, q, -1, 6000)
    assert _chi2(counts, p) < 18.5
    assert _chi2(counts, q) > 1000
    onehot = _draws(p, None, 3, 6000)  # prompt lookup: q is one-hot on the drafted token
    assert _chi2(onehot, p) < 18.5
    assert onehot[3] / 6000 == pytest.approx(0.1, abs=0.02)  # not "always accept"


def test_sampled_speculative_tokens_follow_the_model(tiny_artifact, monkeypatch):
    """End to end with a draft of other weights (the first layer only): the second token,
    the first one verified, is distributed as the model's next-token distribution after the
    first (chi-square over the most frequent first token's continuations; top-k 5)."""
    gen = rt.load(tiny_artifact("llama"))
    draft = rt.load(tiny_artifact("llama", draft_layers=1))
    params = {"temperature": 1.0, "top_k": 5, "max_new_tokens": 3, "ignore_eos": True}
    monkeypatch.setattr(DraftPolicy, "choose", lambda self: self.limit)
    pairs, drafted = [], 0
    for seed in range(20):
        events = list(gen.events_batch([IDS] * 60, draft=draft, num_draft=2, seed=seed, **params))
        pairs += [(a.token, b.token) for a, b in zip(events[0], events[1], strict=True)]
        drafted += sum(e.usage.drafted for step in events for e in step if e and e.usage)
    assert drafted >= 1200  # every row verified a drafted second token
    firsts = [a for a, _ in pairs]
    first = max(set(firsts), key=firsts.count)
    seconds = [b for a, b in pairs if a == first]
    logits = gen.model.sequence().prefill(np.array([IDS + [first]]))[0]
    p = Sampler(SamplingParams(temperature=1.0, top_k=5)).distribution(logits, np.zeros(0, int))
    support = np.flatnonzero(p)
    counts = np.array([seconds.count(t) for t in support])
    assert counts.sum() == len(seconds) >= 300
    assert _chi2(counts, p[support]) < 18.5  # 4 degrees of freedom, 0.1%


def test_prompt_lookup_drafts_what_followed_the_last_ngram():
    lookup = PromptLookup(max_ngram=3, min_ngram=2)
    assert lookup.lookup(np.array([7, 1, 2, 3, 4, 5, 9, 1, 2]), 3).tolist() == [3, 4, 5]
    assert lookup.lookup(np.array([4, 2, 3, 9, 2, 3]), 2).tolist() == [9, 2]  # trigram missing
    # [1, 2] was followed by 3, 4, 5 and by 3, 8, 1, after contexts that agree with the text's
    # equally little: a guess past the 3 they share, so only the 3 is drafted
    assert lookup.lookup(np.array([7, 1, 2, 3, 4, 5, 9, 1, 2, 3, 8, 1, 2]), 3).tolist() == [3]
    # ... but a longer continuation beats a later one cut short by the text's end, which is no
    # rival either (in a text that repeats itself, such occurrences overlap the tail)
    assert lookup.lookup(np.array([5, 1, 2, 3, 4, 1, 2, 1, 2]), 3).tolist() == [3, 4, 1]
    # a text copying a passage: the occurrence whose preceding tokens agree with the text's for
    # TRUSTED tokens (the place being copied) is drafted in full
    passage = [60, 61, 62, 63, 30, 31, 5, 1, 2, 40, 41, 42, 43, 10, 11, 5, 1, 2, 20, 21, 22, 23]
    copying_first = [*passage, 60, 61, 62, 63, 30, 31, 5, 1, 2]
    assert lookup.lookup(np.array(copying_first), 3).tolist() == [40, 41, 42]
    assert lookup.lookup(np.array([*passage, 42, 43, 10, 11, 5, 1, 2]), 3).tolist() == [20, 21, 22]
    # two places agreeing for TRUSTED tokens each: the latest, as a text repeating itself does
    repeated = [20, 21, 22, 23, 24, 1, 2, 3, 4, 9, 20, 21, 22, 23, 24, 1, 2, 5, 6, 8]
    assert lookup.lookup(np.array([*repeated, 20, 21, 22, 23, 24, 1, 2]), 2).tolist() == [5, 6]
    # ... but two tokens of agreement against none are no evidence (RIVAL): nothing past where
    # they part
    assert lookup.lookup(np.array([*passage, 10, 11, 5, 1, 2]), 3).tolist() == []
    # and where every occurrence continues alike, the draft runs to where one parts
    shared = [9, 1, 2, 3, 4, 5, 8, 1, 2, 3, 4, 6, 7, 1, 2]
    assert lookup.lookup(np.array(shared), 4).tolist() == [3, 4]
    history = np.array([7, 1, 2, 3, 4, 5, 9, 1, 2, 3, 8, 1, 2])
    assert lookup.lookup(np.array([1, 2, 3, 4]), 3).tolist() == []  # no earlier match
    assert lookup.lookup(history, 0).tolist() == []
    # row by row, as the text grows: the index takes each new token once
    lookup.start([[7, 1, 2]])
    assert lookup.propose([np.array([7, 1, 2])], [2], None)[0].tokens.tolist() == []
    grown = np.array([7, 1, 2, 5, 6, 1, 2])
    assert lookup.propose([grown], [2], None)[0].tokens.tolist() == [5, 6]
    assert all(len(starts) == len(set(starts)) for starts in lookup._index[0].values())


def test_policy_stops_drafting_when_drafts_fail_and_probes():
    policy = DraftPolicy(limit=8, clock=StepClock(per_token=0.05))
    assert policy.choose() >= 3  # cheap drafts, a hopeful prior: draft several
    for _ in range(20):
        policy.update(drafted=4, accepted=0)
    # plain decoding, probing after 8 steps times a probe's cost (1.15 decode steps): the 10th
    assert [policy.choose() for _ in range(10)] == [0] * 9 + [1]
    assert policy.choose() == 1  # the drafter had nothing to probe with: again at the next step
    policy.update(drafted=1, accepted=0)  # a failed probe: wait twice as long
    assert [policy.choose() for _ in range(19)] == [0] * 18 + [1]
    expensive = DraftPolicy(limit=8, clock=StepClock(per_token=1.0))  # as slow as the model
    assert expensive.choose() == 1  # the first step probes
    expensive.update(drafted=1, accepted=1)
    assert [expensive.choose() for _ in range(5)] == [0] * 5


def test_policy_drafts_whole_padded_steps():
    """Where a sequence pads short verification steps to 16 tokens, a shorter draft costs as
    much: the policy drafts 15 tokens or none, and probes with 15."""
    policy = DraftPolicy(limit=15, clock=StepClock(per_token=0.05), sizes=(15,))
    assert policy.choose() == 15
    for _ in range(20):
        policy.update(drafted=15, accepted=0)
    picks = []
    for _ in range(60):
        picks.append(policy.choose())
        if picks[-1]:
            policy.update(drafted=15, accepted=0)
    assert set(picks) == {0, 15} and picks.count(15) == 2  # after 8 and 16 steps' worth
    assert DraftPolicy(limit=4, clock=StepClock(per_token=0.05), sizes=(15,)).choose() == 4


def test_step_clock_fits_what_verification_costs():
    clock = StepClock(per_token=0.06)
    clock.plain(0.010)
    for _ in range(30):  # measured: 4 ms of overhead and 2 ms per drafted token
        for k in (2, 5):
            clock.speculative(0.010 + 0.004 + 0.002 * k, k)
    np.testing.assert_allclose(clock.cost(np.array([0, 1, 6])), [1, 1.6, 2.6], atol=0.03)


def test_draft_layers_build_and_cli(tiny_artifact, tmp_path):
    draft = tiny_artifact("llama", draft_layers=1)
    m = read_manifest(draft)
    assert m["source"]["draft"] == {"layers": 1, "of": 2} and m["verification"]["passed"]
    assert m["model"]["num_layers"] == 1
    runner = CliRunner()
    full = str(tiny_artifact("llama"))
    plain = runner.invoke(cli, ["run", full, "Hello there", "-n", "12"])
    for how in ("prompt-lookup", str(draft)):
        result = runner.invoke(cli, ["run", full, "Hello there", "-n", "12", "--draft", how])
        assert result.exit_code == 0 and result.output == plain.output
    result = runner.invoke(cli, ["run", full, "Hi", "--draft", "prompt-lookup", "--stats"])
    assert "drafted tokens accepted" in result.stderr
    bad = runner.invoke(cli, ["run", full, "Hi", "--num-draft", "3"])
    assert bad.exit_code == 2 and "--num-draft needs --draft" in bad.output
    bad = runner.invoke(cli, ["run", full, "Hi", "--draft", "prompt-lookup", "--num-draft", "0"])
    assert bad.exit_code == 2
    out = tmp_path / "too-deep"
    bad = runner.invoke(cli, ["build", "tiny:llama", "--draft-layers", "2", "-o", str(out)])
    assert bad.exit_code == 2 and "pass 1 to 1" in bad.output and not out.exists()
    with pytest.raises(LlmcError, match="draft must be"):
        rt.load(full).generate("Hi", draft=42)
    # a draft's onnxruntime threads do not spin between its steps (they would take the cores of
    # the model it drafts for): a draft loaded with spinning threads is opened again without
    from llmc.runtime.drafters import DraftModel

    spinning = rt.load(draft)
    assert spinning.model.options.spin
    assert DraftModel(spinning, rt.load(full)).model.options.spin is False
    quiet = rt.load(draft, spin=False)
    assert DraftModel(quiet, rt.load(full)).model is quiet.model


def test_batched_speculation_at_the_context_limit(tiny_artifact, monkeypatch):
    """A row that finishes early (its budget, drafted quickly) must not grow its cache while a
    slower row goes on: the batch reaches the context's end without an error, as plainly."""
    gen = rt.load(tiny_artifact("llama", max_context=64))
    prompts = [(IDS * 3)[:40], IDS[:5]]
    plain = gen.generate_batch(prompts, max_new_tokens=100, ignore_eos=True)
    monkeypatch.setattr(DraftPolicy, "choose", lambda self: self.limit)
    for draft in ("prompt-lookup", gen):
        got = gen.generate_batch(prompts, max_new_tokens=100, ignore_eos=True, draft=draft)
        assert got == plain
    with pytest.raises(LlmcError, match="num_draft must be from 1 to 15"):
        gen.generate("Hi", draft="prompt-lookup", num_draft=16)

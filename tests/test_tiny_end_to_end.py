"""The runtime's generation on a tiny artifact: chat templates, seeded sampling, streaming,
stop strings; and the helpers the conformance suite (test_conformance.py) shares."""

from __future__ import annotations

import torch

import llmc.runtime as rt

PROMPT = "What is the capital of France?"


def hf_greedy(model, ids: list[int], n: int, pad_token_id: int = 0) -> list[int]:
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=pad_token_id,
    )
    return out[0, len(ids) :].tolist()


def check_batch_equals_rows(gen) -> list:
    """A left-padded batch of three prompts generates what each prompt does alone; returns the
    batch's tokens."""
    prompts = ["Hello", "Once upon a time there was a lighthouse", "Paris"]
    config = rt.GenerationConfig(12, ignore_eos=True)
    batched = [
        list(map(int, step)) for step in gen.generate_ids([gen.encode(p) for p in prompts], config)
    ]
    for row, p in enumerate(prompts):
        single = [int(t[0]) for t in gen.generate_ids([gen.encode(p)], config)]
        assert [step[row] for step in batched] == single
    return batched


def test_chat_template_matches_transformers(tiny_artifact, tiny_model):
    _, tokenizer = tiny_model("llama")
    gen = rt.load(tiny_artifact("llama"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]
    want = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert gen.tokenizer.apply_chat_template(messages) == want
    want_ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=False
    )
    assert gen.encode(messages) == list(want_ids)


def test_sampling_is_seeded_and_stream_equals_generate(tiny_artifact):
    gen = rt.load(tiny_artifact("llama"))
    kw = dict(max_new_tokens=16, temperature=0.8, top_k=50, top_p=0.9, seed=7)
    first = gen.generate("Hello", **kw)
    assert gen.generate("Hello", **kw) == first
    assert "".join(gen.stream("Hello", **kw)) == first
    assert gen.generate("Hello", **{**kw, "seed": 8}) != first


def test_stop_string_cuts_output(tiny_artifact):
    gen = rt.load(tiny_artifact("llama"))
    full = gen.generate("Hello", max_new_tokens=24, ignore_eos=True)
    stop = full[5:8]
    assert stop and full.find(stop) < len(full)
    cut = gen.generate("Hello", max_new_tokens=24, ignore_eos=True, stop=[stop])
    assert cut == full[: full.find(stop)]


def test_step_events_carry_text_deltas_finish_reasons_and_usage(tiny_artifact):
    """The token loop's events: text deltas that add up to generate()'s text, and a last event
    saying why the sequence ended ("length", "stop", "eos") with its token counts."""
    gen = rt.load(tiny_artifact("llama"))
    prompt_tokens = len(gen.encode("Hello"))
    events = list(gen.events("Hello", max_new_tokens=10, ignore_eos=True))
    assert len(events) == 10 and all(e.finish_reason is None for e in events[:-1])
    last = events[-1]
    assert last.finish_reason == "length"
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (prompt_tokens, 10)
    assert "".join(e.text for e in events) == gen.generate(
        "Hello", max_new_tokens=10, ignore_eos=True
    )
    full = "".join(e.text for e in events)
    stop = full[4:7]
    cut = list(gen.events("Hello", max_new_tokens=10, ignore_eos=True, stop=[stop]))
    assert (
        cut[-1].finish_reason == "stop" and "".join(e.text for e in cut) == full[: full.find(stop)]
    )
    gen.tokenizer.eos_token_ids = [events[2].token]  # the third token now ends the sequence
    ended = list(gen.events("Hello", max_new_tokens=10))
    assert ended[-1].finish_reason == "eos" and ended[-1].usage.completion_tokens == 3
    # the context ends a sequence too: "length", with what fitted
    short = rt.load(tiny_artifact("llama", max_context=24))
    capped = list(short.events("Hello", max_new_tokens=100, ignore_eos=True))
    assert capped[-1].finish_reason == "length" and len(capped) == 24 - prompt_tokens


def test_batch_events_finish_rows_independently(tiny_artifact):
    gen = rt.load(tiny_artifact("llama"))
    alone = [list(gen.events(p, max_new_tokens=8, ignore_eos=True)) for p in ("Hello", "Paris")]
    stop = "".join(e.text for e in alone[0])[2:5]  # the first row stops early
    steps = list(
        gen.events_batch(["Hello", "Paris"], max_new_tokens=8, ignore_eos=True, stop=[stop])
    )
    first = [s[0] for s in steps if s[0] is not None]
    second = [s[1] for s in steps]
    assert first[-1].finish_reason == "stop" and len(first) < 8
    assert all(s[0] is None for s in steps[len(first) :])
    assert [e.token for e in second] == [e.token for e in alone[1]]
    assert second[-1].finish_reason == "length" and second[-1].usage.completion_tokens == 8

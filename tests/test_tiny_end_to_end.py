"""The runtime's generation on a tiny artifact: chat templates, seeded sampling, streaming,
stop strings; and the helpers the conformance suite (test_conformance.py) shares."""

from __future__ import annotations

import torch

import llmc.runtime as rt

PROMPT = "What is the capital of France?"


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
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

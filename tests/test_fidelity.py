"""Build-time tokenizer and chat-template fidelity (llmc/fidelity.py): the runtime tokenizer of an
artifact against transformers', passing on real tokenizers and naming the first difference."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from llmc.cli import cli
from llmc.compiler import tiny
from llmc.errors import VerificationError
from llmc.fidelity import check_tokenizer
from llmc.manifest import generation_defaults

# A Qwen2.5-like template with tools, `tojson`, a loop control and a `{% generation %}` block.
TOOLS_TEMPLATE = """{%- if tools %}<|im_start|>system
{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}Be useful.{% endif %}
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'tool' %}<|im_start|>user
<tool_response>{{ message.content }}</tool_response><|im_end|>
{% elif message.tool_calls is defined %}<|im_start|>assistant
{%- for call in message.tool_calls %}
{%- if loop.index > 4 %}{% break %}{% endif %}
<tool_call>{{ call.function | tojson(indent=2) }}</tool_call>
{%- endfor %}<|im_end|>
{% elif not (tools and message.role == 'system') %}<|im_start|>{{ message.role }}
{% generation %}{{ message.content }}{% endgeneration %}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def _artifact(tmp_path, hf, edit_json=None):
    """Save `hf` as a build does; return the directory and the manifest's generation section."""
    hf.save_pretrained(tmp_path)
    if edit_json is not None:
        path = tmp_path / "tokenizer.json"
        data = json.loads(path.read_text())
        edit_json(data)
        path.write_text(json.dumps(data))
    return tmp_path, generation_defaults(SimpleNamespace(generation_config=None), hf)


def test_tiny_tokenizer_matches(tmp_path):
    hf = tiny.build_tokenizer()
    summary = check_tokenizer(*_artifact(tmp_path, hf), hf)
    assert summary["passed"] and not summary["tools"]
    assert summary["cases"] == {"encode": 34, "decode": 68, "chat": 8}
    assert summary["special_tokens"] == 3 and len(summary["sample_sha256"]) == 64


def test_smollm2_tokenizer_matches(tmp_path):
    """The real SmolLM2 tokenizer (49k BPE, 17 added tokens, a template with a default system
    prompt), from the dequantized copy a SmolLM2 build keeps in the llmc cache."""
    from transformers import AutoTokenizer

    from llmc.artifact import sha256_file
    from llmc.compiler import sources

    try:
        gguf = sources.resolve(None).ref
    except Exception as exc:
        pytest.skip(f"the default SmolLM2 is not installed ({exc})")
    cached = sources.cache_dir() / "gguf" / sha256_file(gguf)[:32]
    if not (cached / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 has not been built here yet (its tokenizer is not in the llmc cache)")
    hf = AutoTokenizer.from_pretrained(cached)
    summary = check_tokenizer(*_artifact(tmp_path, hf), hf)
    assert summary["cases"]["chat"] == 8 and summary["special_tokens"] == 17


def test_tools_template_matches(tmp_path):
    """Tools go to both renderers the same way; loop controls and `{% generation %}` render as
    transformers renders them."""
    hf = tiny.build_tokenizer()
    hf.chat_template = TOOLS_TEMPLATE
    summary = check_tokenizer(*_artifact(tmp_path, hf), hf)
    assert summary["tools"] and summary["cases"]["chat"] == 12
    rendered = hf.apply_chat_template(
        [{"role": "user", "content": "hi"}], tools=[{"name": "f"}], tokenize=False
    )
    assert '<tools>{"name": "f"}</tools>' in rendered  # the tools reached the template


def _lowercase(data):
    data["normalizer"] = {"type": "Lowercase"}


def _nfkc(data):
    data["normalizer"] = {"type": "NFKC"}


def _drop_first_merge(data):
    data["model"]["merges"] = data["model"]["merges"][1:]  # "Ġ t": " the" splits differently


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_lowercase, "encode(english, add_special_tokens=True) differs at token 0: runtime 86 't'"),
        (_nfkc, "encode(unicode forms, add_special_tokens=True) differs at token 3"),
        (_drop_first_merge, "encode(english, add_special_tokens=True) differs at token 6"),
    ],
)
def test_edited_tokenizer_json_fails_naming_the_case(tmp_path, edit, expected):
    hf = tiny.build_tokenizer()
    with pytest.raises(VerificationError, match="does not match transformers") as err:
        check_tokenizer(*_artifact(tmp_path, hf, edit), hf)
    assert expected in str(err.value)


def test_divergent_template_fails_at_the_first_character(tmp_path):
    hf = tiny.build_tokenizer()
    directory, generation = _artifact(tmp_path, hf)
    generation["chat_template"] = generation["chat_template"].replace("}}\n", "}}\n\n", 1)
    with pytest.raises(VerificationError) as err:
        check_tokenizer(directory, generation, hf)
    message = str(err.value)
    assert "(system+user, add_generation_prompt=True) differs at character 19" in message
    assert "runtime 'art|>system\\n\\nYou are" in message


def test_a_template_only_one_side_renders_fails(tmp_path):
    hf = tiny.build_tokenizer()
    directory, generation = _artifact(tmp_path, hf)
    generation["chat_template"] = "{{ raise_exception('no') }}"
    with pytest.raises(VerificationError, match=r"only the runtime fails \(TemplateError: no\)"):
        check_tokenizer(directory, generation, hf)


def test_build_exits_3_on_a_tokenizer_the_runtime_reads_differently(tmp_path, monkeypatch):
    """A real mismatch: `split_special_tokens` lives in tokenizer_config.json, so transformers
    encodes "<|im_end|>" in text as characters while the runtime's tokenizer.json makes it the
    special token. The build refuses it and leaves nothing behind."""

    build_tokenizer = tiny.build_tokenizer

    def splitting_tokenizer():
        hf = build_tokenizer()
        hf.split_special_tokens = True
        return hf

    monkeypatch.setattr(tiny, "build_tokenizer", splitting_tokenizer)
    out = tmp_path / "art"
    args = ["build", "tiny:llama", "--no-verify", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 3, result.output
    assert "verification failed: the artifact's tokenizer does not match" in result.output
    assert "encode(special tokens in text, add_special_tokens=True) differs" in result.output
    assert not out.exists()

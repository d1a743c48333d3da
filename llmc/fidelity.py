"""Build-time tokenizer and chat-template fidelity: the artifact's runtime tokenizer against
transformers' on a fixed sample; the first difference is a VerificationError (exit 3)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from llmc.errors import VerificationError

# (case name, text): several scripts, emoji (with skin tones, ZWJ sequences and flags), code with
# tabs and indentation, whitespace runs; the tokenizer's own special tokens are added per model.
SAMPLE_TEXTS: tuple[tuple[str, str], ...] = (
    ("english", "The quick brown fox jumps over the lazy dog. It's 9:30 -- isn't it?"),
    ("latin", "Émile a mangé une crème brûlée à Paris: naïve façade, Ångström, Straße, ñandú."),
    # decomposed accents, ligatures, full-width and compatibility forms: what normalizers change
    ("unicode forms", "Cafe\u0301 ﬁne Ｆｕｌｌ ① ™ ½ x² Ⅻ \u00a0nbsp\u200bzw"),
    ("cjk", "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다."),
    ("arabic", "مرحبا بالعالم! كيف حالك اليوم؟ ١٢٣"),
    ("devanagari", "नमस्ते दुनिया, आप कैसे हैं? क्षत्रिय"),
    ("cyrillic", "Привет, мир! Съешь же ещё этих мягких французских булок."),
    ("emoji", "👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️‍🔥 🇫🇷 😀😃 ok👌"),
    (
        "code",
        "def f(x):\n\tif x:\n\t\treturn [i ** 2 for i in range(x)]  # squares\n"
        "    else:\n        pass\n\nclass A:\n    x: int = 0x1F\n",
    ),
    ("whitespace runs", "a  b   c    d\n\n\n\t\t  \r\n e     \n  "),
    ("spaces only", "    "),
    ("newlines only", "\n\n\n\n"),
    ("leading space", " hello world"),
    ("punctuation", "Hello , world ! don't , isn't . (a) [b] {c} \"q\" 'q' 1,234.56 3.14e-10"),
    ("empty", ""),
)

_SYSTEM = {"role": "system", "content": "You are a careful assistant. Réponds brièvement."}
_USER = {"role": "user", "content": "What is the capital of France? 🇫🇷"}
_ASSISTANT = {"role": "assistant", "content": "Paris.\n\nIt is also its largest city."}
_USER_2 = {"role": "user", "content": "And of Japan?  東京?\n\tThanks!"}
# (case name, messages); each is rendered with add_generation_prompt true and false
CONVERSATIONS: tuple[tuple[str, list[dict]], ...] = (
    ("system+user", [_SYSTEM, _USER]),
    ("user", [_USER]),
    ("multi-turn", [_SYSTEM, _USER, _ASSISTANT, _USER_2]),
    ("multi-turn without system", [_USER, _ASSISTANT, _USER_2]),
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city, e.g. Paris"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    }
]
_CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
TOOL_CONVERSATIONS: tuple[tuple[str, list[dict]], ...] = (
    ("tools: user", [_SYSTEM, {"role": "user", "content": "Weather in Paris?"}]),
    (
        "tools: call and result",
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "id": "call_1", "function": _CALL}],
            },
            {"role": "tool", "name": "get_weather", "content": '{"temp": 21, "sky": "clear"}'},
        ],
    ),
)
MAX_SPECIAL_TOKENS = 32  # a tokenizer with hundreds of reserved tokens is sampled, not scanned


def check_tokenizer(directory: str | Path, generation: dict, hf_tokenizer) -> dict:
    """Encode, decode and chat-render the fixed sample with the runtime Tokenizer of
    `directory` (its tokenizer.json and the manifest's `generation`) and with `hf_tokenizer`;
    raise VerificationError at the first difference, else return the manifest's summary."""
    from llmc.runtime.tokenizer import Tokenizer

    if not (Path(directory) / "tokenizer.json").is_file():
        raise VerificationError(
            f"the {type(hf_tokenizer).__name__} tokenizer saved no tokenizer.json, which the "
            "runtime reads; use a model with a fast (tokenizers) tokenizer."
        )
    runtime = Tokenizer(directory, generation)
    specials = special_tokens(hf_tokenizer)
    texts = [*SAMPLE_TEXTS, *_special_texts(specials)]
    counts = {"encode": 0, "decode": 0, "chat": 0}
    for name, text in texts:
        for add in (True, False):
            ids = hf_tokenizer.encode(text, add_special_tokens=add)
            got = _attempt(runtime.encode, text, add_special_tokens=add)
            _compare_ids(f"encode({name}, add_special_tokens={add})", got, ids, hf_tokenizer)
            counts["encode"] += 1
            for skip in (True, False):
                want = hf_tokenizer.decode(ids, skip_special_tokens=skip)
                got = _attempt(runtime.decode, ids, skip_special_tokens=skip)
                _compare_text(f"decode({name}, skip_special_tokens={skip})", got, want)
                counts["decode"] += 1
    template = getattr(hf_tokenizer, "chat_template", None)
    with_tools = isinstance(template, str) and "tools" in template
    if isinstance(template, str):
        counts["chat"] = _check_chat(runtime, hf_tokenizer, with_tools)
    return {
        "passed": True,
        "cases": counts,
        "special_tokens": len(specials),
        "tools": with_tools,
        "sample_sha256": sample_sha256(specials),
    }


def special_tokens(hf_tokenizer) -> list[str]:
    """The named special tokens, the added tokens the chat template writes, then the first other
    added tokens by id, up to MAX_SPECIAL_TOKENS."""
    named = [v for v in hf_tokenizer.special_tokens_map.values() if isinstance(v, str)]
    added = [t.content for _, t in sorted(hf_tokenizer.added_tokens_decoder.items())]
    template = getattr(hf_tokenizer, "chat_template", None)
    in_template = [t for t in added if isinstance(template, str) and t in template]
    found: list[str] = []
    for token in (*named, *in_template, *added):
        if token and token not in found and len(found) < MAX_SPECIAL_TOKENS:
            found.append(token)
    return found


def _special_texts(specials: list[str]) -> list[tuple[str, str]]:
    if not specials:
        return []
    return [
        ("special tokens in text", "start " + " mid ".join(specials) + " end"),
        ("special tokens adjacent", "".join(specials) + "text" + "\n".join(specials)),
    ]


def sample_sha256(specials: list[str]) -> str:
    """What the check ran on: the texts, this tokenizer's special tokens, the conversations."""
    sample = [SAMPLE_TEXTS, specials, CONVERSATIONS, TOOLS, TOOL_CONVERSATIONS]
    return hashlib.sha256(json.dumps(sample, ensure_ascii=False).encode()).hexdigest()


def _check_chat(runtime, hf_tokenizer, with_tools: bool) -> int:
    cases = [(name, messages, None) for name, messages in CONVERSATIONS]
    if with_tools:
        cases += [(name, messages, TOOLS) for name, messages in TOOL_CONVERSATIONS]
    checked = 0
    for name, messages, tools in cases:
        for prompt in (True, False):
            what = f"chat template ({name}, add_generation_prompt={prompt})"
            want = _attempt(
                hf_tokenizer.apply_chat_template,
                messages,
                tools=tools,
                add_generation_prompt=prompt,
                tokenize=False,
            )
            got = _attempt(runtime.apply_chat_template, messages, prompt, tools=tools)
            _compare_text(what, got, want)
            checked += 1
            if isinstance(want, str):  # the rendered prompt's ids, as `llmc run --chat` sends them
                ids = hf_tokenizer.encode(want, add_special_tokens=False)
                got_ids = runtime.encode(got, add_special_tokens=False)
                _compare_ids(f"{what} encoded", got_ids, ids, hf_tokenizer)
    return checked


class _Raised:
    """An exception from one side: both sides refusing a case is agreement."""

    def __init__(self, exc: Exception):
        self.text = f"{type(exc).__name__}: {exc}"


def _attempt(call: Callable, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except Exception as exc:  # a template's raise_exception, a tokenizer error: compared below
        return _Raised(exc)


def _both_returned(what: str, got, want) -> bool:
    """True if both sides returned (compare them), false if both raised; raise if one did."""
    if isinstance(got, _Raised) and isinstance(want, _Raised):
        return False
    for side, outcome in (("runtime", got), ("transformers", want)):
        if isinstance(outcome, _Raised):
            _fail(f"{what}: only the {side} fails ({outcome.text[:200]})")
    return True


def _compare_ids(what: str, got, want: Sequence[int], hf_tokenizer) -> None:
    if not _both_returned(what, got, want) or list(got) == list(want):
        return
    at = _first_difference(got, want)

    def token(ids):
        if at >= len(ids):
            return "(end)"
        return f"{ids[at]} {hf_tokenizer.convert_ids_to_tokens(int(ids[at]))!r}"

    _fail(f"{what} differs at token {at}: runtime {token(got)}, transformers {token(want)}")


def _compare_text(what: str, got, want) -> None:
    if not _both_returned(what, got, want) or got == want:
        return
    at = _first_difference(got, want)
    start = max(0, at - 12)
    _fail(
        f"{what} differs at character {at}: runtime {got[start : at + 24]!r}, "
        f"transformers {want[start : at + 24]!r}"
    )


def _first_difference(a: Sequence, b: Sequence) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def _fail(text: str):
    raise VerificationError(
        f"the artifact's tokenizer does not match transformers': {text}; nothing was written."
    )

"""Seeded random `tiny:ARCH` models and their tokenizer, built in-process for tests and demos."""

from __future__ import annotations

from dataclasses import dataclass

# A fixed text the tiny tokenizer is trained on: byte-level BPE, so any input still encodes.
_TRAIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the "
    "capital of France. Once upon a time there was a lighthouse keeper who wrote a long story. "
    "Hello, world! How are you today? I am fine, thank you. Numbers: 0 1 2 3 4 5 6 7 8 9. "
    "Émile a mangé une crème brûlée à Paris; 東京は日本の首都です. "
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 512
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=0,
    initializer_range=0.2,
)


@dataclass(frozen=True)
class TinySpec:
    """How to build one tiny architecture: transformers config class name and its arguments."""

    config_class: str
    kwargs: dict


def _family(**overrides) -> dict:
    return {**_COMMON, **overrides}


def _ssm(**overrides) -> dict:
    """A state-space model's config: 2 layers, hidden 64, expand 2, state 16."""
    common = dict(vocab_size=VOCAB_SIZE, hidden_size=64, state_size=16, num_hidden_layers=2)
    ids = dict(bos_token_id=0, eos_token_id=2, pad_token_id=0)
    return {**common, "conv_kernel": 4, "expand": 2, **ids, **overrides}


# A registry, not a chain of ifs: a new tiny architecture is one entry.
TINY: dict[str, TinySpec] = {
    "llama": TinySpec("LlamaConfig", _family(tie_word_embeddings=True)),
    "qwen2": TinySpec("Qwen2Config", _family(tie_word_embeddings=False)),
    "mistral": TinySpec("MistralConfig", _family(sliding_window=None)),
    "phi3": TinySpec("Phi3Config", _family()),
    "gemma": TinySpec("GemmaConfig", _family(head_dim=16)),
    "gpt2": TinySpec(
        "GPT2Config",
        dict(
            vocab_size=VOCAB_SIZE,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=512,
            bos_token_id=0,
            eos_token_id=2,
            initializer_range=0.2,
        ),
    ),
    # q/k RMSNorm per head
    "qwen3": TinySpec("Qwen3Config", _family(head_dim=16)),
    # attention and final logit soft-caps, a sliding window on every other layer, norms before
    # and after each block
    "gemma2": TinySpec(
        "Gemma2Config", _family(head_dim=16, query_pre_attn_scalar=16, sliding_window=16)
    ),
    # q/k RMSNorm over all heads, norms after each block instead of before
    "olmo2": TinySpec("Olmo2Config", _family()),
    # embedding, residual, attention and logit multipliers
    "granite": TinySpec(
        "GraniteConfig",
        _family(
            embedding_multiplier=12.0,
            residual_multiplier=0.22,
            attention_multiplier=0.0625,
            logits_scaling=8.0,
        ),
    ),
    # RoPE on every other layer only (NoPE layers)
    "smollm3": TinySpec("SmolLM3Config", _family(no_rope_layer_interval=2)),
    # LayerNorm, partial rotary, attention and MLP in parallel, GELU
    "phi": TinySpec("PhiConfig", _family()),
    # multi-query attention (one KV head) in one fused projection, parallel blocks, LayerNorm;
    # its attention does not go through transformers' AttentionInterface
    "falcon": TinySpec("FalconConfig", _family(num_key_value_heads=None)),
    # LayerNorm without bias, RoPE on interleaved pairs, parallel blocks, a logit scale
    "cohere": TinySpec("CohereConfig", _family(logit_scale=0.5)),
    # a state-space model: Mamba mixers (convolution + selective scan) with a recurrent state,
    # no attention (compiler/recurrent.py)
    "mamba": TinySpec("MambaConfig", _ssm()),
    # Mamba with weightless RMSNorms on Δ, B and C
    "falcon_mamba": TinySpec("FalconMambaConfig", _ssm()),
    # Mamba2: heads sharing one decay each, B and C per group (two here), a gated RMSNorm
    "mamba2": TinySpec("Mamba2Config", _ssm(num_heads=8, head_dim=16, n_groups=2, chunk_size=16)),
}


def build_tokenizer():
    """A deterministic byte-level BPE tokenizer with ChatML specials (transformers wrapper)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_TRAIN_TEXT] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIALS[0],
        eos_token=SPECIALS[2],
        pad_token=SPECIALS[0],
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(arch: str, seed: int = 0):
    """The tiny model for `arch` with seeded random weights, in fp32 eval mode."""
    import torch
    import transformers

    spec = TINY[arch]
    config = getattr(transformers, spec.config_class)(**spec.kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()

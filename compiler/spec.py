"""ModelSpec: the architecture facts every stage needs, read once from a transformers config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from llmc.errors import UnsupportedModelError

# Model types whose layers are Mamba mixers (a selective scan with a convolution in front), which
# llmc traces with a recurrent state instead of a KV cache (compiler/recurrent.py): Mamba, Falcon
# Mamba (Mamba with norms on Δ, B and C) and Mamba2 (heads sharing one decay, groups of B and C).
MAMBA_TYPES = ("mamba", "falcon_mamba", "mamba2")
# The context a recurrent model is built for when its config names none: its state does not grow
# with the context, so this only bounds what the runtime accepts (`--max-context` changes it).
RECURRENT_CONTEXT = 131072


@dataclass(frozen=True)
class RecurrentSpec:
    """The recurrent state of a state-space model's layers (Mamba): a convolution state
    [conv_channels, conv_kernel - 1] and an SSM state [channels, state_size] per layer and row."""

    channels: int  # the scan's width (expand x hidden; Mamba2: heads x head_dim)
    conv_channels: int  # what the convolution sees (Mamba2: x, B and C together)
    conv_kernel: int
    state_size: int


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_context: int
    rope_theta: float | None
    tie_word_embeddings: bool
    recurrent: RecurrentSpec | None = None  # a state-space model: a recurrent state, no KV cache

    @classmethod
    def from_config(cls, config) -> ModelSpec:
        config = config.get_text_config()
        if config.model_type in MAMBA_TYPES:
            return cls._mamba(config)
        heads = getattr(config, "num_attention_heads", None)
        if not heads:
            raise UnsupportedModelError(
                f"{config.model_type!r} has no attention heads in its config (a state-space or "
                "recurrent model?); llmc compiles attention-based decoders and the state-space "
                f"families {', '.join(MAMBA_TYPES)}."
            )
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta") if isinstance(rope, dict) else None
        return cls(
            architecture=config.model_type,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            max_context=config.max_position_embeddings,
            rope_theta=theta,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    @classmethod
    def _mamba(cls, config) -> ModelSpec:
        channels = int(config.expand * config.hidden_size)
        groups = getattr(config, "n_groups", 0)  # Mamba2: B and C per group, in the convolution
        recurrent = RecurrentSpec(
            channels=channels,
            conv_channels=channels + 2 * groups * config.state_size,
            conv_kernel=config.conv_kernel,
            state_size=config.state_size,
        )
        return cls(
            architecture=config.model_type,
            num_layers=config.num_hidden_layers,
            num_heads=0,
            num_kv_heads=0,
            head_dim=0,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            max_context=getattr(config, "max_position_embeddings", None) or RECURRENT_CONTEXT,
            rope_theta=None,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            recurrent=recurrent,
        )

    @classmethod
    def from_model(cls, model) -> ModelSpec:
        """from_config, with the KV-cache geometry read off one eager step of the model: configs
        spell it in many ways (num_key_value_heads, num_kv_heads, multi_query, ...), and a
        config may carry one the model ignores; the cache it returns has one shape."""
        import torch
        from transformers.cache_utils import Cache

        spec = cls.from_config(model.config)
        if spec.recurrent is not None:
            return spec  # no KV cache to measure
        with torch.no_grad():
            out = model(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=True)
        cache = next((v for v in out.values() if isinstance(v, Cache)), None)
        kinds = {type(layer).__name__ for layer in getattr(cache, "layers", [])}
        if "LinearAttentionLayer" in kinds:  # transformers' cache of conv / SSM state layers
            raise UnsupportedModelError(
                f"{spec.architecture!r} mixes attention with recurrent (convolution, state-space "
                "or linear-attention) layers, a hybrid llmc does not build yet; it builds "
                f"attention models and the state-space families {', '.join(MAMBA_TYPES)}."
            )
        keys = getattr(cache.layers[0], "keys", None) if cache is not None else None
        if keys is None or keys.dim() != 4:
            return spec
        _, kv_heads, _, head_dim = keys.shape  # [B, KVH, S, D]
        return replace(spec, num_kv_heads=int(kv_heads), head_dim=int(head_dim))

    def to_dict(self) -> dict:
        return asdict(self)

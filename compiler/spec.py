"""ModelSpec: the architecture facts every stage needs, read once from a transformers config."""

from __future__ import annotations

from dataclasses import asdict, dataclass


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

    @classmethod
    def from_config(cls, config) -> ModelSpec:
        config = config.get_text_config()
        heads = config.num_attention_heads
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

    def to_dict(self) -> dict:
        return asdict(self)

"""Self-speculative drafts: a model cut to its first N decoder layers, keeping its embeddings,
final norm and lm_head (`llmc build --draft-layers N`). The cut model is what gets traced and
verified; how well it drafts for the full model is measured at run time (bench/)."""

from __future__ import annotations

import torch

from llmc.errors import LlmcError


def decoder_layers(model) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """(parent, attribute, list) of the model's decoder layers: the ModuleList as long as
    `config.num_hidden_layers` (model.layers, transformer.h, ...)."""
    total = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == total and name:
            parent_name, _, attribute = name.rpartition(".")
            return model.get_submodule(parent_name), attribute, module
    raise LlmcError(
        f"--draft-layers: no list of {total} decoder layers found in "
        f"{type(model).__name__}; build the draft from a model directory instead."
    )


def keep_first_layers(model, layers: int) -> dict:
    """Cut `model` in place to its first `layers` decoder layers; the manifest's record."""
    parent, attribute, modules = decoder_layers(model)
    total = len(modules)
    if not 1 <= layers < total:
        raise LlmcError(
            f"--draft-layers {layers}: the model has {total} layers; pass 1 to {total - 1}."
        )
    setattr(parent, attribute, modules[:layers])
    config = model.config
    config.num_hidden_layers = layers
    for name in ("layer_types", "sliding_window_pattern_list"):  # per-layer lists
        if isinstance(getattr(config, name, None), list):
            setattr(config, name, getattr(config, name)[:layers])
    return {"layers": layers, "of": total}

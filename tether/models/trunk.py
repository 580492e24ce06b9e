"""The frozen trunk: the layers beneath a LoRA policy's adapters, run once per rollout
(a reward model's, once per ranking over its training: `reward_model.TrunkStates`).

With adapters on the last N layers only (`model.lora.top_layers`), every layer beneath them
computes the same states for the policy, for π_ref (the policy with its adapters off) and
for a value head on the policy, in every pass and every epoch over one rollout. A PPO
iteration with 2 epochs runs the model over each row four to six times (π_ref, π_old, the
update's forwards); the trunk runs the lower layers once, keeps their output (the residual
stream, [B, P + R, H]) with the batch, and every later pass over those rows runs the top N
layers alone from it. Backward stops there too: nothing beneath takes a gradient.

The passes from the trunk run whole rows (in length buckets), not the shared-prompt and
common-opening paths of `passes.response_hidden`: those reuse a KV cache of every layer,
and the lower layers have none. The trunk's states cost B·(P + R)·H floats for the
iteration.

Layers are cut by swapping the backbone's `layers` (and its final norm) for the duration of
one call, so that transformers' own forward runs them with its masks and rotary positions.
That needs a backbone whose forward is embed → layers → norm with nothing between, as in
`FAMILIES`; other models run every pass whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from tether.core.packing import position_ids_from_mask

# Families whose backbone forward adds nothing to the input embeddings and between layers
# (Gemma, for one, scales its embeddings inside forward: its trunk cannot be fed back in).
FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass
class Trunk:
    """The lower layers' output for a batch's rows, aligned with its ids."""

    backbone: nn.Module  # the model these states are of; any other model runs whole
    depth: int  # layers beneath the first one with an adapter or a trainable weight
    states: torch.Tensor  # [B, P + R, H]: the residual stream after layer `depth` − 1

    def rows(self, index: torch.Tensor | list[int]) -> Trunk:
        return Trunk(self.backbone, self.depth, self.states[index])

    def columns(self, start: int, stop: int) -> Trunk:
        return Trunk(self.backbone, self.depth, self.states[:, start:stop])

    def to(self, device: torch.device | str) -> Trunk:
        return Trunk(self.backbone, self.depth, self.states.to(device))


def frozen_depth(backbone: nn.Module) -> int:
    """How many of the backbone's first layers the trunk can run once: those with no
    trainable weight and no adapter (π_ref, the adapters off, then computes the same states),
    below at least one that has one. 0 where nothing can be cut: a model outside FAMILIES,
    layers of more than one attention type (Qwen's sliding window), trainable embeddings,
    every layer trained or none, FSDP-sharded weights (a sharded block frees its gathered
    weights after each call)."""
    config = getattr(backbone, "config", None)
    if getattr(config, "model_type", None) not in FAMILIES:
        return 0
    if len(set(getattr(config, "layer_types", None) or [])) > 1:
        return 0  # sliding and full layers: forward picks layer i's mask by its place in the list
    if not hasattr(backbone, "layers") or not hasattr(backbone, "norm"):
        return 0
    params = list(backbone.parameters())
    if any(hasattr(p, "full_tensor") for p in params):
        return 0
    if any(p.requires_grad for p in backbone.embed_tokens.parameters()):
        return 0
    depth = 0
    for layer in backbone.layers:
        adapted = any("lora_" in name for name, _ in layer.named_modules())
        if adapted or any(p.requires_grad for p in layer.parameters()):
            break
        depth += 1
    return depth if depth < len(backbone.layers) else 0


@contextlib.contextmanager
def only_layers(backbone: nn.Module, keep: slice, final_norm: bool) -> Iterator[None]:
    """The backbone with layers `keep` alone (and without its final norm where asked), for
    one call: its forward then runs part of the model with its own masks and positions."""
    layers, norm = backbone.layers, backbone.norm
    backbone.layers = nn.ModuleList(list(layers)[keep])
    if not final_norm:
        backbone.norm = nn.Identity()
    try:
        yield
    finally:
        backbone.layers, backbone.norm = layers, norm


@torch.no_grad()
def run_trunk(backbone: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Trunk | None:
    """The trunk of rows `ids` (whole, as laid out in a rollout batch), or None where the
    backbone has none to cut (`frozen_depth`)."""
    depth = frozen_depth(backbone)
    if not depth:
        return None
    was_training = backbone.training
    backbone.eval()  # the states every pass shares, π_ref's among them
    try:
        with only_layers(backbone, slice(0, depth), final_norm=False):
            states = backbone(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position_ids_from_mask(mask),
                use_cache=False,
            ).last_hidden_state
    finally:
        backbone.train(was_training)
    return Trunk(backbone, depth, states)


def hidden_above_trunk(trunk: Trunk, mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """[B, R, H] final hidden states that emit each response token, from the trunk's states:
    the layers above it and the final norm, over whole rows (with gradients where enabled)."""
    backbone = trunk.backbone
    with only_layers(backbone, slice(trunk.depth, None), final_norm=True):
        hidden = backbone(
            inputs_embeds=trunk.states,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=False,
        ).last_hidden_state
    return hidden[:, prompt_width - 1 : -1]

"""Shared prefix: score ``copies`` completions of each prompt with ONE forward of the prompt, with gradient.

The prompt (and its images) runs once and leaves its KV cache; the cache is repeated for the copies
(``reorder_cache``, which also repeats linear-attention states) and the completions run as one batch on
top of it, positions continuing from the prompt (mRoPE models: from the prompt's ``rope_deltas``). The
prompt's last hidden state predicts every copy's first completion token. Autograd sums the copies'
gradients through the repeat into the single prompt pass, so values and gradients equal those of
``copies`` full prompt + completion sequences (:meth:`VLMBackbone.token_logps`), for a fraction of the
prompt's compute. Rows are in block order: copy k of prompt i is row ``k * B + i``.
Activation checkpointing replays each layer in backward, cache included: the layers keep the cache in these
passes, a prompt layer's replay finds an empty cache again and the completion pass only reads it (:func:`_read`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from typing import Any

import torch
from torch import nn

from lightning_vlm.model.backbone import VLMBackbone
from lightning_vlm.model.lora import unwrap
from lightning_vlm.model.moe import load_balancing_loss
from lightning_vlm.model.vision import has_images, shared_vision

# Families whose shared-prefix pass does not match the per-sequence one, with the reason (none known).
UNSUPPORTED: tuple[tuple[str, str], ...] = ()


def fallback_reason(bb: VLMBackbone) -> str | None:
    """Why ``bb`` must score prompt + completion per sequence, or None when the shared prefix applies."""
    # transformers is imported here, not at the top: `lightning-vlm --help` must not import it
    from transformers.modeling_layers import GradientCheckpointingLayer

    keeps_cache = hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")  # 5.24 has it
    if bb.config.gradient_checkpointing and not keeps_cache:
        return "gradient checkpointing drops the KV cache (this transformers' GradientCheckpointingLayer)"
    model_type = getattr(bb.hf_config, "model_type", None)
    return next((why for family, why in UNSUPPORTED if family == model_type), None)


def shared_prefix_hidden(
    bb: VLMBackbone,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    vision: dict[str, Any],
    model: nn.Module | None = None,
    features: dict[str, Any] | None = None,
    own: bool = False,
) -> torch.Tensor:
    """(R, N, H) last hidden states that predict each completion token (the state before it); with ``own``, the
    completion tokens' own states (a scorer reads the last one).

    Args:
        bb: The backbone.
        prompt_ids, prompt_mask: (B, P) left-padded prompts.
        completion_ids, completion_mask: (R, N) completions, R = copies * B in block order, right-padded.
        vision: The B prompts' vision dict (per-sequence entries shaped like ``prompt_ids``).
        model: Run this model instead of the policy (the reference copy).
        features: Output of :meth:`VLMBackbone.encode_images` to reuse instead of running the tower.
    """
    model = model if model is not None else bb.model
    assert model is not None, "VLMBackbone.load() first"
    inner: Any = unwrap(model).model
    (B, P), (R, N) = prompt_ids.shape, completion_ids.shape
    per_sequence = {k for k, v in vision.items() if isinstance(v, torch.Tensor) and tuple(v.shape) == (B, P)}
    if has_images(vision) and features is not None:
        vision = shared_vision(vision, (B, P), 1, features)
    for m in inner.modules():  # mRoPE: no stale offset of an earlier batch (a text-only prompt sets none)
        if hasattr(m, "rope_deltas"):
            m.rope_deltas = None
    from transformers import DynamicCache

    name = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"  # older
    config: Any = unwrap(model).config
    cache, kw = DynamicCache(config=config), {"use_cache": True}  # ours: checkpointing makes none
    with _cache_kept(inner):
        out = inner(input_ids=prompt_ids, attention_mask=prompt_mask, **{name: cache}, **kw, **vision)
    index = torch.arange(B, device=prompt_ids.device).repeat(R // B)  # (R,) the prompt of each row
    prompt = _read(cache, index)
    cache.layers = DynamicCache(config=config).layers  # what the prompt layers' replays start from
    mask = torch.cat([prompt_mask[index], completion_mask], dim=1)  # (R, P+N)
    # Each row's positions continue from its prompt's, as in one prompt + completion sequence: the count
    # of tokens before them (pads included, the models' default numbering), shifted by mRoPE's offset.
    positions = torch.arange(P, P + N, device=prompt_ids.device).expand(R, N)  # (R, N)
    deltas = [m for m in inner.modules() if isinstance(getattr(m, "rope_deltas", None), torch.Tensor)]
    for m in deltas:  # mRoPE (Qwen-VL, GLM-4.1V): the prompt pass set one offset per prompt
        m.rope_deltas = m.rope_deltas[index]  # (R, 1)
    if deltas:
        text = mask.long().cumsum(-1)[:, P:] - 1  # mRoPE numbers real tokens only
        positions = (text + deltas[0].rope_deltas).unsqueeze(0).expand(3, R, N)  # (3, R, N)
    zeros = {k: vision[k].new_zeros(R, N) for k in per_sequence}  # mm_token_type_ids, ...: text after P
    with _cache_kept(inner):
        rest = inner(input_ids=completion_ids, attention_mask=mask, position_ids=positions, **{name: prompt}, **kw,
                     **zeros)  # fmt: skip
    if own:
        return rest.last_hidden_state
    # The prompt's last hidden state predicts token 0; completion token t predicts t + 1.
    return torch.cat([out.last_hidden_state[index, -1:], rest.last_hidden_state[:, :-1]], dim=1)  # (R, N, H)


def shared_prefix_logps(
    bb: VLMBackbone,
    *inputs: Any,
    model: nn.Module | None = None,
    features: dict[str, Any] | None = None,
    entropy: bool = False,
    temperature: float = 1.0,
    targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(R, N) float32 completion log-probs (0 where the completion mask is 0) and entropies (or None).
    ``inputs``, ``model``, ``features``: as in :func:`shared_prefix_hidden`; ``entropy``, ``temperature``: as
    in :meth:`VLMBackbone.token_logps`; ``targets``: (R, N) the tokens to score (default: the completion mask)."""
    prompt_ids, prompt_mask, completion_ids, completion_mask, vision = inputs
    hidden = shared_prefix_hidden(
        bb, prompt_ids, prompt_mask, completion_ids, completion_mask, vision, model, features
    )
    targets = (completion_mask if targets is None else targets).bool()
    logps, ent = bb.head_logps(hidden[targets], completion_ids[targets], model, entropy, temperature)
    zeros = torch.zeros(completion_ids.shape, dtype=torch.float32, device=completion_ids.device)
    return zeros.masked_scatter(targets, logps), (None if ent is None else zeros.masked_scatter(targets, ent))


def split(
    seq: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """:func:`shared_prefix_hidden`'s first inputs from ``Rollout.sequences``' full sequences (block order:
    the first B rows hold each prompt once)."""
    P, R = seq["prompt_length"], seq["input_ids"].shape[0]
    B = R // seq["copies"]
    ids, mask = seq["input_ids"], seq["attention_mask"]
    vision = {k: v[:B, :P] if isinstance(v, torch.Tensor) and tuple(v.shape[:2]) == tuple(ids.shape) else v
              for k, v in seq["vision"].items()}  # fmt: skip
    return ids[:B, :P], mask[:B, :P], ids[:, P:], mask[:, P:], vision


WHY_NOT = ("is not left-padded", "has no scored token", "has no token before its first scored token",
           "differs from its pair's first sequence before the first scored token")  # fmt: skip


def common_prefix(
    ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, vision: dict[str, Any], copies: int
) -> tuple[tuple, torch.Tensor] | str:
    """:func:`shared_prefix_hidden`'s inputs and the (R, N) tokens to score, from ``copies`` blocks of left-padded
    full sequences (row ``k * B + i``: copy k of prompt i, images held once per prompt) whose ``labels`` mark the
    scored tokens (a preference batch): each prompt is its rows' tokens before their first scored token, which
    must be the same in every copy. Returns why not (a string) where they are not, or where sharing would run
    more tokens than the full sequences (prompts padded to the longest, completions to the longest)."""
    (R, T), B = ids.shape, ids.shape[0] // copies
    at = torch.arange(T, device=ids.device)
    starts = T - mask.sum(-1)  # (R,) first real token
    scored = labels.bool() & mask.bool()
    firsts = torch.where(scored, at, T).amin(-1) - starts  # (R,) first scored token, from the row's start
    cut = firsts.view(copies, B).amin(0)  # (B,) prompt i: before the first scored token of any of its copies
    rows = ids.gather(1, (starts[:, None] + at).clamp(max=T - 1))  # (R, T) each row from its first real token
    same = (rows == rows[:B].repeat(copies, 1)) | (at >= cut.repeat(copies)[:, None])  # (R, T)
    left, has, ok = mask.bool() == (at >= starts[:, None]), scored.any(-1), same.all(-1)
    checks = torch.stack([left.all(-1), has, firsts >= 1, ok]).tolist()  # one transfer
    for why, passed in zip(WHY_NOT, checks, strict=True):
        if not all(passed):
            return f"sequence {passed.index(False)} {why}"
    P, N = (int(v) for v in torch.stack([cut.max(), (T - starts - cut.repeat(copies)).max()]).tolist())
    if B * P + R * N >= R * T:
        return f"the shared prefix would run {B * P + R * N} tokens, the full sequences {R * T}"
    # prompt i's token p is its row's token cut - P + p (p >= P - cut: left padding); row r's completion token n
    # is its token cut + n (while inside the row)
    p_at, n_at = starts[:B, None] + cut[:, None] - P + at[:P], (starts + cut.repeat(copies))[:, None] + at[:N]
    p_in, n_in = at[:P] >= P - cut[:, None], n_at < T

    def take(x: torch.Tensor, where: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
        return torch.where(inside, x[: where.shape[0]].gather(1, where.clamp(0, T - 1)), 0).to(x.dtype)

    per_sequence = {k: take(v, p_at, p_in) for k, v in vision.items() if isinstance(v, torch.Tensor) and v.shape == ids.shape}
    inputs = (take(ids, p_at, p_in), p_in.to(mask.dtype), take(ids, n_at, n_in), n_in.to(mask.dtype))
    return (*inputs, {**vision, **per_sequence}), take(labels, n_at, n_in)


@contextlib.contextmanager
def _cache_kept(model: nn.Module):
    """Checkpointed layers keep the cache (transformers drops it unless their class says they may)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m in layers:
            del m._can_checkpoint_with_cache


def _read(cache: Any, index: torch.Tensor) -> Any:
    """The prompt pass's ``cache``, rows repeated by ``index`` (linear-attention states too), for the completion
    pass to read: an update returns the prompt's states joined with the new ones and stores nothing, so a
    replay reads the same prompt states (and no in-place copy overwrites states the graph holds)."""
    prompt = copy.copy(cache)
    prompt.reorder_cache(index)
    for layer in prompt.layers:
        layer.update = functools.partial(_joined, layer)
        if isinstance(getattr(layer, "conv_states", None), dict):  # linear attention (Qwen3.5's DeltaNet)
            layer.update_conv_state = functools.partial(_joined_conv, layer)
            layer.update_recurrent_state = lambda new, *args, **kwargs: new
    return prompt


def _joined(layer: Any, keys: torch.Tensor, values: torch.Tensor, *args: Any, **kwargs: Any) -> tuple:
    """Attention: the prompt's keys and values (sliding window: its last ones), then the new ones."""
    return torch.cat([layer.keys, keys], dim=-2), torch.cat([layer.values, values], dim=-2)


def _joined_conv(layer: Any, new: torch.Tensor, state_idx: int = 0, **kwargs: Any) -> torch.Tensor:
    """Linear attention's convolution: the prompt's last inputs, then the new ones."""
    return torch.cat([layer.conv_states[state_idx], new], dim=-1)


def shared_prefix_aux(
    router_logits: list[torch.Tensor],
    prompt_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    experts: int,
    top_k: int,
) -> torch.Tensor:
    """The load-balancing loss of :func:`shared_prefix_logps`'s two passes (each MoE layer's logits of the
    prompt pass, then of the completion pass) as the per-sequence forward gives it: each prompt token
    counts once per copy, padding not at all."""
    copies, layers = completion_mask.shape[0] // prompt_mask.shape[0], len(router_logits) // 2
    keep_prompt, keep_completion = prompt_mask.reshape(-1).bool(), completion_mask.reshape(-1).bool()
    rows = [logits[keep_prompt].repeat(copies, 1) for logits in router_logits[:layers]]
    rows += [logits[keep_completion] for logits in router_logits[layers:]]
    return load_balancing_loss(rows, experts, top_k)

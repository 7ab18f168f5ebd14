"""Padding-free packing: the rows of a micro-batch as ONE sequence, attention kept inside each row.

The padded batch (B, T) becomes (1, N), N the real tokens, with position ids restarting at 0 in each row.
transformers (masking_utils) reads a restart in the position ids, with no attention mask, as the start of
another packed sequence: for eager attention it builds the block-diagonal causal 4-D mask; flash-attention-2
takes the same position ids to its varlen kernel (cu_seqlens), transformers' padding-free training path
(not testable on CPU). SDPA with that mask would compute all N x N scores, so the decoder's SDPA runs
causal row by row instead (``_segment_sdpa``), except under gradient checkpointing. mRoPE families (Qwen-VL, GLM-4.1V) get each row's
3-D positions from the model's own ``get_rope_index`` (each row alone), with the 1-D text positions that
mark the segments stacked on top, the (4, 1, N) form their decoders read as packed. Image features keep
their order: rows and their placeholder tokens stay in row order, so the model's scatter puts each row's
images in its own segment.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, cast

import torch
from torch import nn

# model_type -> why packing would be wrong (tests/model/test_packing.py shows each one's packed log-probs differ)
_LINEAR = "its linear-attention (Gated DeltaNet) layers carry a recurrent state along the sequence, across rows"
_GEMMA = "its image tokens attend to each other both ways (a mask from the token types) that packing does not keep"
REFUSED = {"qwen3_5": _LINEAR, "qwen3_5_moe": _LINEAR, "gemma3": _GEMMA, "gemma4": _GEMMA}


def check_packing(hf_config: Any) -> None:
    """Refuse packing for a family whose packed forward would differ from its padded one."""
    family = hf_config.model_type
    if family in REFUSED:
        raise ValueError(f"data.packing: the {family} family cannot be packed: {REFUSED[family]}")


_BOUNDS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("packed_bounds", default=None)
_PER_ROW = "lightning_vlm_packed_sdpa"  # an attention implementation with no mask function: no mask is built


def _segment_sdpa(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    """SDPA causal within each packed row, one row at a time: on CPU, SDPA with the block-diagonal mask
    computes all N x N scores (packed was 2x slower than padded); the decoder's only (is_causal)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = _BOUNDS.get()
    if bounds is None or not getattr(module, "is_causal", False) or query.shape[2] != bounds[-1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows = zip(bounds[:-1], bounds[1:], strict=True)
    parts = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs)[0]
             for a, b in rows]  # fmt: skip
    return torch.cat(parts, 1), None  # (1, N, heads, d)


@contextlib.contextmanager
def _per_row_sdpa(decoder: nn.Module, lengths: list[int]):
    """While packed: the decoder's SDPA (only SDPA) runs row by row, with no mask built. Not where a sliding
    window cuts a row (the mask applies it), nor under checkpointing, whose backward replays each layer after
    this context exits: the mask, built from the position ids (a layer input it stores), replays the same."""
    from transformers import AttentionInterface

    config: Any = decoder.config
    window = getattr(config, "sliding_window", None) or max(lengths)
    ckpt = decoder.training and any(getattr(m, "gradient_checkpointing", False) for m in decoder.modules())
    if config._attn_implementation != "sdpa" or max(lengths) > window or ckpt:  # the mask instead: see above
        yield
        return
    AttentionInterface.register(_PER_ROW, _segment_sdpa)
    token = _BOUNDS.set([0, *torch.tensor(lengths).cumsum(0).tolist()])
    config._attn_implementation = _PER_ROW
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
        _BOUNDS.reset(token)


def packed_hidden(inner: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  vision: dict[str, Any]) -> torch.Tensor:  # fmt: skip
    """Run ``inner`` (the VLM without its head) on the real tokens of the padded batch packed into one
    sequence; return its last hidden states put back in the padded layout, (B, T, H) (0 on padding)."""
    keep = attention_mask.bool()  # (B, T)
    text = (attention_mask.long().cumsum(-1) - 1)[keep][None]  # (1, N): 0, 1, ... in each row
    packed = {k: v[keep][None] if torch.is_tensor(v) and v.shape[:2] == keep.shape else v
              for k, v in vision.items()}  # fmt: skip
    position_ids = text
    rope_index = getattr(inner, "get_rope_index", None)
    if rope_index is not None:  # mRoPE: (4, 1, N), the text positions first
        rope = text.expand(3, -1)[:, None]
        if "mm_token_type_ids" in vision:
            grid = {k: vision[k] for k in ("image_grid_thw", "video_grid_thw") if k in vision}
            rope, _ = rope_index(
                input_ids, mm_token_type_ids=vision["mm_token_type_ids"], attention_mask=attention_mask, **grid
            )  # (3, B, T)
            rope = rope[:, keep][:, None]  # (3, 1, N)
        position_ids = torch.cat([text[None], rope])
    with _per_row_sdpa(cast(Any, inner).get_decoder(), attention_mask.sum(1).tolist()):
        out = inner(input_ids=input_ids[keep][None], attention_mask=None, position_ids=position_ids,
                    use_cache=False, **packed)  # fmt: skip
    hidden = out.last_hidden_state  # (1, N, H)
    full = hidden.new_zeros(*keep.shape, hidden.shape[-1])
    full[keep] = hidden[0]
    return full

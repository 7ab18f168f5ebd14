"""Padding-free packing: the rows of a micro-batch as ONE sequence, attention kept inside each row.

The padded batch (B, T) becomes (1, N), N the real tokens, with position ids restarting at 0 in each row.
transformers (masking_utils) reads a restart in the position ids, with no attention mask, as the start of
another packed sequence: with SDPA/eager it builds the block-diagonal causal 4-D mask; flash-attention-2
takes the same position ids to its varlen kernel (cu_seqlens), the path transformers documents for
padding-free training (not testable on CPU). mRoPE families (Qwen-VL, GLM-4.1V) get each row's 3-D
positions from the model's own ``get_rope_index`` (each row alone), with the 1-D text positions that mark
the segments stacked on top, the (4, 1, N) form their decoders read as packed. Image features keep their
order: rows and their placeholder tokens stay in row order, so the model's scatter puts each row's
images in its own segment.
"""

from __future__ import annotations

from typing import Any

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
    out = inner(input_ids=input_ids[keep][None], attention_mask=None, position_ids=position_ids,
                use_cache=False, **packed)  # fmt: skip
    hidden = out.last_hidden_state  # (1, N, H)
    full = hidden.new_zeros(*keep.shape, hidden.shape[-1])
    full[keep] = hidden[0]
    return full

"""Tiny Qwen3.5 and Qwen3.5-MoE: a hybrid decoder (Gated-DeltaNet linear attention layers and full attention
layers, here one of each) with interleaved M-RoPE, the Qwen3-VL vision tower without deepstack, the Qwen2-VL
image processor with 16 px patches, and the stock Qwen3-VL processor; images as
``<|vision_start|><|image_pad|><|vision_end|>``."""

from __future__ import annotations

from lightning_vlm.model.tiny import qwen
from lightning_vlm.model.tiny.common import text_sizes


def _config(spec, tokenizer):
    import transformers

    head_dim = spec.hidden_size // spec.num_heads
    text = text_sizes(spec, tokenizer)
    # Real checkpoints rotate a quarter of each head (partial_rotary_factor), in (t, h, w) sections summing to
    # half the rotated width. Every second layer is full attention (the real ones: every fourth), so that two
    # layers hold one of each kind and the cache has a layer that counts tokens.
    half = int(head_dim * 0.25) // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope,
                               "mrope_interleaved": True, "partial_rotary_factor": 0.25}  # fmt: skip
    text["layer_types"] = ["full_attention" if i % 2 else "linear_attention" for i in range(spec.num_layers)]
    text.update(head_dim=head_dim, linear_num_key_heads=2, linear_num_value_heads=4)
    text.update(linear_key_head_dim=head_dim, linear_value_head_dim=head_dim)
    width = spec.vision_hidden_size
    vision = dict(depth=spec.vision_depth, num_heads=2, hidden_size=width, intermediate_size=2 * width,
                  out_hidden_size=spec.hidden_size, num_position_embeddings=64, patch_size=16)  # fmt: skip
    if spec.family == "qwen3_5_moe":
        cls = transformers.Qwen3_5MoeConfig
        text.update(num_experts=spec.num_experts, num_experts_per_tok=2)
        text.update(moe_intermediate_size=spec.hidden_size, shared_expert_intermediate_size=spec.hidden_size)
    else:
        cls = transformers.Qwen3_5Config
    return cls(text_config=text, vision_config=vision, tie_word_embeddings=spec.tie_word_embeddings,
               **qwen.vision_token_ids(tokenizer))  # fmt: skip


def build(spec):
    """(config, processor) of the tiny ``qwen3_5`` or ``qwen3_5_moe`` family: Qwen3-VL's tokens, 16 px image
    processor and stock ``Qwen3VLProcessor`` (minus its video half), with this module's config."""
    return qwen.build(spec, _config)

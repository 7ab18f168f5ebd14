"""Tiny Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE: M-RoPE language models, the Qwen2-VL image
processor (patches merged 2x2), images as ``<|vision_start|><|image_pad|><|vision_end|>``."""

from __future__ import annotations

from lightning_vlm.model.tiny.common import CHAT_TEMPLATE, SPECIAL_TOKENS, text_sizes, train_tokenizer


def vision_token_ids(tokenizer) -> dict:
    """The Qwen-VL config's image, video and delimiter token ids (Qwen3.5 shares them)."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def _config(spec, tokenizer):
    import transformers

    head_dim = spec.hidden_size // spec.num_heads
    half = head_dim // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # (t, h, w) sections sum to half
    text = text_sizes(spec, tokenizer)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope}
    vision = dict(depth=spec.vision_depth, num_heads=2, hidden_size=spec.hidden_size)
    width = spec.vision_hidden_size  # sized: the Qwen2.5-VL and Qwen3-VL towers
    sized = dict(hidden_size=width, intermediate_size=2 * width, out_hidden_size=spec.hidden_size)
    if spec.family == "qwen2_vl":
        cls = transformers.Qwen2VLConfig
        vision.update(embed_dim=width, mlp_ratio=2)
    elif spec.family == "qwen2_5_vl":
        cls = transformers.Qwen2_5_VLConfig
        vision.update(sized, fullatt_block_indexes=[spec.vision_depth - 1], window_size=56)
    else:
        moe = spec.family == "qwen3_vl_moe"
        cls = transformers.Qwen3VLMoeConfig if moe else transformers.Qwen3VLConfig
        text["head_dim"] = head_dim
        text["rope_parameters"]["mrope_interleaved"] = True
        vision.update(sized, num_position_embeddings=64, deepstack_visual_indexes=[0], patch_size=16)
        if moe:
            text.update(num_experts=spec.num_experts, num_experts_per_tok=2)
            text.update(moe_intermediate_size=spec.hidden_size, decoder_sparse_step=1)
    return cls(text_config=text, vision_config=vision, tie_word_embeddings=spec.tie_word_embeddings,
               **vision_token_ids(tokenizer))  # fmt: skip


def build(spec, config=_config):
    """(config, processor) of the tiny Qwen-VL family ``spec.family``; ``config(spec, tokenizer)`` makes the
    config (Qwen3.5's builder passes its own: same tokens, image processor and stock processor)."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from lightning_vlm.model.processing import image_only_processor

    tokenizer = train_tokenizer(spec.vocab_size)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16 if spec.family.startswith("qwen3") else 14,
        merge_size=2,
        temporal_patch_size=2,
        min_pixels=spec.min_pixels,
        max_pixels=spec.max_pixels,
    )
    stock = PROCESSOR_MAPPING_NAMES[spec.family]  # the family's stock processor, minus its video half
    processor = image_only_processor(stock)(image_processor, tokenizer, chat_template=CHAT_TEMPLATE)
    return config(spec, tokenizer), processor

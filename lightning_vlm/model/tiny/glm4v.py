"""Tiny GLM-4.1V: a Glm4v vision tower (patches merged 2x2, like Qwen2-VL's) and a GLM-4 decoder with 3D
rotary positions (M-RoPE on half of each head, positions from ``mm_token_type_ids``); images as
``<|begin_of_image|><|image|><|end_of_image|>`` in GLM's ``[gMASK]<sop><|user|>`` chat layout."""

from __future__ import annotations

from lightning_vlm.model.tiny.common import text_sizes, train_tokenizer

# The config's vision token fields and GLM's tokens for them.
VISION = {"image_start_token_id": "<|begin_of_image|>", "image_token_id": "<|image|>",
          "image_end_token_id": "<|end_of_image|>", "video_start_token_id": "<|begin_of_video|>",
          "video_token_id": "<|video|>", "video_end_token_id": "<|end_of_video|>"}  # fmt: skip
IMAGE = "<|begin_of_image|><|image|><|end_of_image|>"
ROLES = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>")
# GLM's layout; an assistant turn ends with GLM's EOS, <|endoftext|>, so that training teaches the model to stop.
CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}" + IMAGE + "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if message['role'] == 'assistant' %}<|endoftext|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build(spec):
    """(config, processor) of the tiny ``glm4v`` family."""
    import transformers
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    from lightning_vlm.model.processing import image_only_processor

    tokenizer = train_tokenizer(spec.vocab_size, extra=(*ROLES, *VISION.values()))
    tokenizer.eos_token = "<|endoftext|>"  # GLM's EOS and pad token
    tokenizer.chat_template = CHAT_TEMPLATE
    head_dim = spec.hidden_size // spec.num_heads
    quarter = head_dim // 4  # rotary frequencies: half the head is rotated (partial_rotary_factor 0.5)
    hw = quarter * 3 // 8
    mrope = [quarter - 2 * hw, hw, hw]  # (t, h, w) sections; GLM-4.1V: 8, 12, 12
    text = text_sizes(spec, tokenizer)
    rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=mrope, partial_rotary_factor=0.5)
    text["rope_parameters"] = rope
    config = transformers.Glm4vConfig(
        text_config=text,
        vision_config=dict(
            depth=spec.vision_depth,
            hidden_size=spec.vision_hidden_size,
            intermediate_size=2 * spec.vision_hidden_size,
            num_heads=2,
            image_size=112,
            patch_size=14,
            out_hidden_size=spec.hidden_size,
        ),
        **{field: tokenizer.convert_tokens_to_ids(token) for field, token in VISION.items()},
        tie_word_embeddings=spec.tie_word_embeddings,
    )
    # GLM's image limits count the 2 frames of a temporal patch: twice the pixels of one image.
    size = {"shortest_edge": 2 * spec.min_pixels, "longest_edge": 2 * spec.max_pixels}
    image_processor = Glm4vImageProcessorPil(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    stock = image_only_processor("Glm4vProcessor")  # the stock processor, minus its video half
    return config, stock(image_processor, tokenizer, chat_template=CHAT_TEMPLATE)

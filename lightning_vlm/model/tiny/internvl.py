"""Tiny InternVL (InternVL3-hf layout): an InternViT tower, pixel-shuffle projector and Qwen2 decoder. Each
image is cut into square tiles plus a thumbnail (``crop_to_patches``), and its ``<IMG_CONTEXT>`` placeholder
becomes ``<img>``, the tiles' context tokens, ``</img>``."""

from __future__ import annotations

from lightning_vlm.model.tiny.common import (
    CHAT_TEMPLATE,
    QWEN_IMAGE,
    text_sizes,
    tower_sizes,
    train_tokenizer,
)

# InternVL's named tokens, as its tokenizer config holds them (the processor reads them by name).
TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
          "video_token": "<video>"}  # fmt: skip
TILE, PATCH = 56, 14  # a tile of 4x4 patches, shuffled to 2x2 = 4 tokens (InternVL3: 448 px, 256 tokens)


def build(spec):
    """(config, processor) of the tiny ``internvl`` family."""
    import transformers
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from lightning_vlm.model.processing import image_only_processor

    trained = train_tokenizer(spec.vocab_size, extra=tuple(TOKENS.values()))
    template = CHAT_TEMPLATE.replace(QWEN_IMAGE, "<IMG_CONTEXT>\n")
    kwargs = {**trained.init_kwargs, "chat_template": template, "extra_special_tokens": TOKENS}
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=trained.backend_tokenizer, **kwargs)
    tokens = (TILE // PATCH // 2) ** 2  # context tokens per tile after the 0.5 pixel shuffle
    config = transformers.InternVLConfig(
        vision_config=tower_sizes(spec, TILE, PATCH),
        text_config=dict(model_type="qwen2", **text_sizes(spec, tokenizer)),
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=tokens,
        tie_word_embeddings=spec.tie_word_embeddings,
    )
    max_tiles = max(1, spec.max_pixels // TILE**2)  # 112x112 px: 2x2 tiles and the thumbnail
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1, max_patches=max_tiles
    )
    processor = image_only_processor("InternVLProcessor")(
        image_processor, tokenizer, image_seq_length=tokens, chat_template=template
    )
    return config, processor

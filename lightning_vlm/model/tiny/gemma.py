"""Tiny Gemma 3 (SigLIP tower, pooled projector; an image is ``<start_of_image>``, expanded by the processor
to begin/end-of-image tokens around its soft tokens) and Gemma 4 (its own tower with 2-D patch positions;
an image is ``<|image|>``). Both: sliding-window and full-attention layers, bidirectional attention within
each image's tokens (``token_type_ids`` / ``mm_token_type_ids``); Gemma 4 also final logit soft-capping."""

from __future__ import annotations

import math

from lightning_vlm.model.tiny.common import text_sizes, train_tokenizer

# Per family: (turn start, turn end, image placeholder, named special tokens, more special tokens).
_TOKENS = {
    "gemma3": ("<start_of_turn>", "<end_of_turn>", "<start_of_image>",
               {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
               ()),
    "gemma4": ("<|turn>", "<turn|>", "<|image|>",
               {"boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
                "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>"},
               ("<|video|>",)),
}  # fmt: skip


def _template(start: str, end: str, image: str) -> str:
    """The Gemma chat layout: the assistant's role is ``model``, a system message opens the first user turn."""
    return (
        "{% set sys = messages[0]['content'] + '\n\n' if messages[0]['role'] == 'system' else '' %}"
        "{% for message in messages if message['role'] != 'system' %}"
        f"{start}{{{{ 'model' if message['role'] == 'assistant' else message['role'] }}}}\n"
        "{% if loop.first %}{{ sys }}{% endif %}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for c in message['content'] %}"
        f"{{% if c['type'] == 'image' %}}{image}{{% elif c['type'] == 'text' %}}{{{{ c['text'] }}}}{{% endif %}}"
        f"{{% endfor %}}{{% endif %}}{end}\n{{% endfor %}}"
        f"{{% if add_generation_prompt %}}{start}model\n{{% endif %}}"
    )


def build(spec):
    """(config, processor) of the tiny Gemma family ``spec.family``."""
    import transformers

    start, end, image, named, more = _TOKENS[spec.family]
    template = _template(start, end, image)
    extra = (start, end, *named.values(), *more)
    tokenizer = train_tokenizer(
        spec.vocab_size, extra=extra, eos_token=end, chat_template=template, extra_special_tokens=named
    )
    ids = {k.replace("_token", "_token_id"): tokenizer.convert_tokens_to_ids(v) for k, v in named.items()}
    head_dim = spec.hidden_size // spec.num_heads
    text = text_sizes(spec, tokenizer)
    text.update(head_dim=head_dim, sliding_window=32, layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=spec.vision_hidden_size, intermediate_size=2 * spec.vision_hidden_size,
                  num_hidden_layers=spec.vision_depth, num_attention_heads=2)  # fmt: skip
    if spec.family == "gemma3":
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        side = math.isqrt(spec.max_pixels) // 14 * 14  # square images, whole patches: 8 x 8 for 112 px
        config = transformers.Gemma3Config(
            text_config=dict(model_type="gemma3_text", query_pre_attn_scalar=head_dim, **text),
            vision_config=dict(model_type="siglip_vision_model", image_size=side, patch_size=14, **vision),
            mm_tokens_per_image=16,  # the projector pools the 8 x 8 patches to 4 x 4
            boi_token_index=ids["boi_token_id"],
            eoi_token_index=ids["eoi_token_id"],
            image_token_index=ids["image_token_id"],
            tie_word_embeddings=spec.tie_word_embeddings,
        )
        image_processor = Gemma3ImageProcessorPil(size={"height": side, "width": side})
        processor = transformers.Gemma3Processor(image_processor, tokenizer, template, image_seq_length=16)
        return config, processor
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    from lightning_vlm.model.processing import image_only_processor

    # Per-layer input embeddings (PLE) at toy width; vision tokens attend to each other both ways.
    text.update(hidden_size_per_layer_input=16, vocab_size_per_layer_input=len(tokenizer))
    text.update(use_bidirectional_attention="vision", global_head_dim=head_dim)
    # Gemma 4 caps its logits (Gemma3ForConditionalGeneration ignores the setting, and gemma-3 leaves it unset).
    text.update(final_logit_softcapping=30.0)
    vision.update(num_key_value_heads=2, head_dim=spec.vision_hidden_size // 2, patch_size=8)
    vision.update(position_embedding_size=64)
    config = transformers.Gemma4Config(
        text_config=text,
        vision_config=vision,
        video_token_id=tokenizer.convert_tokens_to_ids("<|video|>"),
        eoa_token_index=ids["eoa_token_id"],
        tie_word_embeddings=spec.tie_word_embeddings,
        **{k: v for k, v in ids.items() if k != "eoa_token_id"},
    )
    # 70 soft tokens is the image processor's smallest budget: a 112 px image gives 8 x 8 = 64.
    image_processor = Gemma4ImageProcessorPil(patch_size=8, max_soft_tokens=70)
    stock = image_only_processor("Gemma4Processor")  # the stock class minus its (torchvision) video processor
    processor = stock(Gemma4AudioFeatureExtractor(), image_processor, tokenizer, chat_template=template)
    return config, processor


def init(model) -> None:
    """Gemma 3's stock initialisation zeroes the image projection (it is trained from a pretrained tower), which
    would make a random model blind: draw it like the other weights so that images reach the loss."""
    import torch

    projector = getattr(model.model, "multi_modal_projector", None)
    if projector is not None:
        torch.nn.init.normal_(projector.mm_input_projection_weight, std=model.config.initializer_range)

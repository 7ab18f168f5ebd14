"""Generation for evaluation and rollouts: greedy answers, and G samples per prompt from one prefill.

Prompt once: to draw G completions of a prompt, the prompt (and its images) is run through the
model once, its KV cache is repeated G times, and decoding continues from the copies. Stock
``generate(num_return_sequences=G)`` would instead repeat the prompt G times before the prefill
(G times the prompt's compute and, unless features are passed, G image encodings).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_vlm.model.lora import unwrap
from lightning_vlm.model.vision import has_images, shared_vision


def _per_sequence(vision: dict[str, Any], shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Vision entries shaped like ``input_ids`` (``mm_token_type_ids``, ...)."""
    return {k: v for k, v in vision.items() if isinstance(v, torch.Tensor) and tuple(v.shape[:2]) == shape}


def _repeat_rope_deltas(model: nn.Module, times: int) -> None:
    """mRoPE models (Qwen2/2.5/3-VL, GLM-4.1V) keep each prompt's position offset from the prefill; the G
    copies of a prompt continue from the same offset."""
    for module in model.modules():
        deltas = getattr(module, "rope_deltas", None)
        if isinstance(deltas, torch.Tensor):
            module.rope_deltas = deltas.repeat_interleave(times, dim=0)


_VISION_TOKENS = ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id")
_VISION_TOKENS += ("vision_end_token_id", "boi_token_id", "eoi_token_id")
_VISION_TOKENS += ("audio_token_id", "boa_token_id", "eoa_token_id", "eoa_token_index")  # Gemma 4's audio side
_VISION_TOKENS += ("image_start_token_id", "image_end_token_id", "video_start_token_id", "video_end_token_id")
# Delimiters that only the tokenizer names (InternVL's <img> and </img>).
_TOKENIZER_VISION_TOKENS = ("start_image_token_id", "end_image_token_id")


def _vision_token_ids(model: nn.Module, tokenizer=None) -> list[int]:
    """Image placeholder and delimiter tokens: a completion that contained one would make the
    training forward expect image features that do not exist, so they are never sampled."""
    ids = {getattr(unwrap(model).config, name, None) for name in _VISION_TOKENS}
    ids |= {getattr(tokenizer, name, None) for name in _TOKENIZER_VISION_TOKENS}
    return sorted(int(i) for i in ids if isinstance(i, int))


class SeededSampling:
    """Sampling as ``argmax(scores + Gumbel noise)`` (the Gumbel-max trick: an exact draw from
    ``softmax(scores)``), with each row's noise from its own generator. A row's sample then depends on its
    seed and its own logits only, not on the other rows of the batch or on the rank that draws it.
    A ``LogitsProcessor`` for ``generate(do_sample=False)``, after the temperature and top-k/top-p warpers.
    """

    def __init__(self, seeds: list[int], device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        V = scores.shape[-1]
        u = torch.stack([torch.rand(V, generator=g, device=scores.device) for g in self.generators])
        return scores.float() - torch.log(-torch.log(u))  # u = 0 gives -inf: never drawn


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    vision: dict[str, Any],
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_return_sequences: int = 1,
    features: dict[str, Any] | None = None,
    min_new_tokens: int = 0,
    row_seeds: list[int] | None = None,
) -> torch.Tensor:
    """Generate from left-padded prompts; returns (B * G, N) completion ids, G = ``num_return_sequences``.

    The G samples of prompt i are rows ``i * G ... i * G + G - 1``, from one prefill of the prompt (see
    the module docstring); ``features`` (from ``encode_images``) replaces the image encoding of that
    prefill. Only the settings given here apply: the checkpoint's own ``generation_config`` (repetition
    penalty, default temperature, ...) is replaced, so evaluation is plain greedy and sampling is exactly
    what the caller asked for, except that image placeholder tokens are never generated. Generation
    stops at the tokenizer's EOS; finished rows are padded with the pad token. ``row_seeds`` (with
    ``do_sample``): one seed per output row; each row samples from its own generator
    (:class:`SeededSampling`), so its draw does not depend on the batch it is in.
    """
    import transformers

    G = num_return_sequences
    processors = transformers.LogitsProcessorList()
    if do_sample and row_seeds is not None:
        if len(row_seeds) != input_ids.shape[0] * G:
            raise ValueError(f"row_seeds: {len(row_seeds)} seeds for {input_ids.shape[0] * G} rows")
        # The warpers generate() would add for sampling, in its order, then the per-row draw.
        if temperature != 1.0:
            processors.append(transformers.TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(transformers.TopKLogitsWarper(top_k))
        if top_p < 1.0:
            processors.append(transformers.TopPLogitsWarper(top_p))
        processors.append(SeededSampling(row_seeds, input_ids.device))
        do_sample = False
    config = transformers.GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        do_sample=do_sample,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        suppress_tokens=_vision_token_ids(model, tokenizer) or None,
        **(dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}),
    )
    # generate() fills settings left at their defaults from the model's own config, so swap it out.
    base = unwrap(model)
    saved, base.generation_config = base.generation_config, config
    was_training = model.training
    model.eval()
    # Under FSDP2 every decoding step all-gathers weights: all ranks must step until the last one ends.
    settings = {"logits_processor": processors, "synced_gpus": _sharded(model)}
    try:
        if G == 1 and features is None:
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings, **vision)
        else:
            out = _generate_from_prefill(model, input_ids, attention_mask, vision, G, features, settings)
    finally:
        base.generation_config = saved
        model.train(was_training)
    return out[:, input_ids.shape[1] :]


def _generate_from_prefill(model, input_ids, attention_mask, vision, G, features, settings) -> torch.Tensor:
    shape = tuple(input_ids.shape)
    if has_images(vision) and features is not None:
        vision = shared_vision(vision, shape, 1, features)
    # The prefill covers all but the last prompt token, which generate() feeds as its first input.
    prefill = {k: v[:, :-1] if k in _per_sequence(vision, shape) else v for k, v in vision.items()}
    if not any(hasattr(m, "rope_deltas") for m in model.modules()):
        # Number left-padded prompts as generate() will number the tokens that follow (from the mask);
        # the model's default (0..P-2, pads included) would shift the prompt against its continuation.
        # mRoPE models (rope_deltas) derive their positions from the mask themselves.
        positions = attention_mask[:, :-1].long().cumsum(-1) - 1
        prefill["position_ids"] = positions.masked_fill(attention_mask[:, :-1] == 0, 0)
    out = model(
        input_ids=input_ids[:, :-1],
        attention_mask=attention_mask[:, :-1],
        use_cache=True,
        logits_to_keep=1,
        **prefill,
    )
    name = "cache" if "cache" in out else "past_key_values"  # transformers' newer name, and its older one
    cache = out[name]
    # (B, ...) -> (B * G, ...), prompt i's copies adjacent. reorder_cache, not batch_repeat_interleave: a
    # linear-attention layer (Qwen3.5's Gated DeltaNet: conv and recurrent states) has only the former.
    cache.reorder_cache(torch.arange(shape[0], device=input_ids.device).repeat_interleave(G))
    _repeat_rope_deltas(model, G)
    per_sequence = {k: v.repeat_interleave(G, dim=0) for k, v in _per_sequence(vision, shape).items()}
    return model.generate(
        input_ids=input_ids.repeat_interleave(G, dim=0),
        attention_mask=attention_mask.repeat_interleave(G, dim=0),
        **{name: cache},
        **settings,
        **per_sequence,
    )


def _sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())

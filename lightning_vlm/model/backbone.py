"""The one VLM wrapper that every objective composes.

It loads any ``AutoModelForImageTextToText`` checkpoint (hub id or local folder) with its
processor, applies freezing / LoRA / gradient checkpointing, computes completion-only token
log-probs (LM head and log-softmax on target positions only, in chunks), generates, and offers
a reference view (disabled adapters under LoRA, a frozen copy otherwise, nothing when unused).
Vision inputs travel as one dict and reach the model as ``**vision``.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_vlm.model import generation
from lightning_vlm.model.config import (  # noqa: F401 (re-exported)
    BackboneConfig,
    LoraSettings,
    as_backbone_config,
    check_is_vlm,
    resolve_path,
)
from lightning_vlm.model.lora import add_lora, disable_dropout, unwrap
from lightning_vlm.model.packing import packed_hidden
from lightning_vlm.model.processing import load_processor
from lightning_vlm.model.vision import encode_images, has_images, image_side_parameters, shared_vision

_VISION_ATTRS = ("visual", "vision_tower", "vision_model")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class VLMBackbone(nn.Module):
    """Load and wrap one VLM. The processor loads at once; the weights in :meth:`load`."""

    def __init__(self, config: BackboneConfig, need_reference: bool = False, disable_dropout: bool = True):
        """
        Args:
            config: What to load and how to train it (see :class:`BackboneConfig`).
            need_reference: Keep a reference policy (frozen copy, or disabled adapters under LoRA).
            disable_dropout: Zero every dropout at load, unless ``config.disable_dropout`` says otherwise.
        """
        super().__init__()
        if config.vision == "lora" and config.lora is None:
            raise ValueError("backbone.vision: 'lora' needs backbone.lora settings")
        self.config = config
        self.need_reference = need_reference
        self.disable_dropout = disable_dropout if config.disable_dropout is None else config.disable_dropout
        self.path, self.adapter = resolve_path(config)  # adapter: a peft folder, merged into its base at load
        self.hf_config = check_is_vlm(self.path, config.trust_remote_code)
        has_processor = self.adapter and (Path(self.adapter) / "processor_config.json").is_file()
        source = self.adapter if has_processor else self.path
        self.processor = load_processor(
            source, self.hf_config, config.trust_remote_code, **config.processor_kwargs
        )
        # token_logps applies the LM head itself, so it must repeat what the model does to logits.
        text_config = self.hf_config.get_text_config()
        self.logit_softcap = getattr(text_config, "final_logit_softcapping", None)
        if getattr(text_config, "logit_scale", None) not in (None, 1.0):
            raise NotImplementedError(f"{self.path}: logit_scale is not supported by token_logps yet")
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # one padding side for training and generation
        self.model: nn.Module | None = None
        self._reference: nn.Module | None = None  # hidden from state_dict and the optimizer
        # FSDP2 on ranks > 0: build on the meta device; the weights come from rank 0 after sharding.
        self.on_meta = False

    def load(self) -> None:
        """Load the weights and set trainability. Idempotent (Lightning may call it twice)."""
        if self.model is not None:
            return
        from transformers import AutoModelForImageTextToText

        cfg = self.config
        kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
        kwargs["dtype"] = "auto" if cfg.dtype == "auto" else _DTYPES[cfg.dtype]
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        if self.on_meta and not self.adapter:
            # FSDP2 on ranks > 0: structure only; lightning_vlm.model.parallel fills it from rank 0's weights.
            dtype = self.hf_config.dtype if cfg.dtype == "auto" else kwargs["dtype"]
            with torch.device("meta"):
                model = AutoModelForImageTextToText.from_config(self.hf_config, **{**kwargs, "dtype": dtype})
        else:
            model = AutoModelForImageTextToText.from_pretrained(self.path, **kwargs)
        if self.adapter:  # start from base + adapters; this run's LoRA (if any) goes on top
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, self.adapter).merge_and_unload()
        model.config.use_cache = False
        model.train()  # from_pretrained returns eval mode; Lightning expects training mode
        if cfg.gradient_checkpointing:
            ckpt = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # newer transformers 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
        model.requires_grad_(cfg.lora is None)
        if cfg.lora is None and cfg.vision == "frozen":
            self._vision_of(model).requires_grad_(False)
        if cfg.lora is not None:
            tower = self._vision_of(model)
            tower_name = next(name for name, mod in model.named_modules() if mod is tower)
            model = add_lora(model, cfg.lora, cfg.vision, tower, tower_name)
        elif self.need_reference:
            # Bypass nn.Module registration: no state_dict entries, no optimiser parameters.
            object.__setattr__(self, "_reference", copy.deepcopy(model).eval().requires_grad_(False))
        if self.disable_dropout:
            disable_dropout(model)
        self.model = model

    @staticmethod
    def _vision_of(model: nn.Module) -> nn.Module:
        base = unwrap(model)
        for owner in (base, getattr(base, "model", None)):
            for attr in _VISION_ATTRS:
                if owner is not None and isinstance(getattr(owner, attr, None), nn.Module):
                    return getattr(owner, attr)
        raise ValueError(
            f"cannot find the vision tower of {type(base).__name__} (looked for {_VISION_ATTRS})"
        )

    @property
    def vision_tower(self) -> nn.Module:
        return self._vision_of(self.model)

    def _apply(self, fn, recurse=True):
        # Keep the hidden reference copy on the policy's device and dtype.
        super()._apply(fn, recurse)
        if self._reference is not None:
            self._reference._apply(fn, recurse)
        return self

    def encode_images(self, vision: dict[str, Any], model: nn.Module | None = None) -> dict[str, Any]:
        """Run the image side (vision tower and projector) once on the batch's images.

        Returns transformers' ``mm_encoder_outputs`` (``{"image": output}``), which
        :meth:`hidden_states` can share between several sequences (chosen and rejected, the G
        samples of a prompt) and, when :attr:`vision_is_frozen`, between the policy and the reference.
        """
        model = model if model is not None else self.model
        return encode_images(unwrap(model), image_side_parameters(unwrap(model)), vision)

    @property
    def vision_is_frozen(self) -> bool:
        """Nothing on the image side trains (tower, projector or adapters on them), so the policy and
        the reference compute the same image features. peft adapters count even inside
        :meth:`reference`, whose ``disable_adapter`` switches their ``requires_grad`` off."""
        image_side = image_side_parameters(unwrap(self.model))
        return not any(p.requires_grad or "lora_" in n or "modules_to_save" in n for n, p in image_side)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        vision: dict[str, Any],
        model: nn.Module | None = None,
        copies: int = 1,
        features: dict[str, Any] | None = None,
        packed: bool = False,
    ) -> torch.Tensor:
        """Last hidden states of the language model, (copies * B, T, H).

        Args:
            input_ids: (copies * B, T) token ids.
            attention_mask: (copies * B, T) 1 on real tokens.
            vision: The processor's vision dict. With ``copies > 1`` it holds the images of B
                prompts once, and the rows of ``input_ids`` are ``copies`` blocks of B sequences
                that share them (row ``k * B + i`` sees prompt i's images); per-sequence entries
                (shaped like ``input_ids``, e.g. ``mm_token_type_ids``) cover all rows.
            model: Run this model instead of the policy (the reference copy).
            copies: Sequences per prompt; the images are encoded once and reused for each.
            features: Output of :meth:`encode_images` to reuse instead of running the tower.
            packed: Run the rows as one padding-free sequence (``lightning_vlm.model.packing``).
        """
        model = model if model is not None else self.model
        inner = unwrap(model).model
        if packed:
            return packed_hidden(inner, input_ids, attention_mask, vision)
        if has_images(vision) and (copies > 1 or features is not None):
            if features is None:
                features = self.encode_images(vision, model)
            vision = shared_vision(vision, tuple(input_ids.shape), copies, features)
        out = inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **vision)
        return out.last_hidden_state

    def token_logps(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        vision: dict[str, torch.Tensor],
        target_mask: torch.Tensor,
        model: nn.Module | None = None,
        copies: int = 1,
        features: dict[str, Any] | None = None,
        entropy: bool = False,
        temperature: float = 1.0,
        packed: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of each target token given everything before it.

        Only the hidden states that predict a target token go through the LM head, in chunks of
        ``logps_chunk_size`` that are recomputed in backward, so memory is ``chunk x vocab``.

        Args:
            input_ids, attention_mask, vision, model, copies, features, packed: As in :meth:`hidden_states`.
            target_mask: (B, T) bool, True at tokens to score (never position 0).
            entropy: Also return the entropy of the predicted distribution at each target (no gradient).
            temperature: Score under ``softmax(logits / temperature)``, the distribution that sampling at
                this temperature draws from (online RL's old, reference and training log-probs all use
                the rollout's temperature).

        Returns:
            (B, T) float32 log-probs, 0 where ``target_mask`` is False (and the (B, T) entropies).
        """
        hidden = self.hidden_states(input_ids, attention_mask, vision, model, copies, features, packed)
        targets = target_mask[:, 1:].bool()  # position t-1 predicts token t
        h, y = hidden[:, :-1][targets], input_ids[:, 1:][targets]  # (N, H), (N,)
        logps, ent = self.head_logps(h, y, model, entropy, temperature)
        out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
        ent_out = torch.zeros_like(out) if entropy else None
        out[:, 1:][targets] = logps
        if ent_out is not None:
            ent_out[:, 1:][targets] = ent
        return (out, ent_out) if entropy else out

    def head_logps(
        self, h: torch.Tensor, y: torch.Tensor, model: nn.Module | None, entropy: bool, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N,) log-probs of targets ``y`` from hidden states ``h`` (N, H) (and their entropies): the LM head in
        chunks of ``logps_chunk_size``, recomputed in backward (see :meth:`token_logps`)."""
        head = unwrap(model if model is not None else self.model).get_output_embeddings()
        chunk, parts, entropies = max(1, self.config.logps_chunk_size), [], []
        for start in range(0, h.shape[0], chunk):
            rows = slice(start, start + chunk)
            args = (h[rows], y[rows], head, self.logit_softcap, entropy, temperature)
            if torch.is_grad_enabled() and h.requires_grad:
                logps, ent = checkpoint(_chunk_logps, *args, use_reentrant=False)
            else:
                logps, ent = _chunk_logps(*args)
            parts, entropies = [*parts, logps], [*entropies, ent]
        none = [h.new_zeros(0, dtype=torch.float32)]  # no targets at all
        return torch.cat(parts or none), (torch.cat(entropies or none) if entropy else None)

    @contextlib.contextmanager
    def reference(self):
        """Yield the reference model: the policy with adapters disabled, or the frozen copy."""
        if self.config.lora is not None:
            with self.model.disable_adapter(), torch.no_grad():
                yield self.model
        elif self._reference is not None:
            with torch.no_grad():
                yield self._reference
        elif self.need_reference:
            raise RuntimeError("the reference copy was released after its log-probs were precomputed")
        else:
            raise RuntimeError("backbone was built without need_reference=True")

    def release_reference(self) -> None:
        """Free the frozen reference copy (once its log-probs are cached). Nothing to free under LoRA."""
        object.__setattr__(self, "_reference", None)

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vision: dict[str, Any], **settings: Any
    ) -> torch.Tensor:
        """Completion ids, (B * num_return_sequences, N): :func:`lightning_vlm.model.generation.generate` on
        the policy (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``, ``top_k``,
        ``num_return_sequences``, ``features``, ``min_new_tokens``). Prompt i's samples are adjacent
        rows and share one prefill of the prompt."""
        return generation.generate(self.model, self.tokenizer, input_ids, attention_mask, vision, **settings)

    def decode(self, completion_ids: torch.Tensor) -> list[str]:
        return self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)


def _chunk_logps(
    h: torch.Tensor,
    y: torch.Tensor,
    head: nn.Module,
    softcap: float | None,
    entropy: bool = False,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = head(h).float()  # (n, V)
    if softcap:  # Gemma-style final logit soft-capping
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    lse = logits.logsumexp(-1)  # (n,)
    ent = None
    if entropy:
        with torch.no_grad():
            logp = logits - lse[:, None]
            ent = -(logp.exp() * logp).sum(-1)
    return logits.gather(-1, y[:, None]).squeeze(-1) - lse, ent

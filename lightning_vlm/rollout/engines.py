"""Rollout engines: what turns a batch of prompts into G completions each.

The :class:`~lightning_vlm.rollout.RolloutCallback` owns one engine, chosen in YAML
(``rollout.engine: {class_path: lightning_vlm.rollout.HFEngine}``, the default). An engine sees a
:class:`GenerationRequest` (left-padded prompt ids, the prompts' vision inputs as one dict and,
when the caller encoded the images already, their features; G; the sampling settings; seeds) and
returns a :class:`Generation` (completion ids and, when it has them, its own per-token sampling
log-probs). Around that, three calls bind it to training:

- ``setup(backbone)`` once at fit start (an engine outside the trainer loads the policy here);
- ``sync_weights(backbone)`` after every optimiser step that changed the policy;
- ``samples_from_trainer``: True when the engine samples from the trainer's own weights and
  numerics, so its log-probs and the trainer's agree (no mismatch correction needed).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are drawn. ``do_sample=False`` is greedy decoding (held-out evaluation)."""

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    do_sample: bool = True


@dataclass
class GenerationRequest:
    """One batch of prompts to complete. Sample k of prompt i is output row ``i * num_samples + k``."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    vision: dict[str, Any]  # the processor's image inputs, as one dict
    num_samples: int  # G
    sampling: SamplingSettings
    features: dict[str, Any] | None = None  # the prompts' image features, when already encoded
    seed: int | None = None  # seeds the whole request (None: the current RNG state)
    row_seeds: list[int] | None = None  # one seed per output row: a row's draw is independent of its batch
    images: list[list[Any]] | None = None  # each prompt's raw (PIL) images, for engines that process them
    rows: list[int] | None = None  # each prompt's dataset row, for error messages


@dataclass
class Generation:
    """What an engine returns for a :class:`GenerationRequest`."""

    completion_ids: torch.Tensor  # (B*G, N), padded after EOS with the pad token
    logps: torch.Tensor | None = None  # (B*G, N) the engine's sampling log-probs, None when it has none


class RolloutEngine:
    """The interface every engine implements (see the module docstring)."""

    samples_from_trainer: bool = False

    def setup(self, backbone) -> None:
        """Bind to the policy's backbone at fit start."""
        raise NotImplementedError

    def generate(self, request: GenerationRequest) -> Generation:
        raise NotImplementedError

    def sync_weights(self, backbone) -> None:
        """Load the policy's current weights after an optimiser step (engines that hold a copy)."""


class HFEngine(RolloutEngine):
    """Hugging Face generation on the trainer's own model: each prompt is prefilled once and its G
    samples decode from that prefill; images are encoded once (or reused from ``features``); with
    ``row_seeds`` every sample draws from its own generator. It returns no log-probs of its own: its
    numerics are the trainer's, so the trainer's recomputed log-probs are the sampling ones."""

    samples_from_trainer = True

    def __init__(self) -> None:
        self.backbone = None

    def setup(self, backbone) -> None:
        self.backbone = backbone

    @torch.no_grad()
    def generate(self, request: GenerationRequest) -> Generation:
        if self.backbone is None:
            raise RuntimeError("HFEngine.generate before setup(backbone)")
        s, ids = request.sampling, request.prompt_ids
        devices = [ids.device] if ids.device.type == "cuda" else []
        settings: dict[str, Any] = dict(max_new_tokens=s.max_new_tokens)
        if s.do_sample:
            settings.update(
                min_new_tokens=s.min_new_tokens,
                do_sample=True,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=s.top_k,
                num_return_sequences=request.num_samples,
                features=request.features,
                row_seeds=request.row_seeds,
            )
        elif request.num_samples != 1:
            raise ValueError("greedy decoding draws one completion per prompt (num_samples=1)")
        with torch.random.fork_rng(devices=devices, device_type=ids.device.type):
            if request.seed is not None:
                torch.manual_seed(request.seed)
            out = self.backbone.generate(ids, request.prompt_mask, request.vision, **settings)
        return Generation(completion_ids=out)


def stable_seed(key: str) -> int:
    """A seed from a string key (the same in every process and run): sampling seeds that resume exactly."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:15], 16)

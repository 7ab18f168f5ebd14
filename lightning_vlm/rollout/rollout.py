"""A :class:`Rollout`: one prompt batch with its sampled, scored completions, the unit the
rollout side hands to an online objective (see ``lightning_vlm.rollout.callback``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_vlm.rollout.engines import SamplingSettings


@dataclass
class Rollout:
    """One prompt batch and its sampled, scored completions. Sample k of prompt i is row ``i * G + k``.

    The callback fills the first block. ``features`` holds the prompts' image features, computed
    without gradient at the weights that sampled: with a frozen image side every forward over the
    rollout reuses them; with a trained one only the policy's no-grad passes before the rollout's
    first optimiser step do (the old-policy pass), and training drops them.
    ``keep`` is False for samples whose group dynamic sampling dropped; they carry no loss. The
    objective fills the second block in its ``on_rollout`` hook.
    """

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    vision: dict[str, Any]
    features: dict[str, Any] | None
    completion_ids: torch.Tensor  # (B*G, N)
    completion_mask: torch.Tensor  # (B*G, N) 1 up to and including EOS
    group_size: int
    rewards: torch.Tensor  # (B*G,)
    rewards_per_function: dict[str, torch.Tensor]  # (B*G,) each, NaN where not applicable
    texts: list[str]
    truncated: torch.Tensor  # (B*G,) bool: reached max_new_tokens without EOS
    keep: torch.Tensor  # (B*G,) bool
    sampling: SamplingSettings
    index: int = 0  # the rollout's number in the run (training rollouts; resumes with the run)
    rows: list[int] = field(default_factory=list)  # dataset row of each prompt
    dynamic_sampling: bool = False  # groups of equal rewards may have been dropped (keep)
    engine_logps: torch.Tensor | None = None  # (B*G, N) the engine's own sampling log-probs, if any
    # ---- filled by the objective
    advantages: torch.Tensor | None = None  # (B*G,) per sample, or (B*G, N) per token (PPO)
    old_logps: torch.Tensor | None = None  # (B*G, N)
    ref_logps: torch.Tensor | None = None  # (B*G, N)
    policy_frozen: bool = False  # the policy's forwards run without gradient (PPO's critic warm-up)
    extra: dict[str, Any] = field(default_factory=dict)  # objective-specific (PPO values, ...)

    @property
    def num_prompts(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def max_new_tokens(self) -> int:
        return self.sampling.max_new_tokens

    @property
    def temperature(self) -> float:
        """Every log-prob over the rollout is taken at the sampling temperature (1 for greedy)."""
        return self.sampling.temperature if self.sampling.do_sample else 1.0

    def rows_of(self, samples: Sequence[int]) -> torch.Tensor:
        """Rollout rows of sample indices ``samples`` of every prompt, in block order (all prompts'
        sample ``samples[0]``, then ``samples[1]``, ...), which lets the forward share image features."""
        B, G = self.num_prompts, self.group_size
        return torch.tensor([i * G + k for k in samples for i in range(B)], device=self.prompt_ids.device)

    def sequences(self, samples: Sequence[int]) -> dict[str, Any]:
        """Model inputs for ``samples`` (see :meth:`rows_of`): prompt + completion, the completion
        positions to score, and ``copies`` for the vision-once forward."""
        rows, copies = self.rows_of(samples), len(samples)
        prompts = torch.arange(self.num_prompts, device=rows.device).repeat(copies)  # (copies*B,)
        P, N = self.prompt_ids.shape[1], self.completion_ids.shape[1]
        ids = torch.cat([self.prompt_ids[prompts], self.completion_ids[rows]], dim=1)  # (copies*B, P+N)
        mask = torch.cat([self.prompt_mask[prompts], self.completion_mask[rows]], dim=1)
        target = torch.zeros_like(mask)
        target[:, P:] = self.completion_mask[rows]
        vision = {}
        for key, value in self.vision.items():  # per-sequence entries (mm_token_type_ids): zeros after P
            if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(self.prompt_ids.shape):
                value = torch.cat([value[prompts], value.new_zeros(len(rows), N)], dim=1)
            vision[key] = value
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "target_mask": target,
            "vision": vision,
            "copies": copies,
            "rows": rows,
            "prompt_length": P,
        }


def completion_mask(ids: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask up to and including the first EOS, truncated = no EOS) for (R, N) completion ids."""
    is_eos = ids == eos_id
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(ids[:, 0], ids.shape[1]))
    mask = torch.arange(ids.shape[1], device=ids.device)[None, :] <= first[:, None]
    return mask.long(), ~is_eos.any(1)

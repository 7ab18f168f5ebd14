"""Loss functions: pure tensor maths, one file per family; this module only re-exports them.

Contract (shared/DESIGN.md): each function returns ``(loss, metrics)``, ``loss`` a scalar tensor
and ``metrics`` a dict of detached tensors. Shapes: B sequences, L completion tokens; ``mask`` is
1 on real completion tokens; sequence log-probs are sums over completion tokens.
"""

from lightning_vlm.losses.group import group_advantages, grpo_loss, gspo_loss, rloo_advantages
from lightning_vlm.losses.ppo import explained_variance, gae, kl_penalty_rewards, masked_whiten, ppo_losses
from lightning_vlm.losses.preference import bco_pair_loss, dpo_loss, hinge_loss, ipo_loss, reward_model_loss
from lightning_vlm.losses.sft import sft_loss
from lightning_vlm.losses.steps import StepTotals, over_step, tis_weights

__all__ = [
    "StepTotals",
    "over_step",
    "bco_pair_loss",
    "dpo_loss",
    "explained_variance",
    "gae",
    "group_advantages",
    "grpo_loss",
    "gspo_loss",
    "hinge_loss",
    "ipo_loss",
    "kl_penalty_rewards",
    "masked_whiten",
    "ppo_losses",
    "reward_model_loss",
    "rloo_advantages",
    "sft_loss",
    "tis_weights",
]

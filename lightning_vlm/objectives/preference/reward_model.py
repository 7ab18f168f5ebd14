"""A vision-language reward model trained on preference pairs (Bradley-Terry).

Paper: Ouyang et al. 2022 (InstructGPT), https://arxiv.org/abs/2203.02155, section 3.5; the margin
follows Llama 2 (https://arxiv.org/abs/2307.09288) and the centring term Eisenstein et al. 2023
(https://arxiv.org/abs/2312.09244).
The shared backbone reads the image(s), the prompt and a response; a scalar head on the last
hidden state of the last non-padding token gives the response's score. The loss makes the chosen
response's score exceed the rejected one's (``-logsigmoid(rc - rr - margin)``), optionally keeping
scores centred on 0. Chosen and rejected share the prompt's images, encoded once per pair.
Closest sibling: DPO, which learns the same preferences as an implicit reward inside the policy
instead of a separate scorer. The trained model exports as an HF folder plus ``reward_head``
files, and :meth:`RewardModel.from_pretrained` loads it back to score rollouts. :class:`Critic`,
PPO's value model, starts from the same export and reads the head at every position.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn

from lightning_vlm.data.collate import encode_blocks, render, stack_blocks
from lightning_vlm.data.preference import prompt_messages, response_messages
from lightning_vlm.data.rows import as_list, open_image
from lightning_vlm.losses import reward_model_loss
from lightning_vlm.model.backbone import BackboneConfig, VLMBackbone
from lightning_vlm.model.prefix import shared_prefix_hidden, split
from lightning_vlm.model.vision import has_images
from lightning_vlm.objectives.preference.base import PreferenceObjective
from lightning_vlm.objectives.preference.pairs import PairLogps

HEAD_FILE, HEAD_CONFIG = "reward_head.safetensors", "reward_head.json"


class RewardModel(PreferenceObjective):
    """Backbone + scalar head, trained with the Bradley-Terry loss on image preference pairs."""

    score_names = ("score_chosen", "score_rejected")

    def __init__(self, backbone: BackboneConfig, center_coef: float | None = None, **kwargs: Any):
        """
        Args:
            backbone: The VLM to turn into a scorer (usually the SFT model; LoRA works too).
            center_coef: Weight of ``mean((rc + rr)**2)`` that keeps scores near 0 (e.g. 0.01);
                ``null`` turns it off. A ``margin`` column in the data is used when present.
            **kwargs: ``table_rows``, ``shared_prefix`` (see :class:`PreferenceObjective`) and the optimisation settings of
                :class:`VLMObjective` (lr, schedule, ...).
        """
        super().__init__(backbone, **kwargs)
        hidden = self.backbone.hf_config.get_text_config().hidden_size
        self.head = nn.Linear(hidden, 1)
        nn.init.normal_(self.head.weight, std=1 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        self.pairs = PairLogps(self.backbone, shared_prefix=self.hparams.shared_prefix)  # its split only

    def load_models(self) -> None:
        super().load_models()
        freeze_lm_head(self.backbone.model)

    def scores(self, input_ids, attention_mask, vision, copies: int = 1, features=None) -> torch.Tensor:
        """(N,) score of each sequence, read at its last non-padding token (``copies``, ``features``: as
        in :meth:`VLMBackbone.hidden_states`)."""
        hidden = self.backbone.hidden_states(input_ids, attention_mask, vision, None, copies, features)
        return self._last(hidden, attention_mask)

    def _last(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N,) the head read at each row's last real token (left or right padding)."""
        last = mask.cumsum(-1).argmax(-1)  # (N,) the first index where the count of real tokens peaks
        return read_head(self.head, hidden[torch.arange(hidden.shape[0], device=hidden.device), last])

    def _loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        split = self.pairs.split(batch)
        if split is not None:  # each prompt once; the scores are read at each response's last token
            inputs = split[0]
            s = self._last(shared_prefix_hidden(self.backbone, *inputs, own=True), inputs[3])  # (2B,)
        else:
            s = self.scores(batch["input_ids"], batch["attention_mask"], batch["vision"], batch["copies"])
        chosen, rejected = s.chunk(2)  # (B,), (B,)
        self.pair_scores = chosen.detach(), rejected.detach()
        margin = batch.get("margin")
        if margin is not None:
            margin = torch.tensor(margin, device=s.device)
        return reward_model_loss(chosen, rejected, margin=margin, center_coef=self.hparams.center_coef)

    # ------------------------------------------------------------------ export / load
    def save_extra(self, folder: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """Write the head beside an exported backbone (called by ``ExportHF``; ``state``: the module's
        full state dict when it was gathered from FSDP2 shards)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        head = (
            {k: state[f"head.{k}"] for k in ("weight", "bias")}
            if state is not None
            else self.head.state_dict()
        )
        save_file({k: v.detach().cpu().contiguous() for k, v in head.items()}, folder / HEAD_FILE)
        (folder / HEAD_CONFIG).write_text(json.dumps({"hidden_size": self.head.in_features}))

    @classmethod
    def from_pretrained(cls, folder: str, **backbone: Any) -> RewardModel:
        """Load an exported reward model (HF folder + head) in eval mode, ready to score.

        Args:
            folder: What ``ExportHF`` wrote for a RewardModel run.
            **backbone: Extra :class:`BackboneConfig` settings (dtype, attn_implementation, ...).
        """
        head = load_head(folder)
        model = cls(BackboneConfig(model_name_or_path=str(folder), **backbone))
        model.configure_model()
        model.head.load_state_dict(head)
        return model.eval().requires_grad_(False)


def read_head(head: nn.Linear, h: torch.Tensor) -> torch.Tensor:
    """The scalar head on hidden states ``h`` (..., H): (...) float32 scores."""
    return head(h.to(head.weight.dtype)).squeeze(-1).float()


def load_head(folder: str | Path) -> dict[str, torch.Tensor]:
    """The scalar head (``weight`` (1, H), ``bias`` (1,)) of a reward model export."""
    from safetensors.torch import load_file

    head = Path(folder) / HEAD_FILE
    if not head.is_file():
        raise FileNotFoundError(f"{folder}: no {HEAD_FILE} (not a reward model export)")
    return load_file(str(head))


def freeze_lm_head(model: nn.Module) -> None:
    """A scorer never uses the LM head: freeze it (a head tied to the input embeddings stays trainable)."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and out.weight is not inp.weight:
        out.requires_grad_(False)


class Critic(nn.Module):
    """The value model: a VLM and a scalar head read at every position, started from a reward model
    export (the RewardModel's backbone and head, as ``ExportHF`` wrote them)."""

    def __init__(self, config: BackboneConfig):
        super().__init__()
        if config.model_name_or_path is None:
            raise ValueError("model.critic.model_name_or_path: the critic starts from a reward model export")
        head = load_head(config.model_name_or_path)  # fails early, naming the folder
        self.backbone = VLMBackbone(config)
        self.head = nn.Linear(head["weight"].shape[1], 1)
        self.head.load_state_dict(head)

    def load(self) -> None:
        self.backbone.load()
        freeze_lm_head(self.backbone.model)

    def values(
        self, seq: dict[str, Any], features: dict | None = None, shared_prefix: bool = False
    ) -> torch.Tensor:
        """(R, N) value of the state before each completion token (``Rollout.sequences`` inputs); with
        ``shared_prefix``, from one forward of each prompt (``lightning_vlm.model.prefix``)."""
        if shared_prefix:
            h = shared_prefix_hidden(self.backbone, *split(seq), features=features)  # (R, N, H)
            return read_head(self.head, h)
        hidden = self.backbone.hidden_states(
            seq["input_ids"], seq["attention_mask"], seq["vision"], copies=seq["copies"], features=features
        )  # (R, P+N, H)
        P = seq["prompt_length"]
        h = hidden[:, P - 1 : -1]  # position t-1 holds the state in which token t is chosen
        return read_head(self.head, h)


def check_compatible(policy: VLMBackbone, critic: VLMBackbone) -> None:
    """The critic reads the policy's token ids and vision inputs: same family, same vocabulary."""
    a, b = policy.hf_config.model_type, critic.hf_config.model_type
    if a != b:
        raise ValueError(
            f"model.critic ({critic.path}) is a {b} model but the policy is {a}: use the same family"
        )
    if policy.tokenizer.get_vocab() != critic.tokenizer.get_vocab():
        raise ValueError(
            f"model.critic ({critic.path}): its tokenizer differs from the policy's; the critic reads the "
            "policy's token ids, so train the reward model from the same base as the policy"
        )


class RewardModelReward:
    """A learned reward model as a reward function: the score of each (prompt, completion).

    The model is one trained with :class:`~lightning_vlm.objectives.RewardModel` (Bradley-Terry, as
    in InstructGPT, https://arxiv.org/abs/2203.02155) and exported by ``ExportHF``. Each completion
    is rendered exactly as the reward model's training pairs were (the prompt's messages plus one
    assistant message holding the completion, through the reward model's own chat template and
    processor, with the sample's images), and scored at its last token. The model loads once, on the
    first call, so parsing a config stays cheap. Images come from the ``images`` keyword (the
    rollout passes each prompt's opened images; paths are read relative to the working directory).
    The completions of one prompt (the rollout's ``group`` keyword) share its images, which are
    processed and encoded once for them all.
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 8,
        device: str | None = None,
        dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None,
    ):
        """
        Args:
            path: Folder written by ``ExportHF`` for a RewardModel run (HF weights + ``reward_head``).
            batch_size: Sequences scored per forward.
            device: Where the reward model runs (default: ``cuda`` when available, else ``cpu``).
            dtype: Dtype of its weights (``auto``, ``float32``, ``bfloat16``, ``float16``; default:
                the backbone's default, ``float32``).
        """
        if batch_size < 1:
            raise ValueError(f"RewardModelReward: batch_size must be >= 1, got {batch_size}")
        self.path = path
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.model = None

    def load(self):
        """The reward model, loaded on first use (eval mode, on ``device``)."""
        if self.model is None:
            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            extra = {"dtype": self.dtype} if self.dtype else {}
            self.model = RewardModel.from_pretrained(self.path, **extra).to(device)
        return self.model

    def __call__(
        self,
        prompts: Sequence,
        completions: Sequence[str],
        images: Sequence | None = None,
        group: Sequence[int] | None = None,
        **row,
    ) -> list[float | None]:
        model = self.load()
        processor = model.backbone.processor
        device = next(model.parameters()).device
        n = len(completions)
        images = images if images is not None else [None] * n
        G = n // len(set(group)) if group else 1  # completions per prompt, which sit together
        if group and list(group) != [g for g in dict.fromkeys(group) for _ in range(G)]:
            raise ValueError("RewardModelReward: 'group' must hold each prompt's completions together")
        opened = [[open_image(ref, ".", i) for ref in as_list(images[i])] for i in range(0, n, G)]  # prompts'
        texts = []
        for i, (prompt, completion, _) in enumerate(zip(prompts, completions, images, strict=True)):
            n_images = len(opened[i // G])
            messages = prompt_messages(prompt, n_images, i) + response_messages(completion, i, "completion")
            texts.append(render(processor, messages))  # as PreferenceCollator renders "chosen"
        # A forward scores ``copies`` completions of each of ``per_forward`` prompts (in block order);
        # the prompts' images are processed and encoded once for all their completions.
        per_forward, copies = max(1, self.batch_size // G), min(G, self.batch_size)
        scores = torch.zeros(n)
        with torch.no_grad():
            for start in range(0, len(opened), per_forward):
                part = range(start, min(start + per_forward, len(opened)))  # these prompts
                ims = [im for j in part for im in opened[j]]
                blocks = encode_blocks(processor, [[texts[j * G + k] for j in part] for k in range(G)], ims)
                features = None
                for k in range(0, G, copies):
                    chunk = blocks[k : k + copies]  # completions k, k+1, ... of each prompt in ``part``
                    b = move_data_to_device(stack_blocks(chunk, processor.tokenizer.pad_token_id), device)
                    if features is None and has_images(b["vision"]):
                        features = model.backbone.encode_images(b["vision"])
                    s = model.scores(b["input_ids"], b["attention_mask"], b["vision"], len(chunk), features)
                    scores[[j * G + c for c in range(k, k + len(chunk)) for j in part]] = s.cpu()
        return scores.tolist()

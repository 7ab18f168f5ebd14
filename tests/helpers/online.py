"""Shared helpers of the online-RL tests: tiny objectives, prompt batches, rollouts as the objective
receives them, plain full-vocabulary log-probs, call counters, and the discovery of the online
objectives that the parametrised tests run over."""

from __future__ import annotations

import inspect

import lightning as L
import pytest
import torch

import lightning_vlm.objectives as objectives
from lightning_vlm import BackboneConfig, TinyVLM
from lightning_vlm.data import PromptDataModule
from lightning_vlm.data.prompt import PromptCollator
from lightning_vlm.model.lora import unwrap
from lightning_vlm.objectives import GRPO, OnlineObjective
from lightning_vlm.objectives.online import OnlineSettings, loop
from lightning_vlm.rollout import Rollout, RolloutCallback
from tests.helpers.processing import tower_input

B, G, NEW = 2, 4, 4  # prompts per batch, completions per prompt, max_new_tokens


# ---------------------------------------------------------------- which objectives the tests cover
def online_objectives() -> list[type[OnlineObjective]]:
    """Every online objective in ``lightning_vlm.objectives.__all__`` that builds from a backbone alone
    (no other required ``__init__`` parameter; PPO needs a critic and has its own tests), so a new
    one-file objective is picked up by the parametrised tests without a new test file."""
    found = []
    for name in objectives.__all__:
        cls = getattr(objectives, name)
        if not (inspect.isclass(cls) and issubclass(cls, OnlineObjective)) or cls is OnlineObjective:
            continue
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # after self
        required = [
            p.name
            for p in params
            if p.default is inspect.Parameter.empty
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]
        if required == ["backbone"]:
            found.append(cls)
    return found


# Keyword arguments that turn an objective's KL to the reference on, where ``beta`` does not.
KL_KWARGS: dict[str, dict] = {}


def kl_kwargs(cls) -> dict | None:
    """What makes ``cls`` keep and use a reference: its entry in ``KL_KWARGS``, else ``beta=0.1`` when
    it has a ``beta``; None when neither (its reference checks are skipped)."""
    if cls.__name__ in KL_KWARGS:
        return KL_KWARGS[cls.__name__]
    return {"beta": 0.1} if "beta" in inspect.signature(cls.__init__).parameters else None


def with_kl(cls) -> dict:
    kw = kl_kwargs(cls)
    if kw is None:
        pytest.skip(f"{cls.__name__}: no known setting turns a KL to the reference on")
    return kw


# ---------------------------------------------------------------- rewards
def token_reward(prompts, completions, completion_ids, **row):
    """Varies between the samples of a group (so advantages are non-zero) and is cheap."""
    return [float(sum((i + 1) * t for i, t in enumerate(ids)) % 101) for ids in completion_ids]


def even_prompts(prompts, completions, completion_ids, group, **row):
    """Applies to even prompts only (None elsewhere): the completion's token count."""
    return [None if g % 2 else float(len(ids)) for ids, g in zip(completion_ids, group, strict=True)]


# ---------------------------------------------------------------- data, modules, rollouts
def prompt_dm(processor, synthetic_dir, batch_size=B, **kw) -> PromptDataModule:
    dm = PromptDataModule(train=str(synthetic_dir / "prompt_train.jsonl"),
                          val=str(synthetic_dir / "prompt_val.jsonl"), batch_size=batch_size, **kw)  # fmt: skip
    dm.processor = processor
    dm.setup("fit")
    return dm


def prompt_batch(dm, n: int | None = None, start: int = 0) -> dict:
    """Rows ``start..start+n`` of the training split, collated like a training batch."""
    ds = dm.datasets["train"]
    n = n or dm.hparams.batch_size
    return PromptCollator(dm.processor)([ds[i] for i in range(start, start + n)])


def build(cls=GRPO, family="qwen2_vl", vision="frozen", lora=None, loop=None, checkpointing=False, **kw):
    """A configured tiny objective; ``loop``: keyword arguments of ``OnlineSettings``; ``checkpointing``:
    ``backbone.gradient_checkpointing``."""
    torch.manual_seed(0)
    if loop is not None:
        kw["loop"] = OnlineSettings(**loop)
    config = BackboneConfig(
        tiny=TinyVLM(family=family), vision=vision, lora=lora, gradient_checkpointing=checkpointing
    )
    module = cls(config, **kw)
    module.configure_model()
    return module


def rollout_callback(rewards=(token_reward,), **kw) -> RolloutCallback:
    return RolloutCallback(**{"num_generations": G, "max_new_tokens": NEW, "rewards": list(rewards),
                              "table_every_n_steps": 0, **kw})  # fmt: skip


def bind(callback: RolloutCallback, module) -> RolloutCallback:
    """``callback`` set up for ``module`` as at fit start (its engine bound to the module's backbone), to
    sample outside a Trainer."""
    callback.setup(None, module, "fit")
    return callback


def prepared_rollout(module, batch, callback=None) -> Rollout:
    """A training rollout as the objective trains on it: sampled and scored by the callback, then given
    its old/reference log-probs and advantages by the objective's ``on_rollout``."""
    r = bind(callback or rollout_callback(), module).sample(module, batch)
    module.on_rollout([r], "train")
    (taken,) = module._rollouts.pop("train")  # handed over, but not trained on here
    return taken


def fit(module, synthetic_dir, callbacks, steps=1, batch_size=B, **trainer):
    dm = PromptDataModule(train=str(synthetic_dir / "prompt_train.jsonl"),
                          val=str(synthetic_dir / "prompt_val.jsonl"), batch_size=batch_size)  # fmt: skip
    settings = dict(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    trainer = L.Trainer(callbacks=list(callbacks), **{**settings, **trainer})
    trainer.fit(module, dm)
    return trainer


class Spy(L.Callback):
    """Keeps every training step's rollouts as the objective received them (after its ``on_rollout``:
    with their old/reference log-probs and advantages) and optionally runs ``probe(module, rollouts)``
    right then, before the step's update. It wraps the objective's hand-over hook, so its place among
    the callbacks does not matter."""

    def __init__(self, probe=None):
        self.probe, self.rollouts, self.probes = probe, [], []

    def setup(self, trainer, module, stage):
        hand_over = module.on_rollout

        def on_rollout(rollouts, stage):
            hand_over(rollouts, stage)
            if stage == "train":
                self.rollouts.append(rollouts)
                if self.probe is not None:
                    self.probes.append(self.probe(module, rollouts))

        module.on_rollout = on_rollout

    def teardown(self, trainer, module, stage):
        module.__dict__.pop("on_rollout", None)


# ---------------------------------------------------------------- independent log-probs
def _extend(vision: dict, shape: tuple, n: int) -> dict:
    """A single prompt's vision dict for the prompt followed by ``n`` completion tokens."""
    return {k: torch.cat([v, v.new_zeros(v.shape[0], n)], 1)
            if isinstance(v, torch.Tensor) and tuple(v.shape) == shape else v
            for k, v in vision.items()}  # fmt: skip


@torch.no_grad()
def plain_logps(model, dm, rollout, rows: list, temperature: float = 1.0) -> torch.Tensor:
    """(B*G, N) log-probs from plain full-vocabulary forwards: per prompt, its G sequences (the prompt
    unpadded, collated G times so each sequence has its own copy of the images, then the completion,
    masked after EOS); no shared features, no copies, no chunks."""
    G, N = rollout.group_size, rollout.completion_ids.shape[1]
    ds = dm.datasets["train"]
    by_row = {ds[i]["__row"]: i for i in range(len(ds))}
    out = torch.zeros(rollout.completion_ids.shape)
    for i, row in enumerate(rows):
        many = PromptCollator(dm.processor)([ds[by_row[row]]] * G)
        ids, cmask = rollout.completion_ids[i * G : (i + 1) * G], rollout.completion_mask[i * G : (i + 1) * G]
        P = many["input_ids"].shape[1]
        assert many["attention_mask"].all()  # one prompt G times: no padding
        full = torch.cat([many["input_ids"], ids * cmask], 1)
        vision = _extend(many["vision"], tuple(many["input_ids"].shape), N)
        logits = model(
            input_ids=full, attention_mask=torch.cat([many["attention_mask"], cmask], 1), **vision
        ).logits
        logits = logits[:, P - 1 : -1].float() / temperature
        out[i * G : (i + 1) * G] = logits.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1) * cmask
    return out


@torch.no_grad()
def sharpen(model, factor: float = 4.0) -> None:
    """Scale the random weights up: the untrained tiny models otherwise repeat one token whatever the
    prompt, and a greedy comparison would prove little. A zero-centred norm (``x * (1 + weight)``, weight
    0 at initialisation: Qwen3.5, Gemma) gets the same gain as the others' ``x * weight``."""
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.mul_(factor)
        elif name.endswith("norm.weight") and not p.any():
            p.fill_(factor - 1)


def snapshot(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# ---------------------------------------------------------------- counting and manual training
def count_calls(module) -> dict[str, list]:
    """The policy's vision tower calls (patches fed) and language-model calls, the policy's and its
    reference copy's when it keeps one ((batch, length), grad on?)."""
    bb = module.backbone
    seen: dict[str, list] = {"tower": [], "lm": []}
    bb.vision_tower.register_forward_hook(
        lambda mod, args, kw, out: seen["tower"].append(tower_input(args, kw).shape[0]), with_kwargs=True
    )

    def lm(mod, args, kwargs):
        x = kwargs.get("inputs_embeds")
        x = x if x is not None else kwargs.get("input_ids")
        seen["lm"].append((x.shape[0], x.shape[1], torch.is_grad_enabled()))

    for model in (bb.model, bb._reference):
        if model is not None:
            unwrap(model).model.language_model.register_forward_pre_hook(lm, with_kwargs=True)
    return seen


class Batches(L.Callback):
    """Keeps each training batch's patch count and images (before the step)."""

    def __init__(self):
        self.patches, self.images = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.patches.append(batch["vision"]["pixel_values"].shape[0])
        self.images.append(batch["images"])


class _Capture:
    """Stands in for the optimiser in ``loop.train``: keeps each optimiser step's gradients."""

    def __init__(self, module):
        self.params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.grads: list[dict[str, torch.Tensor]] = []

    def step(self):
        self.grads.append({n: p.grad.clone() for n, p in self.params if p.grad is not None})

    def zero_grad(self):
        for _, p in self.params:
            p.grad = None


def train_manually(module, rollouts, accumulation):
    """``loop.train`` outside a Trainer with ``accumulation`` forwards per optimiser step: the
    backward losses and each optimiser step's gradients."""
    module.settings.accumulation = accumulation
    opt, losses = _Capture(module), []
    module.optimizers = lambda: opt
    module.lr_schedulers = lambda: None

    def backward(loss):
        losses.append(loss.detach())
        loss.backward()

    module.manual_backward = backward
    with pytest.warns(UserWarning, match="self.log"):
        loop.train(module, rollouts)
    return torch.stack(losses), opt.grads

"""Shared prefix (``lightning_vlm.model.prefix``): one forward of each prompt, its KV cache repeated for the
copies, gives the log-probs, entropies, router loss and gradients of the per-sequence forward, for every
tiny family. Tolerances (float32): atol 1e-5 on log-probs; gradients within 1e-5 + 1e-4 of each gradient's largest entry."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers.cache_utils import Cache

from lightning_vlm import BackboneConfig, LoraSettings, TinyVLM, VLMBackbone
from lightning_vlm.model.moe import capture_router_logits, load_balancing_loss, moe_layout
from lightning_vlm.model.prefix import UNSUPPORTED, fallback_reason, shared_prefix_aux, shared_prefix_logps
from lightning_vlm.model.tiny import FAMILIES
from tests.helpers.online import prompt_batch, prompt_dm
from tests.model.test_families import backbones  # noqa: F401 (a fixture)

COPIES, N = 3, 4
LENGTHS = [4, 2, 3, 1, 4, 3]  # completion tokens of each row (right padding), COPIES * 2 rows


def _inputs(bb: VLMBackbone, synthetic_dir) -> dict:
    """2 left-padded prompts of different lengths (one and two images), COPIES completions of each of
    different lengths, in block order (row k * B + i is copy k of prompt i)."""
    batch = prompt_batch(prompt_dm(bb.processor, synthetic_dir), start=1)
    mask = batch["attention_mask"]
    assert mask.sum(1).unique().numel() == 2 and (mask[:, 0] == 0).any()  # left padding
    R = COPIES * mask.shape[0]
    words = bb.tokenizer("the red circle is left of the blue square", add_special_tokens=False)["input_ids"]
    ids = torch.tensor(words)[torch.randint(len(words), (R, N), generator=torch.Generator().manual_seed(0))]
    cmask = (torch.arange(N)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    ids = ids.masked_fill(cmask == 0, bb.tokenizer.pad_token_id)
    return {"prompt_ids": batch["input_ids"], "prompt_mask": mask, "completion_ids": ids, "completion_mask": cmask,
            "vision": batch["vision"]}  # fmt: skip


def _per_sequence(bb: VLMBackbone, x: dict, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rows as COPIES * B full prompt + completion sequences (``Rollout.sequences``' layout)."""
    (B, P), R = x["prompt_ids"].shape, x["completion_ids"].shape[0]
    index = torch.arange(B).repeat(R // B)
    ids = torch.cat([x["prompt_ids"][index], x["completion_ids"]], 1)
    mask = torch.cat([x["prompt_mask"][index], x["completion_mask"]], 1)
    target = torch.zeros_like(mask)
    target[:, P:] = x["completion_mask"]
    vision = {k: torch.cat([v[index], v.new_zeros(R, N)], 1) if tuple(getattr(v, "shape", ())) == (B, P) else v
              for k, v in x["vision"].items()}  # fmt: skip
    lp, ent = bb.token_logps(ids, mask, vision, target, copies=R // B, entropy=True, **kw)
    return lp[:, P:], ent[:, P:]


@contextlib.contextmanager
def _checkpointed(bb: VLMBackbone, on: bool):
    """Activation checkpointing as ``backbone.gradient_checkpointing`` turns it on (non-reentrant), for the
    block; yields the count of cache updates (attention and linear attention), replays in backward included."""
    calls = [0]

    def counted(original):
        return lambda *a, **k: calls.__setitem__(0, calls[0] + 1) or original(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        for name in ("update", "update_conv_state"):
            mp.setattr(Cache, name, counted(getattr(Cache, name)))
        # transformers' newer names, and the older ones (the vLLM venv's 5.19)
        new = hasattr(bb.model, "activation_checkpointing_enable")
        prefix = "activation" if new else "gradient"
        if on:
            getattr(bb.model, f"{prefix}_checkpointing_enable")(**{f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}})
        try:
            yield calls
        finally:
            getattr(bb.model, f"{prefix}_checkpointing_disable")()


def _both(bb: VLMBackbone, x: dict, checkpointing: bool = False, **kw) -> list:
    """(log-probs, entropies, gradients of every trainable weight) per sequence, then with the shared prefix
    (with ``checkpointing``: under activation checkpointing, against the per-sequence forward without)."""
    params = [p for p in bb.model.parameters() if p.requires_grad]
    weights = torch.rand(x["completion_ids"].shape, generator=torch.Generator().manual_seed(1)) + 0.5
    lp, ent = _per_sequence(bb, x, **kw)
    results = [(lp, ent, torch.autograd.grad((lp * weights).sum(), params, allow_unused=True))]
    counts = []
    for on in (False, checkpointing) if checkpointing else (False,):
        with _checkpointed(bb, on) as calls:
            lp, ent = shared_prefix_logps(bb, *x.values(), entropy=True, **kw)
            grads = torch.autograd.grad((lp * weights).sum(), params, allow_unused=True)
        counts.append(calls[0])
    if checkpointing:  # backward replayed every layer, cache updates included: the mechanism was exercised
        assert counts[1] == 2 * counts[0] > 0, counts
    return [*results, (lp, ent, grads)]


def _assert_same_grads(a, b) -> None:
    """Equal up to 1e-4 of each gradient's scale (its largest entry): summation order differs, and Gemma's
    scaled embeddings have entries ~80 next to ones ~1e-2."""
    for x, y in zip(a, b, strict=True):
        assert (x is None) == (y is None)  # LLaVA's last vision block feeds nothing: None on both sides
        assert x is None or (x - y).abs().max() <= 1e-5 + 1e-4 * y.abs().max(), (x - y).abs().max()


def _assert_equal(results: list, mask: torch.Tensor) -> None:
    (a, ea, ga), (b, eb, gb) = results
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert torch.allclose(ea, eb, atol=1e-5) and (b[mask == 0] == 0).all() and (b[mask == 1] < 0).all()
    _assert_same_grads(ga, gb)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("vision", ["frozen", "train"])
@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefix_equals_per_sequence(family, vision, checkpointing, backbones, synthetic_dir):  # noqa: F811
    """Also under activation checkpointing (the zoo's online recipes), where backward replays each layer with
    the cache: against the per-sequence forward without checkpointing."""
    bb = backbones(family, vision)
    x = _inputs(bb, synthetic_dir)
    _assert_equal(_both(bb, x, checkpointing), x["completion_mask"])
    if vision == "frozen":  # precomputed (rollout) features and the sampling temperature
        with torch.no_grad():  # as the rollout's (LLaVA's projector trains with a frozen tower)
            features = bb.encode_images(x["vision"])
        both = _both(bb, x, checkpointing, features=features, temperature=0.7)
        _assert_equal(both, x["completion_mask"])


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("family, vision", [("qwen2_vl", "lora"), ("qwen2_vl", "train"), ("gemma3", "lora")])
def test_shared_prefix_with_lora_and_its_reference(family, vision, checkpointing, synthetic_dir):
    """Adapters on the language model, and on the tower (``vision: lora``) or a fully trained tower; also
    under activation checkpointing."""
    torch.manual_seed(0)
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    bb = VLMBackbone(
        BackboneConfig(tiny=TinyVLM(family=family), lora=lora, vision=vision, logps_chunk_size=5)
    )
    bb.load()
    x = _inputs(bb, synthetic_dir)
    with torch.no_grad():  # adapters that change the output (peft starts them at zero)
        for name, p in bb.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    _assert_equal(_both(bb, x, checkpointing), x["completion_mask"])
    with bb.reference() as ref:
        a, b = _per_sequence(bb, x, model=ref)[0], shared_prefix_logps(bb, *x.values(), model=ref)[0]
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, _per_sequence(bb, x)[0].detach(), atol=1e-3)  # the adapters were off


@pytest.mark.parametrize("checkpointing", [False, True])
def test_router_aux_loss_of_the_two_passes_equals_the_per_sequence_one(
    checkpointing,
    backbones,  # noqa: F811
    synthetic_dir,
):
    bb = backbones("qwen3_vl_moe")
    x = _inputs(bb, synthetic_dir)
    experts, top_k = moe_layout(bb.model)
    P = x["prompt_ids"].shape[1]
    routers = [p for n, p in bb.model.named_parameters() if n.endswith("mlp.gate.weight")]
    with capture_router_logits(bb.model) as logits:
        _per_sequence(bb, x)
    mask = torch.cat([x["prompt_mask"].repeat(COPIES, 1), x["completion_mask"]], 1)
    assert logits[0].shape[0] == mask.numel()
    a = load_balancing_loss(logits, experts, top_k, mask)
    with _checkpointed(bb, checkpointing), capture_router_logits(bb.model) as logits:
        shared_prefix_logps(bb, *x.values())
        sizes = [t.shape[0] for t in logits]
        b = shared_prefix_aux(logits, x["prompt_mask"], x["completion_mask"], experts, top_k)
        grads = torch.autograd.grad(b, routers)
    assert sizes == [x["prompt_mask"].numel()] * 2 + [x["completion_mask"].numel()] * 2
    assert torch.allclose(a, b, atol=1e-6) and P > N
    _assert_same_grads(torch.autograd.grad(a, routers), grads)


def test_fallback_reasons(monkeypatch):
    config = BackboneConfig(tiny=TinyVLM(family="qwen2_vl"), gradient_checkpointing=True)
    assert fallback_reason(VLMBackbone(config)) is None  # the layers keep the cache (see test above)
    monkeypatch.setattr("transformers.modeling_layers.GradientCheckpointingLayer", torch.nn.Module)  # an older transformers
    assert "gradient checkpointing" in fallback_reason(VLMBackbone(config))
    config.gradient_checkpointing = False
    assert fallback_reason(VLMBackbone(config)) is None
    assert all(family in FAMILIES and why for family, why in UNSUPPORTED)


@pytest.mark.parametrize("family", ["qwen2_vl", "glm4v", "qwen3_5", "gemma3"])
def test_text_only_prompts_after_an_image_batch(family, backbones, synthetic_dir):  # noqa: F811
    """Prompts without images (mRoPE models then set no ``rope_deltas``: a stale offset of the image batch
    before must not shift them)."""
    bb = backbones(family)
    shared_prefix_logps(bb, *_inputs(bb, synthetic_dir).values())  # leaves the image batch's offsets
    enc = bb.tokenizer(["the red circle is left of", "blue square"], return_tensors="pt", padding=True)
    words = torch.randint(5, 50, (2 * COPIES, N), generator=torch.Generator().manual_seed(0))
    x = {"prompt_ids": enc["input_ids"], "prompt_mask": enc["attention_mask"], "completion_ids": words,
         "completion_mask": torch.ones_like(words), "vision": {}}  # fmt: skip
    with torch.no_grad():
        a, b = _per_sequence(bb, x)[0], shared_prefix_logps(bb, *x.values())[0]
    assert torch.allclose(a, b, atol=1e-5) and (b < 0).all()

"""MoE router load-balancing loss: the maths against hand values, an independent float64 version and
transformers' own function; the router-logit capture on a tiny Qwen3-VL-MoE (shapes, gradients,
transformers' ``output_router_logits`` path, gradient checkpointing, LoRA) and on a dense model."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from PIL import Image

from lightning_vlm import BackboneConfig, LoraSettings, TinyVLM, VLMBackbone
from lightning_vlm.data.collate import encode, render
from lightning_vlm.model.moe import capture_router_logits, load_balancing_loss, moe_layout

MOE = TinyVLM(family="qwen3_vl_moe")
PA = [0.4, 0.3, 0.2, 0.1]  # top-2: experts 0, 1
PB = [0.1, 0.2, 0.3, 0.4]  # top-2: experts 3, 2


def _logits(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).log().float()  # softmax(log p) = p


def _reference_float64(logits: list[torch.Tensor], num_experts: int, top_k: int, mask=None) -> torch.Tensor:
    """The Switch-Transformer loss written the classic Mixtral way: one-hot top-k masks of all layers'
    tokens, averaged, with the attention mask broadcast over layers and top-k slots."""
    probs = torch.cat(logits).double().softmax(-1)  # (layers * N, E)
    onehot = torch.nn.functional.one_hot(probs.topk(top_k, -1).indices, num_experts).double()  # (rows, k, E)
    w = torch.ones(probs.shape[0], dtype=torch.float64)
    if mask is not None:
        w = mask.reshape(-1).double().repeat(len(logits))
    f = (onehot * w[:, None, None]).sum(0) / w.sum()  # (k, E), each row sums to 1
    p = (probs * w[:, None]).sum(0) / w.sum()  # (E,)
    return num_experts * (f * p[None]).sum()


@pytest.mark.parametrize(
    "layers, mask, expected",
    [
        ([[PA, PB]], None, 2.0),  # balanced routing: the loss is top_k
        ([[PA, PA, PB]], None, 4 * (2 * 0.9 + 2 * 0.8 + 0.7 + 0.6) / 9),
        ([[PA, PA, PB]], [[1, 1, 0]], 4 * (0.4 + 0.3)),  # the padded PB row counts for nothing
        ([[PA, PA], [PB, PB]], None, 2.0),  # pooled over layers (the mean of per-layer losses is 2.8)
    ],
)
def test_hand_computed_values(layers, mask, expected):
    logits = [_logits(*rows) for rows in layers]
    mask = None if mask is None else torch.tensor(mask)
    loss = load_balancing_loss(logits, num_experts=4, top_k=2, attention_mask=mask)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert math.isclose(_reference_float64(logits, 4, 2, mask).item(), expected, rel_tol=1e-7)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_equals_independent_float64_version(top_k):
    g = torch.Generator().manual_seed(top_k)
    logits = [torch.randn(2 * 7, 6, generator=g) * 2 for _ in range(3)]
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    for m in (None, mask):
        ours = load_balancing_loss(logits, 6, top_k, m)
        assert torch.allclose(ours.double(), _reference_float64(logits, 6, top_k, m), rtol=1e-5)
    assert not torch.allclose(
        load_balancing_loss(logits, 6, top_k, mask), load_balancing_loss(logits, 6, top_k)
    )
    with pytest.raises(ValueError, match="attention_mask covers 7 tokens"):
        load_balancing_loss(logits, 6, top_k, mask[:1])
    with pytest.raises(ValueError, match="no router logits"):
        load_balancing_loss([], 6, top_k)


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_moe", "mixtral"])
@pytest.mark.parametrize("masked", [False, True])
def test_equals_transformers_load_balancing_loss_func(family, masked):
    theirs_fn = importlib.import_module(
        f"transformers.models.{family}.modeling_{family}"
    ).load_balancing_loss_func
    g = torch.Generator().manual_seed(0)
    logits = [(torch.randn(3 * 5, 8, generator=g) * 3).requires_grad_() for _ in range(4)]
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]) if masked else None
    ours = load_balancing_loss(logits, 8, 2, mask)
    theirs = theirs_fn(tuple(logits), 8, 2, mask)
    assert torch.allclose(ours, theirs, rtol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, logits), torch.autograd.grad(theirs, logits), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8) and a.abs().sum() > 0


# ---------------------------------------------------------------------------------- tiny model


def _batch(bb: VLMBackbone) -> dict:
    """Two image prompts of different lengths, so the shorter one is left-padded."""

    def chat(text: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]

    texts = [render(bb.processor, chat(t)) for t in ("a red square", "what colour is the big circle in it?")]
    images = [Image.new("RGB", (112, 112), (200, 30, 30)), Image.effect_noise((112, 84), 60).convert("RGB")]
    batch = encode(bb.processor, texts, images)
    assert (batch["attention_mask"] == 0).any() and "pixel_values" in batch["vision"]
    return batch


def _load(**kwargs) -> VLMBackbone:
    bb = VLMBackbone(BackboneConfig(tiny=MOE, **kwargs))
    bb.load()
    return bb


def _gates(bb: VLMBackbone) -> list[torch.nn.Module]:
    """The routers of the language model's sparse MoE blocks, found independently of moe.py."""
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock

    base = bb.model.get_base_model() if hasattr(bb.model, "get_base_model") else bb.model
    return [
        m.gate for m in base.model.language_model.modules() if isinstance(m, Qwen3VLMoeTextSparseMoeBlock)
    ]


@pytest.fixture(scope="module")
def moe():
    return _load()


def _aux(bb: VLMBackbone, batch: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
    with capture_router_logits(bb.model) as logits:
        bb.hidden_states(batch["input_ids"], batch["attention_mask"], batch["vision"])
    return logits, load_balancing_loss(logits, *moe_layout(bb.model), batch["attention_mask"])


def test_capture_on_tiny_moe_shapes_loss_and_router_gradients(moe):
    batch = _batch(moe)
    gates = _gates(moe)
    assert len(gates) == MOE.num_layers and moe_layout(moe.model) == (MOE.num_experts, 2)
    logits, loss = _aux(moe, batch)
    assert len(logits) == len(gates)
    for layer in logits:
        assert layer.shape == (batch["input_ids"].numel(), MOE.num_experts) and layer.requires_grad
    assert torch.isfinite(loss) and loss > 0
    grads = torch.autograd.grad(loss, [g.weight for g in gates])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    # The hooks are gone: a later forward adds nothing.
    assert all(not g._forward_hooks for g in gates)
    moe.hidden_states(batch["input_ids"], batch["attention_mask"], batch["vision"])
    assert len(logits) == len(gates)


def test_capture_equals_transformers_output_router_logits(moe):
    batch = _batch(moe)
    logits, loss = _aux(moe, batch)
    out = moe.model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_router_logits=True,
        **batch["vision"],
    )
    assert len(out.router_logits) == len(logits)
    for ours, theirs in zip(logits, out.router_logits, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.allclose(loss, out.aux_loss, rtol=1e-6)  # transformers' aux loss, padding masked out
    assert moe.hf_config.get_text_config().router_aux_loss_coef == 0.001


def test_gradient_checkpointing_counts_each_layer_once(moe):
    batch = _batch(moe)
    _, plain_loss = _aux(moe, batch)
    plain_grads = torch.autograd.grad(plain_loss, [g.weight for g in _gates(moe)])

    bb = _load(gradient_checkpointing=True)
    gates = _gates(bb)
    calls = []
    handles = [g.register_forward_hook(lambda *_: calls.append(1)) for g in gates]
    with capture_router_logits(bb.model) as logits:
        bb.hidden_states(batch["input_ids"], batch["attention_mask"], batch["vision"])
        assert len(logits) == len(gates) == len(calls)
        loss = load_balancing_loss(logits, *moe_layout(bb.model), batch["attention_mask"])
        loss.backward()  # recomputes the checkpointed layers inside the block
        assert len(calls) == 2 * len(gates)  # the routers did run again ...
        assert len(logits) == len(gates)  # ... and were not recorded twice
        bb.hidden_states(batch["input_ids"], batch["attention_mask"], batch["vision"])
        assert len(logits) == 2 * len(gates)  # a second forward pass is recorded
        second = load_balancing_loss(logits[len(gates) :], *moe_layout(bb.model), batch["attention_mask"])
    for h in handles:
        h.remove()
    assert torch.allclose(loss, plain_loss, rtol=1e-6) and torch.allclose(second, loss)
    for g, ref in zip(gates, plain_grads, strict=True):
        assert torch.allclose(g.weight.grad, ref, rtol=1e-4, atol=1e-7)


def test_capture_under_lora_and_checkpointing():
    torch.manual_seed(0)
    bb = _load(lora=LoraSettings(r=4, dropout=0.0), gradient_checkpointing=True)
    for name, p in bb.model.named_parameters():
        if "lora_B" in name:  # non-zero adapters, so they change what the routers see
            torch.nn.init.normal_(p, std=0.5)
    batch = _batch(bb)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **batch["vision"])
    with capture_router_logits(bb.model) as logits:
        bb.hidden_states(batch["input_ids"], batch["attention_mask"], batch["vision"])
        loss = load_balancing_loss(logits, *moe_layout(bb.model), batch["attention_mask"])
        loss.backward()
        assert len(logits) == MOE.num_layers
    with torch.no_grad():
        theirs = bb.model(**inputs, output_router_logits=True).router_logits
        with bb.model.disable_adapter():
            base = bb.model(**inputs, output_router_logits=True).router_logits
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(logits, theirs, strict=True))
    assert not torch.allclose(logits[-1], base[-1], atol=1e-3)
    lora_grads = [p.grad for n, p in bb.model.named_parameters() if "lora_" in n and p.grad is not None]
    assert lora_grads and any(g.abs().sum() > 0 for g in lora_grads)


def test_dense_model_has_no_moe_layout():
    dense = VLMBackbone(BackboneConfig(tiny=TinyVLM(family="qwen2_vl")))
    dense.load()
    assert moe_layout(dense.model) is None
    with pytest.raises(ValueError, match="no MoE router"):
        with capture_router_logits(dense.model):
            pass

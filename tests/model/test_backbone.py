"""The VLM backbone: loading, trainable sets, completion-only log-probs, reference, families."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_vlm import BackboneConfig, LoraSettings, TinyVLM, VLMBackbone
from lightning_vlm.data import SFTDataModule
from lightning_vlm.model.tiny import FAMILIES, ensure_tiny_vlm


def _batch(backbone: VLMBackbone, synthetic_dir, n: int = 4) -> dict:
    dm = SFTDataModule(train=str(synthetic_dir / "sft_train.jsonl"), batch_size=n)
    dm.processor = backbone.processor
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def _naive_logps(model, batch) -> torch.Tensor:
    """Full-vocabulary logits for every position, then log-softmax and gather: the obvious way."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **batch["vision"])
    logps = out.logits[:, :-1].float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    full = torch.zeros(batch["input_ids"].shape)
    full[:, 1:] = logps
    return full * batch["labels_mask"]


@pytest.fixture(scope="module")
def full_ft():
    torch.manual_seed(0)
    bb = VLMBackbone(BackboneConfig(tiny=TinyVLM(), logps_chunk_size=5))
    bb.load()
    return bb


def test_chunked_logps_equal_naive_values_and_gradients(full_ft, synthetic_dir):
    batch = _batch(full_ft, synthetic_dir)
    assert batch["labels_mask"].sum() > 5  # several chunks of 5
    ours = full_ft.token_logps(
        batch["input_ids"], batch["attention_mask"], batch["vision"], batch["labels_mask"]
    )
    naive = _naive_logps(full_ft.model, batch)
    assert torch.allclose(ours, naive, atol=1e-5)
    assert (ours[~batch["labels_mask"]] == 0).all() and (ours[batch["labels_mask"]] < 0).all()

    params = [p for p in full_ft.model.parameters() if p.requires_grad]
    g_ours = torch.autograd.grad(ours.sum(), params, allow_unused=True)
    naive = _naive_logps(full_ft.model, batch)
    g_naive = torch.autograd.grad(naive.sum(), params, allow_unused=True)
    for a, b in zip(g_ours, g_naive, strict=True):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_full_finetune_freezes_vision_only(full_ft):
    vision = {id(p) for p in full_ft.vision_tower.parameters()}
    for name, p in full_ft.model.named_parameters():
        assert p.requires_grad == (id(p) not in vision), name


@pytest.mark.parametrize(
    "vision, lora_in_vision, vision_weights_train",
    [("frozen", False, False), ("lora", True, False), ("train", False, True)],
)
def test_lora_trainable_set(vision, lora_in_vision, vision_weights_train):
    bb = VLMBackbone(
        BackboneConfig(
            tiny=TinyVLM(), lora=LoraSettings(r=4, target_modules=["q_proj", "v_proj"]), vision=vision
        )
    )
    bb.load()
    vision_ids = {id(p) for p in bb.vision_tower.parameters()}
    trainable = {n for n, p in bb.model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    assert lora and all(
        n.split(".lora_")[0].endswith(("q_proj", "v_proj", "qkv")) or ".visual." in n for n in lora
    )
    assert not any("lm_head" in n or "embed_tokens" in n for n in trainable)
    in_vision = {n for n, p in bb.model.named_parameters() if id(p) in vision_ids and "lora_" in n}
    assert bool(in_vision) == lora_in_vision
    base_vision_trainable = any(
        p.requires_grad and "lora_" not in n for n, p in bb.model.named_parameters() if id(p) in vision_ids
    )
    assert base_vision_trainable == vision_weights_train
    language_base = [
        p for n, p in bb.model.named_parameters() if id(p) not in vision_ids and "lora_" not in n
    ]
    assert not any(p.requires_grad for p in language_base)


def test_lora_reference_is_the_base_model_and_stays_fixed(synthetic_dir):
    torch.manual_seed(0)
    bb = VLMBackbone(BackboneConfig(tiny=TinyVLM(), lora=LoraSettings(r=4)), need_reference=True)
    bb.load()
    assert bb._reference is None  # LoRA: no second copy of the weights
    batch = _batch(bb, synthetic_dir)
    args = (batch["input_ids"], batch["attention_mask"], batch["vision"], batch["labels_mask"])
    with bb.reference() as ref:
        before = bb.token_logps(*args, model=ref)
    opt = torch.optim.SGD([p for p in bb.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):
        (-bb.token_logps(*args).sum()).backward()
        opt.step()
        opt.zero_grad()
    with bb.reference() as ref:
        after = bb.token_logps(*args, model=ref)
    policy = bb.token_logps(*args)
    assert torch.allclose(before, after, atol=1e-6)
    assert not torch.allclose(policy, after, atol=1e-3)


def test_full_reference_is_a_frozen_copy(synthetic_dir):
    bb = VLMBackbone(BackboneConfig(tiny=TinyVLM()), need_reference=True)
    bb.load()
    assert bb._reference is not None
    assert not any(p.requires_grad for p in bb._reference.parameters())
    assert not any(k.startswith("_reference") for k in bb.state_dict())
    batch = _batch(bb, synthetic_dir)
    args = (batch["input_ids"], batch["attention_mask"], batch["vision"], batch["labels_mask"])
    with bb.reference() as ref:
        before = bb.token_logps(*args, model=ref)
    opt = torch.optim.SGD([p for p in bb.parameters() if p.requires_grad], lr=1.0)
    (-bb.token_logps(*args).sum()).backward()
    opt.step()
    with bb.reference() as ref:
        assert torch.allclose(before, bb.token_logps(*args, model=ref))
    bb.to(torch.float64)  # the hidden copy follows dtype/device moves
    assert next(bb._reference.parameters()).dtype == torch.float64


def test_no_reference_unless_asked():
    bb = VLMBackbone(BackboneConfig(tiny=TinyVLM()))
    bb.load()
    with pytest.raises(RuntimeError, match="need_reference"), bb.reference():
        pass


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_loads_from_saved_folder_and_trains_a_step(family, synthetic_dir):
    folder = ensure_tiny_vlm(TinyVLM(family=family))
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    stock = json.loads((folder / "processor_config.json").read_text())["processor_class"]
    own = {"llava": "LlavaProcessor", "gemma3": "Gemma3Processor", "gemma4": "Gemma4Processor"}
    assert stock == own[family] if family in own else stock.startswith("Qwen")
    assert not stock.startswith("ImageOnly")  # users with torchvision get the family's own processor class
    torch.manual_seed(0)
    bb = VLMBackbone(BackboneConfig(model_name_or_path=str(folder), vision="train"))
    bb.load()
    assert type(bb.model).__name__.lower().startswith(family.replace("_", "")[:5])
    batch = _batch(bb, synthetic_dir)
    before = {n: p.detach().clone() for n, p in bb.model.named_parameters()}
    opt = torch.optim.SGD(bb.parameters(), lr=0.1)
    args = (batch["input_ids"], batch["attention_mask"], batch["vision"], batch["labels_mask"])
    loss = -bb.token_logps(*args).sum() / batch["labels_mask"].sum()
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    changed = {n for n, p in bb.model.named_parameters() if not torch.equal(before[n], p)}
    vision = {n for n, p in bb.model.named_parameters() if any(p is q for q in bb.vision_tower.parameters())}
    assert vision & changed  # the image reached the loss
    assert any("lm_head" in n for n in changed)
    dm = SFTDataModule(train=str(synthetic_dir / "sft_train.jsonl"), val=str(synthetic_dir / "sft_val.jsonl"))
    dm.processor = bb.processor
    dm.setup("validate")
    p = next(iter(dm.val_dataloader()))["prompt"]
    ids = bb.generate(p["input_ids"], p["attention_mask"], p["vision"], max_new_tokens=3)
    assert ids.shape[0] == p["input_ids"].shape[0] and 1 <= ids.shape[1] <= 3


def test_generation_settings_are_ours_alone(full_ft, synthetic_dir):
    dm = SFTDataModule(train=str(synthetic_dir / "sft_train.jsonl"), val=str(synthetic_dir / "sft_val.jsonl"))
    dm.processor = full_ft.processor
    dm.setup("fit")
    p = next(iter(dm.val_dataloader()))["prompt"]
    args = (p["input_ids"], p["attention_mask"], p["vision"])
    greedy = full_ft.generate(*args, max_new_tokens=6)
    assert greedy.shape[0] == p["input_ids"].shape[0] and greedy.shape[1] <= 6
    # The prompt is not echoed: the first generated token is the argmax after the prompt.
    with torch.no_grad():
        out = full_ft.model(input_ids=p["input_ids"], attention_mask=p["attention_mask"], **p["vision"])
    assert torch.equal(greedy[:, 0], out.logits[:, -1].argmax(-1))
    # The checkpoint's own generation_config does not leak into our greedy decoding.
    full_ft.model.generation_config.repetition_penalty = 50.0
    full_ft.model.generation_config.do_sample = True
    assert torch.equal(full_ft.generate(*args, max_new_tokens=6), greedy)
    full_ft.model.generation_config.repetition_penalty = 1.0
    full_ft.model.generation_config.do_sample = False
    torch.manual_seed(0)
    hot = full_ft.generate(*args, max_new_tokens=6, do_sample=True, temperature=50.0, num_return_sequences=2)
    assert hot.shape[0] == 2 * p["input_ids"].shape[0]
    assert not torch.equal(hot[::2, :1], greedy[:, :1])  # near-uniform sampling leaves the argmax


def test_generation_stops_when_every_row_has_ended(full_ft, synthetic_dir):
    dm = SFTDataModule(train=str(synthetic_dir / "sft_train.jsonl"), val=str(synthetic_dir / "sft_val.jsonl"))
    dm.processor = full_ft.processor
    dm.setup("fit")
    p = next(iter(dm.val_dataloader()))["prompt"]
    eos = full_ft.tokenizer.eos_token_id
    head = full_ft.model.get_output_embeddings()
    free = full_ft.generate(p["input_ids"], p["attention_mask"], p["vision"], max_new_tokens=5)
    assert free.shape[1] == 5 and not (free == eos).any()  # the untrained model does not stop by itself
    bias = torch.zeros(head.weight.shape[0])
    bias[eos] = 1e4  # EOS becomes every row's first token
    head.bias = torch.nn.Parameter(bias, requires_grad=False)
    try:
        ids = full_ft.generate(p["input_ids"], p["attention_mask"], p["vision"], max_new_tokens=5)
    finally:
        head.bias = None
    assert (ids[:, 0] == eos).all() and ids.shape[1] == 1  # stopped at EOS, not at max_new_tokens


def test_logit_softcapping_is_applied(full_ft, synthetic_dir):
    batch = _batch(full_ft, synthetic_dir)
    args = (batch["input_ids"], batch["attention_mask"], batch["vision"], batch["labels_mask"])
    full_ft.logit_softcap = 0.5
    try:
        capped = full_ft.token_logps(*args)
    finally:
        full_ft.logit_softcap = None
    out = full_ft.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **batch["vision"]
    )
    logits = torch.tanh(out.logits[:, :-1].float() / 0.5) * 0.5
    ref = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    expected = torch.zeros(batch["input_ids"].shape)
    expected[:, 1:] = ref
    expected = expected * batch["labels_mask"]
    assert torch.allclose(capped, expected, atol=1e-5)
    assert not torch.allclose(capped, full_ft.token_logps(*args), atol=1e-3)


def test_lora_with_trained_vision_keeps_the_reference_tower(synthetic_dir):
    torch.manual_seed(0)
    bb = VLMBackbone(
        BackboneConfig(tiny=TinyVLM(), lora=LoraSettings(r=4), vision="train"), need_reference=True
    )
    bb.load()
    batch = _batch(bb, synthetic_dir)
    args = (batch["input_ids"], batch["attention_mask"], batch["vision"], batch["labels_mask"])
    with bb.reference() as ref:
        before = bb.token_logps(*args, model=ref)
    trainable = [p for p in bb.parameters() if p.requires_grad]
    assert any("visual" in n and "lora_" not in n for n, p in bb.model.named_parameters() if p.requires_grad)
    opt = torch.optim.SGD(trainable, lr=1.0)
    (-bb.token_logps(*args).sum()).backward()
    opt.step()
    with bb.reference() as ref:
        assert torch.allclose(before, bb.token_logps(*args, model=ref), atol=1e-6)  # tower copy trained only


def test_processor_pickles_into_spawned_workers(full_ft, synthetic_dir):
    import pickle

    clone = pickle.loads(pickle.dumps(full_ft.processor))
    assert type(clone).__name__ == type(full_ft.processor).__name__
    dm = SFTDataModule(train=str(synthetic_dir / "sft_train.jsonl"), batch_size=4, num_workers=1)
    dm.processor = full_ft.processor
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.multiprocessing_context = "spawn"
    spawned = next(iter(loader))
    dm0 = SFTDataModule(train=str(synthetic_dir / "sft_train.jsonl"), batch_size=4)
    dm0.processor = full_ft.processor
    dm0.setup("fit")
    inline = next(iter(dm0.train_dataloader()))
    assert torch.equal(spawned["input_ids"], inline["input_ids"])
    assert torch.equal(spawned["vision"]["pixel_values"], inline["vision"]["pixel_values"])


def test_not_a_vlm_folder_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "text_only"
    LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=50,
        )
    ).save_pretrained(folder)
    with pytest.raises(ValueError, match=r"text_only.*'llama' is not a vision-language model"):
        VLMBackbone(BackboneConfig(model_name_or_path=str(folder)))


def test_missing_or_empty_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder at"):
        VLMBackbone(BackboneConfig(model_name_or_path=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        VLMBackbone(BackboneConfig(model_name_or_path=str(tmp_path)))
    with pytest.raises(ValueError, match="exactly one"):
        VLMBackbone(BackboneConfig())
    with pytest.raises(ValueError, match="needs backbone.lora"):
        VLMBackbone(BackboneConfig(tiny=TinyVLM(), vision="lora"))


def test_lora_on_moe_warns_that_fused_experts_get_no_adapters():
    bb = VLMBackbone(BackboneConfig(tiny=TinyVLM(family="qwen3_vl_moe"), lora=LoraSettings(r=4)))
    with pytest.warns(UserWarning, match="fused MoE expert weights"):
        bb.load()
    adapted = {
        n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in bb.model.named_parameters() if p.requires_grad
    }
    assert adapted and "experts" not in adapted


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_does_not_change_logps(family, synthetic_dir):
    """A row's log-probs in a left-padded batch equal those of the row alone, for every family."""
    bb = VLMBackbone(BackboneConfig(tiny=TinyVLM(family=family)))
    bb.load()
    bb.model.eval()
    dm = SFTDataModule(train=str(synthetic_dir / "sft_train.jsonl"), batch_size=6)
    dm.processor = bb.processor
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # some rows really are padded
    with torch.no_grad():
        together = bb.token_logps(
            batch["input_ids"], batch["attention_mask"], batch["vision"], batch["labels_mask"]
        )
        collate = dm.train_dataloader().collate_fn
        rows = [dm.datasets["train"][i] for i in range(len(dm.datasets["train"]))]
        by_index = {r["__row"]: r for r in rows}
        for k, row_id in enumerate(batch["rows"]):
            one = collate([by_index[row_id]])
            alone = bb.token_logps(one["input_ids"], one["attention_mask"], one["vision"], one["labels_mask"])
            assert torch.allclose(
                together[k][batch["labels_mask"][k]], alone[0][one["labels_mask"][0]], atol=1e-4
            )


@pytest.mark.parametrize("vision", ["frozen", "train"])
@pytest.mark.parametrize("family", FAMILIES)
def test_vision_once_equals_images_per_sequence(family, vision, synthetic_dir):
    """Two blocks of sequences sharing one encoding of the images == each sequence with its own copy:
    same log-probs and gradients of every trainable weight (LLaVA's projector, outside the tower,
    trains even with a frozen tower), with half the patches through the tower."""
    from lightning_vlm.data import PreferenceDataModule
    from lightning_vlm.data.preference import PreferenceCollator
    from lightning_vlm.model.vision import image_side_parameters

    torch.manual_seed(0)
    bb = VLMBackbone(BackboneConfig(tiny=TinyVLM(family=family), vision=vision))
    bb.load()
    dm = PreferenceDataModule(train=str(synthetic_dir / "pref_train.jsonl"))
    dm.processor = bb.processor
    dm.setup("fit")
    rows = [dm.datasets["train"][i] for i in range(4)]
    assert any(len(r["images"]) == 2 for r in rows)  # a two-image prompt keeps the image order honest
    once, per_seq = (
        PreferenceCollator(bb.processor, True)(rows),
        PreferenceCollator(bb.processor, False)(rows),
    )
    fed: list[int] = []
    bb.vision_tower.register_forward_hook(  # Gemma's towers take their pixels by keyword
        lambda mod, args, kwargs, out: fed.append((args or [kwargs.get("pixel_values")])[0].shape[0]),
        with_kwargs=True,
    )
    params = [p for p in bb.model.parameters() if p.requires_grad]
    results = []
    for batch in (once, per_seq):
        logps = bb.token_logps(batch["input_ids"], batch["attention_mask"], batch["vision"],
                               batch["labels_mask"], copies=batch["copies"])  # fmt: skip
        grads = torch.autograd.grad(logps.sum(), params, allow_unused=True)  # LLaVA skips its last block
        results.append((logps, grads))
    (a, ga), (b, gb) = results
    assert torch.allclose(a, b, atol=1e-5)
    for x, y in zip(ga, gb, strict=True):
        assert (x is None) == (y is None)
        assert x is None or torch.allclose(x, y, atol=1e-5, rtol=1e-4)
    assert len(fed) == 2 and 2 * fed[0] == fed[1]
    tower = {id(p) for p in bb.vision_tower.parameters()}
    projector = any(id(p) not in tower for _, p in image_side_parameters(bb.model))  # LLaVA's, Gemma's
    assert bb.vision_is_frozen == (vision == "frozen" and not projector)  # a projector outside the tower trains


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4, dropout=0.5)], ids=["full", "lora"])
def test_dropout_is_off_by_default_so_scoring_is_reproducible(lora, tmp_path, synthetic_dir):
    """With attention dropout 0.5 in the checkpoint (and LoRA dropout 0.5), two forwards at the same
    weights in training mode give identical log-probs, with and without gradient (the on-policy ratio is
    exactly 1), unless ``disable_dropout: false`` keeps dropout; the export's config keeps its value."""
    import shutil

    folder = tmp_path / "dropout_vlm"
    shutil.copytree(ensure_tiny_vlm(TinyVLM()), folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["attention_dropout"] = 0.5
    (folder / "config.json").write_text(json.dumps(config))

    def scores(**kw):
        bb = VLMBackbone(BackboneConfig(model_name_or_path=str(folder), lora=lora, **kw))
        bb.load()
        assert bb.model.training
        batch = _batch(bb, synthetic_dir)
        args = (batch["input_ids"], batch["attention_mask"], batch["vision"], batch["labels_mask"])
        with torch.no_grad():
            old = bb.token_logps(*args)
        new = bb.token_logps(*args)  # with gradient, as the training forward
        assert new.requires_grad
        return bb, old, new.detach()

    bb, old, new = scores()
    assert torch.equal(old, new)
    assert bb.model.config.get_text_config().attention_dropout == 0.5  # the config is not rewritten
    _, old, new = scores(disable_dropout=False)
    assert (old - new).abs().max() > 1e-3  # the check above can fail: dropout does change log-probs
    # SFT keeps dropout unless told otherwise; preference and online objectives switch it off.
    from lightning_vlm.objectives import DPO, GRPO, SFT

    assert not SFT.disable_dropout and DPO.disable_dropout and GRPO.disable_dropout

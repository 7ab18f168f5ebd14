"""A trained reward model as a reward function: same rendering and scores as its training pairs,
images, chunking, lazy loading."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from lightning_vlm import BackboneConfig, TinyVLM
from lightning_vlm.data.preference import PreferenceCollator
from lightning_vlm.data.prompt import PromptCollator
from lightning_vlm.data.rows import BASE, ROW
from lightning_vlm.export import ExportHF
from lightning_vlm.objectives import RewardModel, RewardModelReward
from lightning_vlm.rollout.rewards import combine
from tests.helpers.processing import count_image_processing, count_tower_images

COMPLETIONS = ["2", "there are three shapes", "<think>one, two</think><answer>2</answer>", "first"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny reward model written as ExportHF writes it (HF folder + reward head)."""
    torch.manual_seed(0)
    module = RewardModel(BackboneConfig(tiny=TinyVLM()))
    module.configure_model()
    torch.nn.init.normal_(module.head.bias)  # a non-zero bias: the head file must round-trip
    folder = tmp_path_factory.mktemp("rm") / "hf"
    ExportHF(str(folder)).on_fit_end(SimpleNamespace(interrupted=False, is_global_zero=True), module)
    return folder


@pytest.fixture(scope="module")
def samples(exported, synthetic_dir):
    """Prompt rows of the synthetic data (one and two images) plus a text-only prompt, as the rollout
    hands them to reward functions: chat messages and opened images, one per completion."""
    rows = [json.loads(line) for line in (synthetic_dir / "prompt_train.jsonl").read_text().splitlines()][:3]
    rows.append({"images": [], "prompt": "What is 1 + 1?", "answer": "2", "task": "text"})
    for i, row in enumerate(rows):
        row.update({ROW: i, BASE: str(synthetic_dir)})
    batch = PromptCollator(RewardModel.from_pretrained(str(exported)).backbone.processor)(rows)
    assert [len(ims) for ims in batch["images"]] == [1, 2, 1, 0]
    return rows, batch


def _reference_scores(model: RewardModel, rows: list[dict], completions: list[str]) -> torch.Tensor:
    """What the reward model scores for each completion as the "chosen" side of a training pair."""
    pairs = [{**row, "chosen": c, "rejected": "no"} for row, c in zip(rows, completions, strict=True)]
    batch = PreferenceCollator(model.backbone.processor)(pairs)
    with torch.no_grad():
        s = model.scores(batch["input_ids"], batch["attention_mask"], batch["vision"], batch["copies"])
    return s.chunk(2)[0]


def test_scores_equal_the_reward_model_on_its_training_rendering(exported, samples):
    rows, batch = samples
    fn = RewardModelReward(str(exported), device="cpu")
    assert fn.model is None  # nothing loads before the first call
    got = fn(batch["prompts"], COMPLETIONS, **batch["columns"])
    assert all(isinstance(v, float) for v in got)
    want = _reference_scores(fn.model, rows, COMPLETIONS)
    assert torch.allclose(torch.tensor(got), want, atol=1e-5), (got, want)
    assert len(set(got)) == len(got)  # the completions and their images make a difference
    model = fn.model
    fn(batch["prompts"][:1], COMPLETIONS[:1], images=batch["images"][:1])
    assert fn.model is model  # loaded once


def test_batch_size_does_not_change_the_scores(exported, samples):
    _, batch = samples
    prompts = [p for p in batch["prompts"] for _ in range(2)]  # two completions per prompt, as a rollout
    images = [ims for ims in batch["images"] for _ in range(2)]
    completions = [c + suffix for c in COMPLETIONS for suffix in ("", " really")]
    values = [
        RewardModelReward(str(exported), batch_size=n, device="cpu")(prompts, completions, images=images)
        for n in (1, 3, 8)
    ]
    for other in values[1:]:
        assert torch.allclose(torch.tensor(values[0]), torch.tensor(other), atol=1e-5)


def test_a_prompts_images_are_processed_and_encoded_once_for_its_group(exported, samples, monkeypatch):
    """As the rollout calls it: G completions per prompt, with ``group``. Each prompt's images go through
    the image processor and the vision tower once, not once per completion, and the scores are those of
    every completion scored on its own."""
    _, batch = samples
    G = 4
    prompts = [p for p in batch["prompts"] for _ in range(G)]
    images = [ims for ims in batch["images"] for _ in range(G)]  # 1, 2, 1, 0 images per prompt
    completions = [f"{c} {k}" for c in COMPLETIONS for k in range(G)]
    fn = RewardModelReward(str(exported), device="cpu")  # batch_size 8: two prompts of 4 per forward
    alone = fn(prompts, completions, images=images)  # no group: each completion on its own
    processed = count_image_processing(monkeypatch, fn.model.backbone.processor)
    tower = count_tower_images(fn.model.backbone.vision_tower)
    group = [i for i in range(len(batch["prompts"])) for _ in range(G)]
    got = fn(prompts, completions, images=images, group=group)
    assert processed == [3, 1] and tower == [3, 1]  # prompts 0-1, then 2-3; per completion: 12 + 4
    assert torch.allclose(torch.tensor(got), torch.tensor(alone), rtol=0, atol=1e-6), (got, alone)
    ones = fn(prompts[:2], completions[:2], images=images[:2], group=[0, 1])  # groups of one
    assert torch.allclose(torch.tensor(ones), torch.tensor(alone[:2]), rtol=0, atol=1e-6)
    for bad in ([0, 0, 1], [0, 1, 0, 1]):  # groups of different sizes, or apart
        with pytest.raises(ValueError, match="RewardModelReward: 'group' must hold each prompt's"):
            fn(prompts[: len(bad)], completions[: len(bad)], images=images[: len(bad)], group=bad)


def test_through_combine_and_image_mismatches(exported, samples):
    _, batch = samples
    fn = RewardModelReward(str(exported), batch_size=2, device="cpu")
    total, parts = combine([fn], [2.0], batch["prompts"], COMPLETIONS, batch["columns"])
    assert total == pytest.approx([2 * v for v in parts["RewardModelReward"]])
    chat, _ = combine([fn], [2.0], batch["prompts"], COMPLETIONS, batch["columns"], conversational=True)
    assert chat == pytest.approx(total, abs=1e-5)  # completions in TRL's message form score the same
    with pytest.raises(RuntimeError, match="RewardModelReward raised .*1 image part.* 'images' lists 0"):
        combine([fn], None, batch["prompts"][:1], COMPLETIONS[:1], {"images": [[]]})
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        RewardModelReward(str(exported), batch_size=0)


def test_a_folder_that_is_no_reward_model_fails_on_first_call(tmp_path):
    fn = RewardModelReward(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a reward model export"):
        fn(["p"], ["a"])

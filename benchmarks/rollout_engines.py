"""Rollout time of the vLLM engine against the Hugging Face engine, on the same prompts, in one process.

For each model size, both engines complete the same prompt batch (synthetic image questions, one or two
images each): G samples per prompt, exactly ``--tokens`` new tokens (min = max new tokens), temperature 1,
fp32. Each engine first completes a two-prompt warm-up batch; then ``--repeats`` timed rollouts run,
alternating engines, and the medians are compared. The vLLM engine's start-up and one weight sync are
timed too: every trained tensor of a full fine-tune (the language model's), and the merged weights of a
LoRA r16 on every linear layer of the language model. Run it in the vLLM
environment (``.ci/vllm-venv``):

    .venv-vllm/bin/python benchmarks/rollout_engines.py                          # tiny and large
    .venv-vllm/bin/python benchmarks/rollout_engines.py --sizes tiny --prompts 8 --tokens 16
    .venv-vllm/bin/python benchmarks/rollout_engines.py --repeats 0                 # start-up and syncs only

``large`` is a random-initialised Qwen2-VL with hidden size 1024 and 8 layers (about 0.1B parameters
in its language model); the figures are in docs/online_rl.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from lightning_vlm import BackboneConfig, LoraSettings, TinyVLM
from lightning_vlm.data import PromptDataModule
from lightning_vlm.data.prompt import PromptCollator
from lightning_vlm.data.synthetic import write_synthetic
from lightning_vlm.objectives import GRPO
from lightning_vlm.rollout import GenerationRequest, HFEngine, SamplingSettings, VLLMEngine

SIZES = {
    "tiny": TinyVLM(),
    "large": TinyVLM(hidden_size=1024, num_layers=8, num_heads=16, vision_hidden_size=256, vocab_size=4000),
}


def batch(dm: PromptDataModule, n: int, start: int = 0) -> dict:
    ds = dm.datasets["train"]
    return PromptCollator(dm.processor)([ds[(start + i) % len(ds)] for i in range(n)])


def request(b: dict, G: int, tokens: int, seed: int) -> GenerationRequest:
    sampling = SamplingSettings(max_new_tokens=tokens, min_new_tokens=tokens, temperature=1.0)
    return GenerationRequest(b["input_ids"], b["attention_mask"], b["vision"], G, sampling, seed=seed,
                             images=b["images"], rows=b["rows"])  # fmt: skip


def timed(engine, req: GenerationRequest) -> float:
    start = time.perf_counter()
    out = engine.generate(req)
    seconds = time.perf_counter() - start
    assert out.completion_ids.shape[1] == req.sampling.max_new_tokens, out.completion_ids.shape
    return seconds


def run(name: str, spec: TinyVLM, args, data: str) -> None:
    torch.manual_seed(0)
    module = GRPO(BackboneConfig(tiny=spec))
    module.configure_model()
    params = sum(p.numel() for p in module.backbone.model.parameters())
    dm = PromptDataModule(train=f"{data}/prompt_train.jsonl", batch_size=args.prompts)
    dm.processor = module.backbone.processor
    dm.setup("fit")
    hf, vllm = HFEngine(), VLLMEngine(dtype="float32", max_model_len=1024, enforce_eager=True)
    hf.setup(module.backbone)
    start = time.perf_counter()
    vllm.setup(module.backbone)
    startup = time.perf_counter() - start
    warm = request(batch(dm, 2), args.G, 4, seed=0)
    hf.generate(warm), vllm.generate(warm)
    times: dict[str, list[float]] = {"hf": [], "vllm": []}
    for r in range(args.repeats):
        req = request(batch(dm, args.prompts, start=r * args.prompts), args.G, args.tokens, seed=r)
        for key, engine in (("hf", hf), ("vllm", vllm)) if r % 2 == 0 else (("vllm", vllm), ("hf", hf)):
            times[key].append(timed(engine, req))
    start = time.perf_counter()
    vllm.sync_weights(module.backbone)
    sync = time.perf_counter() - start
    lora = GRPO(BackboneConfig(tiny=spec, lora=LoraSettings(r=16, alpha=32)))  # all-linear LoRA, merged
    lora.configure_model()
    vllm.setup(lora.backbone)
    start = time.perf_counter()
    vllm.sync_weights(lora.backbone)
    lora_sync = time.perf_counter() - start
    print(f"{name}: weight sync, full fine-tuning (all trained tensors) {sync:.2f} s, LoRA r16 all-linear "
          f"(merged weights of the adapted blocks) {lora_sync:.2f} s; vLLM start-up {startup:.1f} s")
    if not args.repeats:
        return
    hf_s, vllm_s = statistics.median(times["hf"]), statistics.median(times["vllm"])
    tokens = args.prompts * args.G * args.tokens
    print(f"{name}: {params / 1e6:.1f}M parameters, {args.prompts} prompts x G {args.G} x {args.tokens} tokens, "
          f"{torch.get_num_threads()} threads, {args.repeats} rollouts each")  # fmt: skip
    print(f"  HF    {hf_s:8.2f} s/rollout  {tokens / hf_s:8.0f} tokens/s  (all: {[round(t, 2) for t in times['hf']]})")
    print(f"  vLLM  {vllm_s:8.2f} s/rollout  {tokens / vllm_s:8.0f} tokens/s  (all: {[round(t, 2) for t in times['vllm']]})")
    print(f"  vLLM / HF time: {vllm_s / hf_s:.2f}  (HF / vLLM: x{hf_s / vllm_s:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "large"], choices=sorted(SIZES))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--G", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic(tmp, n_train=max(64, args.prompts * args.repeats), n_val=4, image_size=112, seed=0)
        for name in args.sizes:
            run(name, SIZES[name], args, tmp)


if __name__ == "__main__":
    main()

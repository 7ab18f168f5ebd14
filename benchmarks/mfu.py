"""Model FLOPs utilisation (MFU) of lightning-vlm's own training step: SFT and GRPO, full fine-tuning.

A random-initialised Qwen2-VL with Qwen2-VL-2B-Instruct's shapes (config written by hand from the published
config.json; ``--tiny``: toy shapes that run on a CPU in seconds) is saved with the tiny Qwen2-VL processor
(lightning_vlm.model.tiny: its PIL image processor and in-process tokenizer, whose vocabulary fits) and loaded
through BackboneConfig/VLMBackbone by the SFT and GRPO objectives. A Lightning Trainer runs them, vision tower
trained, AdamW, ``--precision`` (default bf16-mixed on a GPU, 32-true on a CPU), optionally with activation
checkpointing. Each step is timed from the Trainer's batch start to its batch end (CUDA synchronised):

- SFT: ``--sft-rows`` rows of exactly ``--seq-len`` tokens, one image each (all rows alike, so no padding);
- GRPO: the objective's update on a synthetic Rollout of ``--prompts`` prompts x ``--group`` G x
  ``--new-tokens`` completion tokens (random tokens without EOS, random rewards), handed over through the
  objective's ``on_rollout`` hook as the RolloutCallback does, but without generation: the figure is the
  training step alone (on-policy, beta 0, one optimiser step per rollout).

Model FLOPs per step (fwd + bwd = 3 x fwd, the attention without a causal discount; recomputation under
activation checkpointing is not counted, so this is MFU, not hardware FLOPs utilisation), summed over the
passes the step runs, a pass being q query tokens attending to k keys (itself and what it attends to):

    LM:     6 * N_lm * sum_pass(q) + 12 * L * h * sum_pass(q * k) + 6 * h * V * scored
            N_lm = L * (2*h*h + 2*h*kv*(h/heads) + 3*h*I)   (q, o; k, v; gate, up, down; biases left out)
            scored: the tokens that go through the LM head (the framework applies it to targets only)
    vision: 6 * p * N_vis + 6 * (p/m^2) * N_merge + 12 * depth * e * p^2     per image of p patches
            N_vis = c*t*s*s*e + depth * (4 + 2*r) * e*e   (patch embedding; qkv, proj, MLP of ratio r)
            N_merge = (e*m^2)^2 + e*m^2*h_out               (the 2x2 patch merger's MLP)

SFT: one pass (T, T) per row of T tokens. GRPO counts what the objective's loop runs: per forward
(``loop.chunks``: mini_batches x accumulation per optimiser step; one with the defaults) over k samples of each
prompt of P tokens with N new tokens, the shared prefix (``loop.shared_prefix``, on by default, k >= 2) runs
the prompt once, (P, P), and each sample's completion on its cache, (N, P + N); per sequence (off, k = 1, or
its fallback) each sample is (P + N, P + N). Each forward encodes each prompt's image once.

MFU = FLOPs per step / median seconds per step / (``--peak-tflops`` x 1e12).

    python benchmarks/mfu.py [--steps 10 --warmup 3 --checkpointing --peak-tflops 989]   # on a GPU
    python benchmarks/mfu.py --tiny --steps 2                                              # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Qwen2-VL-2B-Instruct's config.json; the tiny shapes keep its structure (GQA, tied head, 2x2 merger).
SHAPES = {
    "2b": dict(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab=151936, vision_depth=32,
               vision_dim=1280, vision_heads=16, mlp_ratio=4, patch=14, merge=2, temporal=2, image=448),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1024, vision_depth=2,
                 vision_dim=32, vision_heads=2, mlp_ratio=4, patch=14, merge=2, temporal=2, image=56),
}  # fmt: skip


def qwen2vl_config(s: dict, tokenizer):
    """transformers' Qwen2VLConfig of shapes ``s`` with the tokenizer's special token ids."""
    from transformers import Qwen2VLConfig

    from lightning_vlm.model.tiny.qwen import vision_token_ids

    head_dim = s["hidden"] // s["heads"]
    half = head_dim // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # 2B: [16, 24, 24]
    text = dict(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                max_position_embeddings=32768, rms_norm_eps=1e-6, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope})  # fmt: skip
    vision = dict(depth=s["vision_depth"], embed_dim=s["vision_dim"], num_heads=s["vision_heads"],
                  mlp_ratio=s["mlp_ratio"], patch_size=s["patch"], spatial_merge_size=s["merge"],
                  temporal_patch_size=s["temporal"], hidden_size=s["hidden"], in_channels=3)  # fmt: skip
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                         **vision_token_ids(tokenizer))  # fmt: skip


def save_model(s: dict, out_dir: Path) -> Path:
    """Save the random model of shapes ``s`` (bf16 safetensors) and the tiny Qwen2-VL processor."""
    import torch
    from transformers import AutoModelForImageTextToText

    from lightning_vlm.model.processing import save_processor
    from lightning_vlm.model.tiny import TinyVLM
    from lightning_vlm.model.tiny.qwen import build

    pixels = s["image"] ** 2
    config, processor = build(TinyVLM(min_pixels=pixels, max_pixels=pixels), config=lambda _, tok: qwen2vl_config(s, tok))
    if len(processor.tokenizer) > s["vocab"]:
        raise SystemExit(f"the tokenizer's {len(processor.tokenizer)} tokens do not fit vocab {s['vocab']}")
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.save_pretrained(out_dir)
    save_processor(processor, out_dir)
    return out_dir


def matmul_params(s: dict) -> dict:
    """Parameters of the dense matmuls: the decoder (N_lm), the LM head, the vision blocks and the merger."""
    h, e, m2 = s["hidden"], s["vision_dim"], s["merge"] ** 2
    kv_dim = s["kv_heads"] * h // s["heads"]
    return {
        "lm": s["layers"] * (2 * h * h + 2 * h * kv_dim + 3 * h * s["intermediate"]),
        "head": h * s["vocab"],
        "vision": 3 * s["temporal"] * s["patch"] ** 2 * e + s["vision_depth"] * (4 + 2 * s["mlp_ratio"]) * e * e,
        "merger": (e * m2) ** 2 + e * m2 * h,
    }


def step_flops(s: dict, passes: list[tuple[int, int]], scored: int, patches: list[int]) -> float:
    """Model FLOPs of one training step (see the module docstring): ``passes`` of (queries, keys) real tokens,
    ``scored`` tokens through the LM head, images of ``patches`` patches each (as encoded in the step)."""
    n = matmul_params(s)
    lm = 6 * n["lm"] * sum(q for q, _ in passes) + 12 * s["layers"] * s["hidden"] * sum(q * k for q, k in passes)
    head = 6 * n["head"] * scored
    m2 = s["merge"] ** 2
    vision = sum(6 * p * n["vision"] + 6 * p // m2 * n["merger"] + 12 * s["vision_depth"] * s["vision_dim"] * p * p
                 for p in patches)  # fmt: skip
    return float(lm + head + vision)


def sft_batch(processor, rows: int, seq_len: int, image: int) -> dict:
    """``rows`` identical SFT rows of exactly ``seq_len`` tokens (an image, a question, a filler answer)."""
    from PIL import Image

    from lightning_vlm.data.sft import SFTCollator

    img = Image.new("RGB", (image, image), (200, 40, 40))

    def row(i: int, k: int) -> dict:
        return {"images": [img], "__row": i, "__base": "", "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]},
            {"role": "assistant", "content": " ".join(["red"] * k)}]}  # fmt: skip

    collate = SFTCollator(processor)
    base = int(collate([row(0, 1)])["attention_mask"].sum()) - 1
    if seq_len <= base:
        raise SystemExit(f"--seq-len {seq_len} is not above a row's length without filler ({base + 1})")
    batch = collate([row(i, seq_len - base) for i in range(rows)])
    if batch["attention_mask"].shape[1] != seq_len or not batch["attention_mask"].all():
        raise SystemExit(f"SFT rows came out {batch['attention_mask'].sum(1).tolist()} tokens, not {seq_len}")
    return batch


def prompt_batch(processor, prompts: int, image: int) -> dict:
    from PIL import Image

    from lightning_vlm.data.prompt import PromptCollator

    img = Image.new("RGB", (image, image), (40, 40, 200))
    return PromptCollator(processor)(
        [{"images": [img], "prompt": "What colour is the square?", "__row": i, "__base": ""} for i in range(prompts)]
    )


def synthetic_rollout(bb, batch: dict, G: int, new_tokens: int, seed: int):
    """A GRPO Rollout of ``batch``'s prompts with random completions (no EOS, so every token trains)."""
    import torch

    from lightning_vlm.rollout import Rollout
    from lightning_vlm.rollout.engines import SamplingSettings

    tok = bb.processor.tokenizer
    g = torch.Generator().manual_seed(seed)
    R = batch["input_ids"].shape[0] * G
    ids = torch.randint(0, len(tok), (R, new_tokens), generator=g)
    special = torch.tensor(sorted(set(tok.all_special_ids) | set(tok.added_tokens_decoder)))
    ids[torch.isin(ids, special)] = tok.encode(" red", add_special_tokens=False)[0]
    dev = batch["input_ids"].device
    return Rollout(
        prompt_ids=batch["input_ids"], prompt_mask=batch["attention_mask"], vision=batch["vision"], features=None,
        completion_ids=ids.to(dev), completion_mask=torch.ones_like(ids).to(dev), group_size=G,
        rewards=torch.randn(R, generator=g).to(dev), rewards_per_function={}, texts=[""] * R,
        truncated=torch.ones(R, dtype=torch.bool, device=dev), keep=torch.ones(R, dtype=torch.bool, device=dev),
        sampling=SamplingSettings(max_new_tokens=new_tokens), rows=list(batch["rows"]),
    )  # fmt: skip


def run(objective: str, folder: str, s: dict, args) -> dict:
    """Train ``warmup + steps`` steps of ``objective`` with a Lightning Trainer; time each step."""
    import lightning as L
    import torch

    from lightning_vlm import BackboneConfig
    from lightning_vlm.objectives import GRPO, SFT

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    weights = "float32" if args.precision.endswith("mixed") or args.precision.startswith("32") else "bfloat16"
    cfg = BackboneConfig(model_name_or_path=folder, dtype=weights, vision="train",
                         gradient_checkpointing=args.checkpointing)  # fmt: skip
    module = SFT(cfg, table_rows=0) if objective == "sft" else GRPO(cfg)
    processor = module.backbone.processor  # loads with the backbone; the weights load in configure_model
    if objective == "sft":
        batch = sft_batch(processor, args.sft_rows, args.seq_len, s["image"])
    else:
        batch = prompt_batch(processor, args.prompts, s["image"])
    times: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if objective == "grpo":  # the hand-over the RolloutCallback makes, minus generation
                r = synthetic_rollout(pl_module.backbone, batch, args.group, args.new_tokens, batch_idx)
            sync()
            self.t0 = time.perf_counter()
            if objective == "grpo":  # advantages (and old log-probs if the loop needed them): the step's work
                pl_module.on_rollout([r], "train")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync()
            times.append(time.perf_counter() - self.t0)

    if cuda:  # the previous objective's model and optimiser state are garbage by now: not in this peak
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    loader = torch.utils.data.DataLoader([batch] * (args.warmup + args.steps), batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(max_steps=args.warmup + args.steps, precision=args.precision, devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Timer()])  # fmt: skip
    trainer.fit(module, loader)
    n_params = sum(p.numel() for p in module.backbone.model.parameters() if p.requires_grad)
    matrices = sum(p.numel() for p in module.backbone.model.parameters() if p.ndim >= 2)  # tied head once
    if matrices != sum(matmul_params(s).values()):  # the formula's parameters are the model's matrices
        raise SystemExit(f"the model has {matrices} matrix parameters, the FLOPs formula counts {matmul_params(s)}")
    grid = batch["vision"]["image_grid_thw"]
    patches = [int(t * h * w) for t, h, w in grid.tolist()]
    if objective == "sft":
        passes, count = [(t, t) for t in batch["attention_mask"].sum(1).tolist()], "per sequence"
        scored = int(batch["labels_mask"].sum())
    else:  # what the loop runs: forwards over k samples of every prompt, each encoding each prompt's image
        from lightning_vlm.objectives.online import loop

        P, N = batch["attention_mask"].sum(1).tolist(), args.new_tokens
        forwards = [len(c) for _ in range(module.settings.num_iterations)
                    for step in loop.chunks(module, args.group) for c in step]  # fmt: skip
        shared = [loop.shared_prefix(module, k) for k in forwards]
        passes = [x for k, on in zip(forwards, shared, strict=True) for x in
                  ([(p, p) for p in P] + [(N, p + N) for p in P] * k if on else [(p + N, p + N) for p in P] * k)]
        count = "shared prefix" if all(shared) else "per sequence" if not any(shared) else "mixed"
        patches, scored = patches * len(forwards), len(P) * sum(forwards) * N
    median = statistics.median(times[args.warmup :])
    flops = step_flops(s, passes, scored, patches)
    tokens = sum(q for q, _ in passes)
    return {"objective": objective, "seconds": median, "tokens": tokens, "tokens_per_s": tokens / median,
            "passes": passes, "count": count, "scored": scored, "patches": patches, "flops": flops,
            "mfu": flops / median / (args.peak_tflops * 1e12), "trainable_params": n_params,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy shapes, small batches: a CPU smoke run")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --tiny 1)")
    parser.add_argument("--objectives", default="sft,grpo")
    parser.add_argument("--sft-rows", type=int, default=None, help="SFT rows per step (default 8; --tiny 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per SFT row (default 2048; --tiny 48)")
    parser.add_argument("--prompts", type=int, default=None, help="GRPO prompts per step (default 4; --tiny 2)")
    parser.add_argument("--group", type=int, default=None, help="GRPO completions per prompt (default 8; --tiny 2)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per completion (default 512; --tiny 8)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    parser.add_argument("--precision", default=None, help="Lightning precision (default bf16-mixed on CUDA, else 32-true)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s (H100/H200 SXM: 989)")
    args = parser.parse_args()
    import torch

    tiny = dict(warmup=1, sft_rows=2, seq_len=48, prompts=2, group=2, new_tokens=8)
    full = dict(warmup=3, sft_rows=8, seq_len=2048, prompts=4, group=8, new_tokens=512)
    for k, v in (tiny if args.tiny else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.precision = args.precision or ("bf16-mixed" if torch.cuda.is_available() else "32-true")
    s = SHAPES["tiny" if args.tiny else "2b"]
    n = matmul_params(s)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"model: Qwen2-VL, {'tiny' if args.tiny else '2B'} shapes {json.dumps(s)}")
    print(f"matmul params: N_lm {n['lm']}, head {n['head']}, N_vis {n['vision']}, N_merge {n['merger']}")
    print("FLOPs/step = 6*N_lm*sum(q) + 12*L*h*sum(q*k) over passes of q queries on k keys + 6*h*V*scored"
          " + per image: 6*p*N_vis + 6*(p/m^2)*N_merge + 12*depth*e*p^2")  # fmt: skip
    print(f"device: {device}; precision {args.precision}; activation checkpointing {'on' if args.checkpointing else 'off'};"
          f" peak {args.peak_tflops:g} TFLOP/s (--peak-tflops; 989 = H100/H200 dense bf16)")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mfu-bench-") as tmp:
        folder = str(save_model(s, Path(tmp) / "model"))
        for objective in args.objectives.split(","):
            r = run(objective, folder, s, args)
            memory = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else "n/a"
            print(f"{objective}: {r['seconds']:.3f} s/step (median of {args.steps} after {args.warmup} warm-up), "
                  f"{r['tokens_per_s']:.0f} tokens/s, {r['flops']:.4e} FLOPs/step, counted {r['count']} ({r['tokens']} "
                  f"tokens in {len(r['passes'])} passes, {r['scored']} scored, {len(r['patches'])} images x "
                  f"{r['patches'][0]} patches), MFU {100 * r['mfu']:.3g}%, peak memory {memory}, "
                  f"{r['trainable_params']} trainable parameters")  # fmt: skip
            print("RESULT " + json.dumps(r), flush=True)


if __name__ == "__main__":
    sys.exit(main())

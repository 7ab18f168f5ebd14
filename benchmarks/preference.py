"""DPO training steps: the shared prefix, vision once (one image encoding per pair), one encoding per sequence.

The variants train the same DPO module on the same pairs (224 x 224 images; one per prompt, two
in the synthetic split's comparison questions) and alternate step by step in one process, so
machine noise hits all alike. "shared prefix" (the default) also runs each pair's prompt once in the
language model, the two responses on its KV cache; "vision once" turns that off. "per sequence" is what
most trainers do: the chosen and the rejected sequence each carry the image, and the reference
forward encodes it again. "vision once" encodes each prompt's image once per step: both sequences
of the pair reuse the features, and so does the reference when the tower is frozen.

The default model is Qwen2-VL's architecture scaled down so that, as in Qwen2-VL-2B at 224 pixels,
encoding one image costs about as much as one pass of the language model over one sequence
(vision: 8 blocks of width 320 over 256 patches; language: 7 layers of width 512). Timings are
medians of full steps (forward, backward, optimiser), collation excluded (it runs in DataLoader
workers). Prints the medians and their ratios for a frozen and a trained tower.

    python benchmarks/preference.py [--pairs 4 --steps 7 --device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4, help="preference pairs per step")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per variant (after 1 warm-up)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vision", nargs="+", default=["frozen", "train"], choices=["frozen", "train"])
    args = parser.parse_args()

    import torch

    from lightning_vlm import BackboneConfig, TinyVLM
    from lightning_vlm.data import PreferenceDataModule
    from lightning_vlm.data.synthetic import write_synthetic
    from lightning_vlm.objectives import DPO

    torch.manual_seed(0)
    pixels = args.image_size**2
    tiny = TinyVLM(
        hidden_size=512,
        num_layers=7,
        vision_depth=8,
        vision_hidden_size=320,
        min_pixels=pixels,
        max_pixels=pixels,
    )
    data = Path(tempfile.mkdtemp()) / "pairs"
    write_synthetic(data, n_train=args.pairs * (args.steps + 1), n_val=1, image_size=args.image_size)
    print(f"DPO step, {args.pairs} pairs of {args.image_size}px prompts, device {args.device}, "
          f"median of {args.steps} steps")  # fmt: skip
    for vision in args.vision:
        module = DPO(BackboneConfig(tiny=tiny, vision=vision))
        module.configure_model()
        module.to(args.device)
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6)
        batches = {}
        for once in (True, False):
            dm = PreferenceDataModule(
                train=str(data / "pref_train.jsonl"), batch_size=args.pairs, vision_once=once
            )
            dm.processor = module.backbone.processor
            dm.setup("fit")
            loader = dm._loader("train", dm._collator("train"), shuffle=False)
            batches[once] = [_to(b, args.device) for b in loader]
        patches = {
            once: int(batches[once][0]["vision"]["image_grid_thw"].prod(-1).sum()) for once in (True, False)
        }
        # (vision once, shared prefix) of each variant; per sequence has no shared prefix (it needs vision once)
        variants = {"shared prefix": (True, True), "vision once": (True, False), "per sequence": (False, False)}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for step in range(args.steps + 1):
            for name, (once, shared) in variants.items():
                module.pairs.shared_prefix = shared
                batch = batches[once][step % len(batches[once])]
                _sync(args.device)
                t = time.perf_counter()
                loss, _ = module._loss(batch)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                _sync(args.device)
                if step:  # the first step warms up
                    times[name].append(time.perf_counter() - t)
        med = {name: statistics.median(t) for name, t in times.items()}
        print(
            f"  vision {vision:<6}  shared prefix {med['shared prefix']:.3f} s   vision once {med['vision once']:.3f} s "
            f"({patches[True]} patches per encoding)   per sequence {med['per sequence']:.3f} s ({patches[False]})\n"
            f"                 vision once / shared prefix = x{med['vision once'] / med['shared prefix']:.2f}   "
            f"per sequence / vision once = x{med['per sequence'] / med['vision once']:.2f}   "
            f"per sequence / shared prefix = x{med['per sequence'] / med['shared prefix']:.2f}"
        )


def _to(batch: dict, device: str) -> dict:
    from lightning.pytorch.utilities import move_data_to_device

    return move_data_to_device(batch, device)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()

"""Test environment only, never the package: lets torchvision import next to the CPU torch.

The registry's torchvision wheel is a CUDA build whose native ops do not load with the CPU torch, and its
import registers fake kernels for two of them (nms, qnms), which fails while they do not exist. Defining
their schemas first lets it import; its Python transforms (all transformers uses) work. A .pth file in the
torchvision test venv imports this module at every start, before anything imports torchvision.
"""

import torch

_lib = torch.library.Library("torchvision", "DEF")
for _op in ("nms", "qnms"):
    _lib.define(f"{_op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

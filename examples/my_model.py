"""A model of your own in zhilu: an MLP classifier that brings its own data.

    zhilu train --model examples/my_model.py:spec --steps 200
    zhilu train --model examples/my_model.py:spec --nproc 2 --plan dp=2,zero=3
    python -c "import zhilu; print(zhilu.train('examples/my_model.py:spec', plan='dp=2', steps=50))"

``spec`` tells zhilu how to build the model (on the meta device: zhilu materialises it and
initialises it from the seed), its loss, its repeated blocks (the units of FSDP wrapping,
recomputation and compile) and its dataset: a function of the seed returning training and
validation (inputs, targets). The model declares no tensor-parallel plan and no pipeline
split, so zhilu runs it under any data-parallel or ZeRO plan and refuses tp or pp with an
error that names what the spec would have to declare.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import zhilu

FEATURES, CLASSES, WIDTH, DEPTH = 16, 4, 128, 4


class Block(nn.Module):
    """Pre-norm residual MLP block."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.down = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(FEATURES, WIDTH)
        self.layers = nn.ModuleList(Block() for _ in range(DEPTH))
        self.out = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.layers:
            h = block(h)
        return self.out(h)


def blobs(seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Four Gaussian classes in 16 dimensions: 8192 training and 1024 validation points."""
    g = torch.Generator().manual_seed(1000 + seed)
    centres = torch.randn(CLASSES, FEATURES, generator=g) * 1.5

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, CLASSES, (n,), generator=g)
        return centres[y] + torch.randn(n, FEATURES, generator=g), y

    return draw(8192), draw(1024)


spec = zhilu.ModelSpec(name="mlp", build=MLP, loss=F.cross_entropy, blocks="layers", dataset=blobs)

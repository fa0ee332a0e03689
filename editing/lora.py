"""LoRA (Hu et al., ICLR 2022) on a U-Net's attention projections, merged back after training so
the saved model is a stock ``UNet2DConditionModel`` (no peft needed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from baselines.errors import ConfigError

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LoRALinear(nn.Module):
    """y = W x + B A x with A (r, in) random and B (out, r) zero, so training starts at the base model."""

    def __init__(self, base: nn.Linear, rank: int, generator: torch.Generator):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.down = nn.Parameter(torch.randn(rank, base.in_features, generator=generator) / rank)
        self.up = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + F.linear(F.linear(x, self.down.to(x)), self.up.to(x))


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (root.get_submodule(path) if path else root), leaf


def add_lora(unet: nn.Module, rank: int, seed: int = 0) -> nn.ModuleList:
    """Wrap every attention projection of ``unet`` in a ``LoRALinear``; returns the adapters."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    generator = torch.Generator().manual_seed(seed)
    names = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear) and n.endswith(TARGETS)]
    adapters = []
    for name in names:
        parent, leaf = _parent(unet, name)
        adapter = LoRALinear(getattr(parent, leaf), rank, generator)
        setattr(parent, leaf, adapter)
        adapters.append(adapter)
    return nn.ModuleList(adapters)


@torch.no_grad()
def merge_lora(unet: nn.Module) -> None:
    """Fold every adapter into its base weight (W <- W + B A) and put the plain Linear back."""
    names = [n for n, m in unet.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        parent, leaf = _parent(unet, name)
        adapter = getattr(parent, leaf)
        adapter.base.weight += adapter.up @ adapter.down
        setattr(parent, leaf, adapter.base)


@torch.no_grad()
def add_weight_change(target: nn.Module, *, tuned: dict[str, Tensor], base: dict[str, Tensor], scale: float) -> None:
    """target <- target + scale (tuned - base) on every parameter of the fine-tuned model: a
    fine-tune's weight change carried onto a model distilled from the same base (task arithmetic,
    Ilharco et al. 2023; as LCM-LoRA adds a base model's LoRA to a distilled one). Parameters only
    the target has (a guidance student's ``cond_proj``) are left alone; a parameter missing from the
    target or shaped differently is a one-line error."""
    own = target.state_dict()
    for name, value in tuned.items():
        if name not in own or own[name].shape != value.shape:
            raise ConfigError(f"the student lacks the fine-tuned U-Net's parameter {name}: distil it from that model")
        own[name].add_((value.float() - base[name].float()).mul_(scale).to(own[name].dtype))

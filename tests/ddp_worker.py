"""Run under ``torchrun --nproc_per_node 2``: trains a toy model through the one loop and writes
each rank's world size and final weights, so a test can check the replicas stayed equal (and that a
parameter no rank used did not move)."""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from baselines.train import TrainConfig, process_group, train

out = Path(sys.argv[1])
rank, world = process_group()
accelerator = Accelerator()
torch.manual_seed(rank)  # different init per rank: the loop must broadcast
model = nn.Linear(4, 1)
unused = nn.Linear(4, 1)  # trained but never in the loss: with weight decay it must not move, as in one process
initial = [p.detach().clone() for p in unused.parameters()]  # rank 0's are the ones broadcast to every rank


def batches(i):
    g = torch.Generator().manual_seed(i)
    return {"x": torch.randn(8, 4, generator=g)}


def loss(batch, generator):
    return (model(batch["x"]) - batch["x"].sum(1, keepdim=True)).pow(2).mean()


train(
    loss=loss,
    modules={"m": model, "unused": unused},
    batches=batches,
    config=TrainConfig(steps=5, lr=0.1, weight_decay=0.5, log_every=1),
    out_dir=out / "train",
    accelerator=accelerator,
)
(out / f"rank{rank}.json").write_text(
    json.dumps(
        {
            "world_size": world,
            "weights": [p.detach().flatten().tolist() for p in model.parameters()],
            "unused_kept": all(torch.equal(p, q) for p, q in zip(unused.parameters(), initial)),
        }
    )
)

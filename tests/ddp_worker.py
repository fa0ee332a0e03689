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
split_folders = sys.argv[2:] == ["split-folders"]  # each rank its own run folder: machines without shared storage
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


if split_folders:  # rank 0 alone writes checkpoints, so on a second run the ranks see different ones
    from baselines.errors import FewstepError

    run = dict(loss=loss, modules={"m": model}, batches=batches, out_dir=out / f"train{rank}", accelerator=accelerator)
    train(config=TrainConfig(steps=2, lr=0.1, checkpoint_every=1), **run)
    try:
        train(config=TrainConfig(steps=4, lr=0.1, checkpoint_every=1), **run)
        error = None
    except FewstepError as e:
        error = str(e)
    (out / f"rank{rank}.json").write_text(json.dumps({"error": error}))
    sys.exit(0)

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

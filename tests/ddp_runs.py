"""Run several training configs in one torchrun launch (tests/test_distributed.py): each rank
joins the process group once, then `train()` runs every config (JSON list in argv[1]) in it,
sparing a launch (~10 s of imports per rank on the test machine) per config.

`global_batchnorm_rank` is one rank of the GlobalBatchNorm unit test (torch.multiprocessing.spawn);
it imports only torch and headernet_core.distributed (the trainer costs seconds per process)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


# The shape of a 5-clip batch with 3 channels that BatchNorm1d/2d/3d each take.
BATCHNORM_SHAPES = {1: (5, 3, 4), 2: (5, 3, 3, 3), 3: (5, 3, 2, 3, 3)}


def global_batchnorm_rank(rank: int, world: int, folder: str) -> None:
    """Takes rank `rank`'s contiguous part of a batch of 5 clips (3 + 2) through a converted
    BatchNorm1d, 2d and 3d in training mode for two steps each, with momentum 0.1 and None (a
    cumulative average), and saves per (dims, momentum) the inputs, the starting state and per
    step its part's output and input gradient, its weight/bias gradients and the buffers."""
    from headernet_core.distributed import _GLOBAL_KINDS, convert_global_batchnorm, split_bounds

    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        results = {}
        for dims, shape in BATCHNORM_SHAPES.items():
            for momentum in (0.1, None):
                torch.manual_seed(0)   # the same batches and starting state on every rank
                bn = getattr(torch.nn, f"BatchNorm{dims}d")(3, momentum=momentum)
                with torch.no_grad():
                    bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
                    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
                start = {k: v.clone() for k, v in bn.state_dict().items()}
                steps = [(torch.randn(*shape) * 2 + 1, torch.randn(*shape)) for _ in range(2)]
                net = convert_global_batchnorm(torch.nn.Sequential(bn))
                assert type(net[0]) is _GLOBAL_KINDS[type(bn)] and net[0].weight is bn.weight and net[0].training
                saved = []
                for x, mix in steps:
                    lo, hi = split_bounds(len(x), rank, world)
                    part = x[lo:hi].clone().requires_grad_(True)
                    net.zero_grad()
                    out = net(part)
                    (out * mix[lo:hi]).sum().backward()   # the ranks' losses sum to the whole batch's
                    saved.append({"out": out.detach(), "grad": part.grad, "weight": bn.weight.grad.clone(),
                                  "bias": bn.bias.grad.clone(), "running_mean": bn.running_mean.clone(),
                                  "running_var": bn.running_var.clone(),
                                  "num_batches_tracked": bn.num_batches_tracked.clone()})
                results[dims, momentum] = {"start": start, "steps": steps, "saved": saved}
        torch.save(results, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    from headernet_core.config import TrainConfig
    from headernet_core.trainer import train

    dist.init_process_group("gloo")
    try:
        for values in json.loads(sys.argv[1]):
            train(TrainConfig.from_dict(values, source="test"))
    finally:
        dist.destroy_process_group()

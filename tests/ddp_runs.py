"""Run several training configs in one torchrun launch (tests/test_distributed.py): each rank
joins the process group once, then `train()` runs every config (JSON list in argv[1]) in it,
sparing a launch (~10 s of imports per rank on the test machine) per config."""
from __future__ import annotations

import json
import sys

import torch.distributed as dist

from headernet_core.config import TrainConfig
from headernet_core.trainer import train

if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        for values in json.loads(sys.argv[1]):
            train(TrainConfig.from_dict(values, source="test"))
    finally:
        dist.destroy_process_group()

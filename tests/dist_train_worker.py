"""Run by the multi-process tests under a real launcher: train, then save this rank's weights."""

import sys

import torch
import torch.distributed as torch_dist

from gendist import distributed
from gendist.config import load_config
from gendist.training.loop import train

out_dir, overrides = sys.argv[1], sys.argv[2:]
result = train(load_config(None, overrides))
rank = torch_dist.get_rank() if torch_dist.is_initialized() else 0
world = torch_dist.get_world_size() if torch_dist.is_initialized() else 1
torch.save(
    {
        "world_size": world,
        "generator": result["generator"].state_dict(),
        "discriminator": result["discriminator"].state_dict(),
        "step": result.state.step,
    },
    f"{out_dir}/rank{rank}.pt",
)
distributed.shutdown()

"""Run under a real launcher: `gendist.train`'s entry point with a fault injected on one rank.

    fault_worker.py KIND RANK STEP overrides...

KIND is `step` (the training step raises at STEP), `loader` (a loader worker's stream raises
after STEP batches) or `disk` (writing its file of the checkpoint of STEP fails with ENOSPC).
"""

import errno
import os
import sys

import torch

from gendist import train
from gendist.data.loader import ShardStream
from gendist.training.session import Session

kind, bad_rank, bad_step, overrides = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
if int(os.environ.get("RANK", "0")) == bad_rank and kind == "step":
    original_step_done = Session.step_done

    def failing_step_done(self, values):
        if self.state.step + 1 == bad_step:
            raise RuntimeError(f"injected fault at step {bad_step}")
        original_step_done(self, values)

    Session.step_done = failing_step_done
elif int(os.environ.get("RANK", "0")) == bad_rank and kind == "loader":
    original_iter = ShardStream.__iter__

    def failing_iter(self):
        for index, batch in enumerate(original_iter(self)):
            if index == bad_step:
                raise RuntimeError(f"injected loader fault after {bad_step} batches")
            yield batch

    ShardStream.__iter__ = failing_iter
elif int(os.environ.get("RANK", "0")) == bad_rank and kind == "disk":
    original_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if f"step_{bad_step:07d}" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        original_save(obj, path, *args, **kwargs)

    torch.save = failing_save  # as gendist.checkpoint calls it
sys.exit(train.main(overrides))

"""One full training step of a family as gendist.training.loop runs it (its phases in order, the
frozen networks without parameter gradients or gradient sync, a phase of several networks stepped
from one backward), with the family's own phase losses, on deterministic batches of 2B images per
stream: with N processes each rank takes its B = 2B/N slice in rank order. Pix2Pix: its masks are
keyed by global sample index, so they follow the samples, and dropout is off (each rank would draw
its own). CycleGAN: the image pools are off (each rank pools its own fakes). Rank 0 saves every
network. Run with plain python for N = 1; under a DeepSpeed launch config each network is a
DeepSpeed engine.

    family_step_worker.py OUT.pt FAMILY      (FAMILY: pix2pix or cyclegan)
"""

import contextlib
import sys

import torch
import torch.distributed as torch_dist
from torch import nn

from gendist import distributed, engines, families
from gendist.config import RunConfig, load_config
from gendist.families.base import Family, FamilyInputs, StepContext
from gendist.training.loop import frozen

TINY = ["model.image_size=16", "model.ngf=4", "model.ndf=4"]
OVERRIDES = {
    "pix2pix": ["model.name=pix2pix", *TINY, "pix2pix.dropout=0"],
    "cyclegan": ["model.name=cyclegan", *TINY, "cyclegan.pool_size=0", "cyclegan.blocks=2", "cyclegan.patch_layers=1"],
}
TOTAL = 8  # images in the step's global batch


def family(name: str, cfg: RunConfig | None = None) -> Family:
    """The family's networks with the initial weights every run starts from."""
    torch.manual_seed(0)
    return families.declare(FamilyInputs(cfg or load_config(None, OVERRIDES[name]), []))


def main(out_path: str, family_name: str) -> None:
    cfg = load_config(None, OVERRIDES[family_name])
    accelerator = distributed.build_accelerator("no")
    world, rank = accelerator.num_processes, accelerator.process_index
    cfg.data.batch_size = TOTAL // world
    declared = family(family_name, cfg)
    settings = engines.launch_settings()
    config = None if settings is None else engines.engine_config(settings, cfg, world)
    nets: dict[str, nn.Module] = {}
    bare: dict[str, nn.Module] = {}
    updates: dict[str, engines.Update] = {}
    for network in declared.networks:  # as Session.prepare: each network on its own
        optimizer = torch.optim.Adam(network.module.parameters(), lr=network.lr, betas=cfg.optim.betas)
        if config is None:
            model, optimizer = accelerator.prepare(network.module, optimizer)
            updates[network.name] = engines.AcceleratorUpdate(accelerator, optimizer)
        else:
            module = network.module.to(memory_format=torch.contiguous_format)
            model = engines.build_engine(module, optimizer, config)
            updates[network.name] = engines.EngineUpdate(model)
        nets[network.name], bare[network.name] = model, accelerator.unwrap_model(model)
    data = torch.Generator().manual_seed(1)
    share = slice(rank * cfg.data.batch_size, (rank + 1) * cfg.data.batch_size)
    batches = {
        stream: {"images": (torch.rand(TOTAL, 3, 16, 16, generator=data) * 2 - 1)[share].to(accelerator.device)}
        for stream in sorted(declared.streams or {"train": cfg.data.split})
    }
    ctx = StepContext(nets, bare, lambda stream="train": batches[stream], accelerator.device, rank)
    ctx.step = 1
    for phase in declared.phases:  # gendist.training.loop's step, for phases of one repeat
        assert phase.repeats == 1 and phase.after_update is None
        with frozen([bare[name] for name in phase.frozen]), contextlib.ExitStack() as unsynced:
            for name in phase.frozen:
                unsynced.enter_context(engines.no_sync(accelerator, nets[name]))
            loss, _ = phase.loss(ctx)
        if isinstance(phase.network, str):
            updates[phase.network](loss)
        else:
            engines.JointUpdate(accelerator, [updates[name] for name in phase.network])(loss)
    world_size = torch_dist.get_world_size() if torch_dist.is_initialized() else 1
    if accelerator.is_main_process:
        weights = {name: module.state_dict() for name, module in bare.items()}
        torch.save({"world_size": world_size, "phases": [p.name for p in declared.phases], **weights}, out_path)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

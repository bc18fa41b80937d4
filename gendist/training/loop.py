"""The one training loop: every family (gendist.families) runs through it.

Per step, each phase of the family runs its repeats in order; a repeat computes the phase's loss
with the frozen networks giving no gradients (and no gradient sync), then ONE backward and
optimizer step of the phase's network (all-reduced once, or reduce-scattered by its ZeRO engine),
then the phase's after-update hook. A network with an EMA copy updates it after its phase. Each
network is wrapped for data parallelism on its own (Session.prepare).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gendist import distributed, families
from gendist.config import RunConfig
from gendist.families.base import FamilyInputs, StepContext, averaged
from gendist.training.optimizers import apply_hyperparameters, build_optimizer
from gendist.training.session import Session
from gendist.training.stream import TrainState


@dataclass
class TrainResult:
    networks: dict[str, nn.Module]  # the bare trained networks by name; EMA copies as "<name>_ema"
    state: TrainState
    run_dir: Path

    def __getitem__(self, name: str) -> nn.Module:
        return self.networks[name]


@contextlib.contextmanager
def frozen(models: list[nn.Module]):
    """No parameter gradients for `models` inside (inputs still get theirs)."""
    params = [p for model in models for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def train(cfg: RunConfig) -> TrainResult:
    session = Session(cfg)
    distributed.seed_everything(cfg.train.seed)  # identical initial weights on every rank
    family = families.declare(FamilyInputs(cfg, session.attribute_names, session.spec))
    for note in family.notes:
        distributed.rank_print(session.accelerator, note)
    session.open_streams(family.streams)
    nets: dict[str, nn.Module] = {}
    bare: dict[str, nn.Module] = {}
    updates = {}
    emas = {
        network.name: averaged(network.module, cfg.train.ema_decay).to(session.device)
        for network in family.networks
        if network.ema
    }
    for network in family.networks:
        optimizer = build_optimizer(network.module.parameters(), network.lr, cfg.optim)
        nets[network.name], updates[network.name] = session.prepare(
            network.name, network.module, network.optimizer, optimizer
        )
        bare[network.name] = session.accelerator.unwrap_model(nets[network.name])
    for name, ema in emas.items():
        session.register(f"{name}_ema", ema)
        bare[f"{name}_ema"] = ema.module
    for name, obj in family.per_rank.items():
        session.register_per_rank(name, obj)
    distributed.seed_everything(cfg.train.seed, session.accelerator)  # a distinct noise stream per rank
    session.resume()
    for network in family.networks:
        apply_hyperparameters(updates[network.name].optimizer, network.lr, cfg.optim)
    session.attach(family.sampling(bare))
    ctx = StepContext(nets, bare, session.next_batch, session.device, session.accelerator.process_index)
    with session:
        while session.running:
            ctx.step, ctx.scratch = session.state.step + 1, {}
            values: dict[str, torch.Tensor | float] = {}
            for phase in family.phases:
                ctx.repeats = phase.repeats
                for ctx.repeat in range(phase.repeats):
                    with frozen([bare[name] for name in phase.frozen]), contextlib.ExitStack() as unsynced:
                        for name in phase.frozen:
                            unsynced.enter_context(session.no_sync(nets[name]))
                        loss, stats = phase.loss(ctx)
                    updates[phase.network](loss)
                    if phase.after_update is not None:
                        phase.after_update()
                    for name, value in stats.items():  # the mean over the repeats
                        values[name] = values.get(name, 0.0) + value / phase.repeats
                if phase.network in emas:
                    emas[phase.network].update_parameters(bare[phase.network])
            session.step_done(values)
    return TrainResult(bare, session.state, session.run_dir)

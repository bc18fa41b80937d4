"""The one training loop: every family (gendist.families) runs through it.

Per step, each phase of the family runs its repeats in order; a repeat computes the phase's loss
with the frozen networks giving no gradients (and no gradient sync), then ONE backward and
optimizer step of the phase's network (all-reduced once, or reduce-scattered by its ZeRO engine),
then the phase's after-update hook (a phase may step several networks from its one backward, each
by its own optimizer). A network with an EMA copy updates it after its phase; a network with a
learning-rate schedule gets its step's rate before the step. Each network is wrapped for data
parallelism on its own (Session.prepare).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gendist import distributed, engines, families
from gendist.config import RunConfig
from gendist.families.base import FamilyInputs, StepContext, averaged
from gendist.training.optimizers import apply_hyperparameters, build_optimizer, set_lr
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
    with session.owned_run_dir():
        return _run(session)


def _run(session: Session) -> TrainResult:
    cfg = session.cfg
    distributed.seed_everything(cfg.train.seed)  # identical initial weights on every rank
    rank = session.accelerator.process_index
    family = families.declare(FamilyInputs(cfg, session.attribute_names, session.spec, rank))
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
        bare[network.name] = session.accelerator.unwrap_model(nets[network.name], keep_torch_compile=False)
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
    phase_updates = [
        updates[phase.updated[0]]
        if len(phase.updated) == 1
        else engines.JointUpdate(session.accelerator, [updates[name] for name in phase.updated])
        for phase in family.phases
    ]
    scheduled = [network for network in family.networks if network.lr_factor is not None]
    ctx = StepContext(nets, bare, session.next_batch, session.device, rank)
    with session:
        while session.running:
            session.begin_step()
            ctx.step, ctx.scratch = session.state.step + 1, {}
            for network in scheduled:
                set_lr(updates[network.name].optimizer, network.lr * network.lr_factor(ctx.step))
            values: dict[str, torch.Tensor | float] = {}
            for phase, update in zip(family.phases, phase_updates):
                if phase.when is not None and not phase.when(ctx.step):
                    continue
                ctx.repeats = phase.repeats
                for ctx.repeat in range(phase.repeats):
                    with frozen([bare[name] for name in phase.frozen]), contextlib.ExitStack() as unsynced:
                        for name in phase.frozen:
                            unsynced.enter_context(session.no_sync(nets[name]))
                        loss, stats = phase.loss(ctx)
                    update(loss)
                    if phase.after_update is not None:
                        phase.after_update()
                    for name, value in stats.items():  # the mean over the repeats
                        values[name] = values.get(name, 0.0) + value / phase.repeats
                for name in phase.updated:
                    if name in emas:
                        emas[name].update_parameters(bare[name])
            session.step_done(values)
    return TrainResult(bare, session.state, session.run_dir)

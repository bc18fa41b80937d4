"""One critic step (WGAN-GP's, or the original GAN's) on a deterministic batch of 2B samples: with N
processes each rank takes its B = 2B/N slice; rank 0 saves the critic's parameters. Run with plain
python for N = 1; under a DeepSpeed launch config the critic is a DeepSpeed engine.

    critic_step_worker.py OUT.pt FAMILY      (FAMILY: wgan_gp or gan)
"""

import sys

import torch
import torch.distributed as torch_dist

from gendist import distributed, engines
from gendist.config import load_config
from gendist.families.gan import discriminator_loss
from gendist.models.dcgan import Discriminator
from gendist.models.fully_connected import FullyConnectedDiscriminator


def critic_for(family: str) -> torch.nn.Module:
    if family == "gan":
        return FullyConnectedDiscriminator(ndf=4, image_size=16)
    return Discriminator(ndf=4, image_size=16, norm="layer")


def main(out_path: str, family: str, total: int = 8) -> None:
    cfg = load_config(
        None,
        [
            f"model.name={family}",
            "model.d_norm=layer",
            "model.image_size=16",
            "optim.lr_d=1e-3",
            "optim.betas=[0.0, 0.9]",
        ],
    )
    accelerator = distributed.build_accelerator("no")
    torch.manual_seed(0)
    critic = critic_for(family)
    optimizer = torch.optim.Adam(critic.parameters(), lr=cfg.optim.lr_d, betas=cfg.optim.betas)
    settings = engines.launch_settings()
    if settings is None:
        critic, optimizer = accelerator.prepare(critic, optimizer)
        update = engines.AcceleratorUpdate(accelerator, optimizer)
    else:
        cfg.data.batch_size = total // accelerator.num_processes
        critic = engines.build_engine(
            critic, optimizer, engines.engine_config(settings, cfg, accelerator.num_processes)
        )
        update = engines.EngineUpdate(critic)
    data = torch.Generator().manual_seed(1)
    real, fake = torch.randn(total, 3, 16, 16, generator=data), torch.randn(total, 3, 16, 16, generator=data)
    alpha = torch.rand(total, generator=data)
    share = total // accelerator.num_processes
    mine = slice(accelerator.process_index * share, (accelerator.process_index + 1) * share)
    loss, _ = discriminator_loss(critic, cfg, real[mine], fake[mine], None, alpha[mine])
    update(loss)
    world = torch_dist.get_world_size() if torch_dist.is_initialized() else 1
    if accelerator.is_main_process:
        torch.save({"world_size": world, "critic": accelerator.unwrap_model(critic).state_dict()}, out_path)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

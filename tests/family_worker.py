"""Train the named families (comma-separated, or all) a few steps in one launch, one after the other,
saving this rank's weights per family."""

import sys

import torch
import torch.distributed as torch_dist

from gendist import distributed
from gendist.config import load_config
from gendist.training.loop import train

out_dir, names, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
families = {
    "gan": ["model.name=gan"],
    "dcgan": [],
    "wgan": ["model.name=wgan", "loss.n_critic=2", "optim.name=rmsprop", "loss.clip_value=0.01"],
    "wgan_gp": ["model.name=wgan_gp", "model.d_norm=layer", "loss.n_critic=2", "optim.betas=[0.0, 0.9]"],
    "cgan": ["model.name=cgan", "model.attributes=[Male,Smiling,Eyeglasses]"],
    "vae": ["model.name=vae", "vae.likelihood=gaussian_learned", "vae.kl_warmup_steps=2"],
    "ae": ["model.name=ae"],
    "pix2pix": ["model.name=pix2pix"],
    "cyclegan": ["model.name=cyclegan", "cyclegan.domains=[not_Male,Male]", "cyclegan.blocks=2"],
    "classifier": ["model.name=classifier", "classifier.blocks=1"],
    # SRResNet for step 1, the adversarial stage (VGG content at relu2_2, random-init) after
    "srgan": [
        "model.name=srgan",
        "srgan.blocks=1",
        "srgan.pretrain_steps=1",
        "srgan.content=vgg19",
        "srgan.vgg_weights=random",
        "srgan.vgg_layer=relu2_2",
    ],
}
rank = None
for family, extra in families.items():
    if names != "all" and family not in names.split(","):
        continue
    cfg = load_config(None, [*overrides, *extra, f"train.run_dir={out_dir}/{family}"])
    weights = {name: network.state_dict() for name, network in train(cfg).networks.items()}
    rank = torch_dist.get_rank() if torch_dist.is_initialized() else 0
    world = torch_dist.get_world_size() if torch_dist.is_initialized() else 1
    torch.save({"world_size": world, **weights}, f"{out_dir}/{family}-rank{rank}.pt")
distributed.shutdown()

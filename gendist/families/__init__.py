"""The registry of families: `model.name` -> the declaration of its networks, phases and sampling."""

from __future__ import annotations

from collections.abc import Callable

from gendist.families import classifier, cyclegan, gan, pix2pix, srgan, vae
from gendist.families.base import Family, FamilyInputs

DECLARATIONS: dict[str, Callable[[FamilyInputs], Family]] = {
    "gan": gan.declare,
    "dcgan": gan.declare,
    "cgan": gan.declare,
    "wgan": gan.declare,
    "wgan_gp": gan.declare,
    "vae": vae.declare,
    "ae": vae.declare,
    "pix2pix": pix2pix.declare,
    "cyclegan": cyclegan.declare,
    "classifier": classifier.declare,
    "srgan": srgan.declare,
}


def declare(inputs: FamilyInputs) -> Family:
    """The family `inputs.cfg.model.name` names (RunConfig.validate refuses names not in DECLARATIONS)."""
    return DECLARATIONS[inputs.cfg.model.name](inputs)

"""gendist: distributed training and comparison of GANs and VAEs on CelebA."""

__version__ = "0.1.0"

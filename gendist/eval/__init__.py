"""Evaluation: FID/KID with pytorch-fid's Inception, cached real statistics, VAE reconstruction error."""

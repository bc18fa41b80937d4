"""Datasets: CelebA and image-folder sources, the embedded synthetic faces, shards, streaming loader."""

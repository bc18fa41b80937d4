"""The pool of past fakes that CycleGAN's discriminators train on (Shrivastava et al. 2017; Zhu et al. 2017).

``ImagePool(size).query(fakes)`` does what the reference's ``util/image_pool.py`` does: until the pool
holds ``size`` images, each new image is stored and returned; once full, each new image is, with
probability 1/2, swapped with a uniformly drawn stored one (the stored one is returned, the new one
takes its place), else returned itself. Images are taken one by one in batch order, so a slot
refilled by one image of a batch can be returned for a later one. ``size=0`` is no pool: ``query``
returns its input as it is.

Unlike the reference (Python's global ``random``), the draws come from the pool's own
``torch.Generator`` (CPU, seeded), so they depend on nothing else the run draws: one rank and a
resumed run draw the same. Seed each rank's pool differently (seed + rank): each rank pools its own
fakes. Every image taken once the pool is full consumes exactly one uniform and one slot index,
whatever the coin says, so the stream of draws depends only on the number of images queried.

State. ``state_dict()`` holds the stored images (one CPU tensor, stacked in slot order, in the dtype
they were stored in) and the generator's state (a uint8 tensor), plus the size: tensors and an int,
loadable with ``torch.load(weights_only=True)``. ``load_state_dict`` restores both, so the queries
after a resume return what they would have returned without it, bit for bit.

Devices. Images are stored detached, cloned (not views of the caller's batch), on the device and in
the dtype of the images queried (loaded ones, or all of them if a query comes in another dtype, are
moved and cast at the next query); ``query`` returns a new detached tensor on the input's device and
in its dtype.
"""

from __future__ import annotations

from typing import Any

import torch


class ImagePool:
    def __init__(self, size: int = 50, seed: int = 0) -> None:
        if size < 0:
            raise ValueError(f"pool size must be >= 0, got {size}")
        self.size = size
        self.images: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.images)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """(B, ...) new fakes -> (B, ...) fakes to train the discriminator on, new and past mixed."""
        if self.size == 0:
            return images
        new = images.detach()
        if len(new) == 0:
            return new.clone()
        # a no-op unless just loaded, or queried in another dtype: the pool holds one device and dtype
        self.images = [stored.to(new.device, new.dtype) for stored in self.images]
        filling = min(len(new), self.size - len(self.images))
        taken = len(new) - filling
        coins = torch.rand(taken, generator=self.generator).tolist()
        slots = torch.randint(self.size, (taken,), generator=self.generator).tolist()
        out: list[torch.Tensor] = []
        for i, image in enumerate(new):
            if i < filling:
                self.images.append(image.clone())
                out.append(image)
                continue
            coin, slot = coins[i - filling], slots[i - filling]
            if coin < 0.5:
                out.append(self.images[slot])
                self.images[slot] = image.clone()
            else:
                out.append(image)
        return torch.stack(out)

    def state_dict(self) -> dict[str, Any]:
        stored = torch.stack(self.images).cpu() if self.images else torch.empty(0)
        return {"size": self.size, "images": stored, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["size"] != self.size:
            raise ValueError(f"a pool of {state['size']} images cannot be loaded into one of {self.size}")
        self.images = list(state["images"].clone()) if state["images"].numel() else []
        self.generator.set_state(state["generator"])

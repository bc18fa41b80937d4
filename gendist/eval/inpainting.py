"""Inpainting metrics and classical baselines, computed the same way for the model and the baselines.

Conventions. Images are (B, 3, H, W) float tensors in [0, 1] (``to_unit`` maps a generator's [-1, 1]
output there), masks are (B, 1, H, W) or (B, H, W) with 1 (or True) in the hole, as in
``gendist.models.pix2pix``. Every metric returns one value per image, shape (B,); average them over
the evaluation set. Compare methods on composites (known pixels kept, ``gendist.data.masks.composite``) and
quantised to 8 bits as the OpenCV baseline's output is (``quantize``), with the same fixed, seeded
masks for every method. ``PROTOCOL`` states the rest; quote it next to any number.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PROTOCOL = (
    "Images in [0, 1], RGB, composited (known pixels kept) and quantised to 8 bits for every method. "
    "PSNR: 10*log10(1/MSE), MSE over all RGB pixels of the whole image, no border crop, no Y channel; "
    "identical images give inf (no cap). "
    "SSIM (Wang et al. 2004): Gaussian window 11x11, sigma 1.5, K1 0.01, K2 0.03, data range 1, "
    "valid positions only (no padding), SSIM map averaged per channel then over RGB "
    "(as pytorch-msssim's ssim). "
    "L1 in hole: mean |output - target| over the hole's pixels and RGB channels only. "
    "All per image, then averaged over the evaluation set."
)

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (the generator's tanh range) -> [0, 1], clamped."""
    return ((images + 1) / 2).clamp(0, 1)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats rounded to the 256 levels of an 8-bit image (what the uint8 baselines return)."""
    return torch.round(images.clamp(0, 1) * 255) / 255


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8, the layout OpenCV takes."""
    return (quantize(images) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8_hwc(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


def _pair(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    output, target = torch.as_tensor(output), torch.as_tensor(target)
    if output.shape != target.shape or output.dim() != 4:
        raise ValueError(f"expected two (B, C, H, W) batches of one shape, got {output.shape} and {target.shape}")
    return output.double(), target.double()


def _hole(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    mask = torch.as_tensor(mask)
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != like.shape[0] or mask.shape[2:] != like.shape[2:]:
        raise ValueError(f"mask must be (B, 1, H, W) or (B, H, W) for images {tuple(like.shape)}, got {mask.shape}")
    return (mask != 0).to(like.dtype)


def psnr(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB over RGB in [0, 1], whole image; inf where the images are identical."""
    output, target = _pair(output, target)
    mse = (output - target).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse)  # 1/0 = inf: identical images have no finite PSNR


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) of images in [0, 1]: see ``PROTOCOL``. 1 for identical images."""
    output, target = _pair(output, target)
    channels, height, width = output.shape[1:]
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {height}x{width}")
    g = _gaussian_window().to(output.device)
    rows, cols = g.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), g.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    blur = lambda x: F.conv2d(F.conv2d(x, rows, groups=channels), cols, groups=channels)  # separable, valid
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # data range 1
    mu_x, mu_y = blur(output), blur(target)
    var_x = blur(output * output) - mu_x**2
    var_y = blur(target * target) - mu_y**2
    cov = blur(output * target) - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    contrast_structure = (2 * cov + c2) / (var_x + var_y + c2)
    return (luminance * contrast_structure).mean(dim=(2, 3)).mean(1)


def l1_in_hole(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image mean absolute error over the hole's pixels (and channels) only; nan for an empty hole."""
    output, target = _pair(output, target)
    hole = _hole(mask, output)
    error = ((output - target).abs() * hole).flatten(1).sum(1)
    return error / (hole.flatten(1).sum(1) * output.shape[1])


def inpainting_metrics(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """psnr, ssim and l1_in_hole per image, the same call for the model and every baseline."""
    return {"psnr": psnr(output, target), "ssim": ssim(output, target), "l1_hole": l1_in_hole(output, target, mask)}


def telea_fill(images_uint8: np.ndarray, masks: np.ndarray, radius: int = 3) -> np.ndarray:
    """OpenCV's Telea (2004) fast-marching inpainting: (B, H, W, 3) uint8 and (B, H, W) hole masks -> uint8.

    Hole pixels' input values are never read; known pixels come back unchanged. A single (H, W, 3)
    image with an (H, W) mask works too.
    """
    import cv2  # opencv-python-headless; imported here so the rest of gendist does not need it

    images = np.asarray(images_uint8)
    masks = np.asarray(masks)
    if images.dtype != np.uint8:
        raise ValueError(f"telea_fill takes uint8 images, got {images.dtype}")
    single = images.ndim == 3
    if single:
        images, masks = images[None], masks[None]
    if masks.ndim == 4 and masks.shape[-1] == 1:
        masks = masks[..., 0]
    if images.ndim != 4 or masks.shape != images.shape[:3]:
        raise ValueError(f"expected (B, H, W, C) images and (B, H, W) masks, got {images.shape} and {masks.shape}")
    holes = (masks != 0).astype(np.uint8)
    filled = np.stack([cv2.inpaint(image, hole, radius, cv2.INPAINT_TELEA) for image, hole in zip(images, holes)])
    filled = filled.reshape(images.shape)  # cv2 drops a trailing channel axis of 1
    filled = np.where(holes[..., None].astype(bool), filled, images)
    return filled[0] if single else filled


def mean_fill(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images: each hole filled with the mean colour of that image's known pixels."""
    images = torch.as_tensor(images)
    hole = _hole(masks, images.double())
    known = 1 - hole
    values = images.double()
    mean = (values * known).sum(dim=(2, 3), keepdim=True) / known.sum(dim=(2, 3), keepdim=True).clamp_min(1)
    filled = values * known + mean * hole
    return filled.to(images.dtype) if images.is_floating_point() else filled.round().to(images.dtype)

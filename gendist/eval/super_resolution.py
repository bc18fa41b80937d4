"""Super-resolution metrics, computed the same way for the model and the bicubic baseline.

Conventions. Images are (B, 3, H, W) float tensors in [0, 1], quantised to 8 bits before they are scored
(``gendist.eval.inpainting.quantize``); every metric returns one value per image, shape (B,); average
them over the evaluation set. PSNR and SSIM are ``gendist.eval.inpainting``'s, taken on the luma (Y)
channel of MATLAB's ``rgb2ycbcr`` and on RGB, with a border of ``scale`` pixels cropped first, as the SR
literature (BasicSR's ``calculate_psnr(crop_border=scale, test_y_channel=True)``) does. ``PROTOCOL``
states the rest; quote it next to any number.
"""

from __future__ import annotations

import torch

from gendist.eval.inpainting import SSIM_WINDOW, psnr, ssim

SR_METHODS = ("model", "bicubic")
SR_METRICS = ("psnr_y", "ssim_y", "psnr_rgb", "ssim_rgb")

PROTOCOL = (
    "HR: the first eval.recon_images images of eval.recon_split at model.image_size (8-bit); "
    "LR: gendist.data.resolution.downsample of the HR images (bicubic with antialiasing, PIL's a = -0.5 "
    "kernel, quantised to 8 bits); the model's output and the bicubic upsampling of the same LR images "
    "(align_corners=False, clamped) quantised to 8 bits, in [0, 1]. "
    "Y channel: ITU-R BT.601 studio range as MATLAB's rgb2ycbcr, Y = (16 + 65.481 R + 128.553 G + 24.966 B) "
    "/ 255 with RGB in [0, 1], not rounded. A border of scale pixels cropped on every side before every metric. "
    "PSNR: 10*log10(1/MSE), MSE over all pixels (and channels, for RGB) of the cropped image in [0, 1]; "
    "identical images give inf (no cap). "
    "SSIM (Wang et al. 2004): Gaussian window 11x11, sigma 1.5, K1 0.01, K2 0.03, data range 1, valid "
    "positions only (no padding), SSIM map averaged per channel then over the channels. "
    "All per image, then averaged over the evaluation set. "
    "FID/KID of the model's and of the bicubic images against the eval.split reference, the same Inception "
    "protocol as the unconditional scores."
)

# ITU-R BT.601 studio-range luma of RGB in [0, 1], in 8-bit units (MATLAB's rgb2ycbcr, BasicSR's y_only)
Y_WEIGHTS = (65.481, 128.553, 24.966)
Y_OFFSET = 16.0


def rgb_to_y(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) luma in [16/255, 235/255], in the images' dtype."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, H, W) RGB batch, got shape {tuple(images.shape)}")
    weights = torch.tensor(Y_WEIGHTS, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return ((images * weights).sum(1, keepdim=True) + Y_OFFSET) / 255


def crop_border(images: torch.Tensor, pixels: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H - 2 * pixels, W - 2 * pixels): `pixels` dropped on every side."""
    height, width = images.shape[-2:]
    if pixels < 0 or 2 * pixels >= min(height, width):
        raise ValueError(f"cannot crop {pixels} px from every side of a {height}x{width} image")
    return images[..., pixels : height - pixels, pixels : width - pixels]


def sr_metrics(output: torch.Tensor, target: torch.Tensor, scale: int) -> dict[str, torch.Tensor]:
    """SR_METRICS per image, the same call for the model and the bicubic baseline: see ``PROTOCOL``."""
    output, target = torch.as_tensor(output).double(), torch.as_tensor(target).double()
    if output.shape != target.shape or output.dim() != 4 or output.shape[1] != 3:
        raise ValueError(f"expected two (B, 3, H, W) batches of one shape, got {output.shape} and {target.shape}")
    height, width = output.shape[2:]
    if min(height, width) - 2 * scale < SSIM_WINDOW:
        raise ValueError(
            f"{height}x{width} images less a {scale} px border are smaller than SSIM's {SSIM_WINDOW} px window"
        )
    output, target = crop_border(output, scale), crop_border(target, scale)
    output_y, target_y = rgb_to_y(output), rgb_to_y(target)
    return {
        "psnr_y": psnr(output_y, target_y),
        "ssim_y": ssim(output_y, target_y),
        "psnr_rgb": psnr(output, target),
        "ssim_rgb": ssim(output, target),
    }

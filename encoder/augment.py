"""Chest X-ray multi-crop augmentation (DINOv2 recipe adapted to grayscale radiographs).

Tensors in, tensors out: an image (1|3, H, W) float in [0, 1] becomes 2 global and ``n_local``
local crops, each (1, s, s) grayscale normalised with the rad-dino statistics. They stay one
channel through collation, pinning and the copy to the GPU; the encoder expands them to its 3
input channels on the device (:meth:`encoder.vit.ViTEncoder.prepare_tokens`), a third of the bytes.
Every random draw comes from the ``torch.Generator`` passed in, never from a global RNG, so a
sample's crops (and a batch's masks) are reproduced exactly when training resumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode

from .masking import masked_indices, sample_masks

__all__ = ["MultiCropConfig", "MultiCrop", "sample_crop", "range_compress", "collate_multicrop"]


@dataclass
class MultiCropConfig:
    """Multi-crop settings; defaults follow DINOv2 / rad-dino."""

    global_size: int = 224
    local_size: int = 98
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect-ratio range (torchvision default)
    # Horizontal flip fakes situs inversus (heart on the right), so it is off by default.
    hflip: bool = False
    jitter_prob: float = 0.8  # chance of the intensity jitter below (DINOv2's colour-jitter p)
    brightness: float = 0.4  # factor uniform in [1 - b, 1 + b]
    contrast: float = 0.4  # factor uniform in [1 - c, 1 + c]
    gamma: tuple[float, float] = (0.7, 1.4)  # log-uniform; (1, 1) disables
    blur_prob_global: tuple[float, float] = (1.0, 0.1)  # first / second global crop (DINOv2)
    blur_prob_local: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    noise_std: tuple[float, float] = (0.0, 0.03)  # additive Gaussian noise, std uniform in range
    noise_prob: float = 0.3
    # Acquisition augmentations (off by default; DINOv2 has none): both crops of a film share its
    # processing and collimation. Measured on the phantoms, they do not stop the CLS reading the
    # processing (docs/encoder.md, "What the objective learns", levers AC1/AC2).
    range_compression: tuple[float, float] = (0.0, 0.0)  # k uniform in range: x - k * (lowpass(x) - mean)
    collimation_prob: float = 0.0  # chance of collimator borders on a crop
    collimation_max: float = 0.12  # each border's width: uniform up to this share of the side
    mean: float = 0.5307
    std: float = 0.2583


def _uniform(generator: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=generator).item()


def _coin(generator: torch.Generator, p: float) -> bool:
    # Always draws, so the stream position does not depend on p.
    return torch.rand((), generator=generator).item() < p


def sample_crop(
    h: int,
    w: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """Random-resized-crop box ``(top, left, height, width)`` for an ``h x w`` image.

    Same recipe as torchvision's ``RandomResizedCrop.get_params`` (area fraction uniform in
    ``scale``, log-uniform aspect ratio, 10 tries, then a centred fallback) but drawing from
    ``generator``. ``None`` means torch's global RNG.
    """
    g = torch.default_generator if generator is None else generator
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, *log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g).item())
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g).item())
            return top, left, ch, cw
    # Fallback: the largest centred crop whose aspect ratio is inside the range.
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _to_gray(image: Tensor) -> Tensor:
    """(1|3, H, W) float -> (1, H, W) float32."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected an image (1|3, H, W), got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"expected a float image in [0, 1], got {image.dtype}")
    image = image.float()
    # A 3-channel radiograph is replicated grayscale; the mean is exact for that and sane otherwise.
    return image.mean(dim=0, keepdim=True) if image.shape[0] == 3 else image


class MultiCrop:
    """Turn one radiograph into DINOv2-style global and local crops."""

    def __init__(self, cfg: MultiCropConfig | None = None) -> None:
        self.cfg = cfg if cfg is not None else MultiCropConfig()

    def __call__(self, image: Tensor, generator: torch.Generator) -> dict[str, list[Tensor]]:
        """(1|3, H, W) in [0, 1] -> {"global_crops": 2 x (1,g,g), "local_crops": L x (1,l,l)}."""
        cfg = self.cfg
        gray = _to_gray(image)  # (1, H, W)
        global_crops = [
            self._view(gray, cfg.global_size, cfg.global_scale, cfg.blur_prob_global[k], generator)
            for k in range(2)
        ]
        local_crops = [
            self._view(gray, cfg.local_size, cfg.local_scale, cfg.blur_prob_local, generator)
            for _ in range(cfg.n_local)
        ]
        return {"global_crops": global_crops, "local_crops": local_crops}

    def _view(
        self,
        gray: Tensor,  # (1, H, W)
        size: int,
        scale: tuple[float, float],
        blur_prob: float,
        g: torch.Generator,
    ) -> Tensor:
        """One augmented crop, (1, size, size) normalised."""
        cfg = self.cfg
        H, W = gray.shape[-2:]
        top, left, h, w = sample_crop(H, W, scale, cfg.ratio, g)
        x = TF.resized_crop(  # (1, size, size)
            gray, top, left, h, w, [size, size],
            interpolation=InterpolationMode.BICUBIC, antialias=True,
        )
        x = x.clamp(0.0, 1.0)  # bicubic overshoots at edges; gamma below needs x >= 0
        if cfg.hflip and _coin(g, 0.5):
            x = x.flip(-1)
        if cfg.range_compression != (0.0, 0.0):  # draws only when on: older runs keep their streams
            x = range_compress(x, _uniform(g, *cfg.range_compression))
        if cfg.collimation_prob > 0 and _coin(g, cfg.collimation_prob):
            x = self._collimate(x, g)
        if _coin(g, cfg.jitter_prob):
            x = self._jitter(x, g)
        if _coin(g, blur_prob):
            sigma = _uniform(g, *cfg.blur_sigma)
            # Kernel covers +-3 sigma; reflect padding needs it smaller than twice the crop.
            k = min(2 * math.ceil(3 * sigma) + 1, 2 * (size // 2) - 1)
            if k >= 3:
                x = TF.gaussian_blur(x, [k, k], [sigma, sigma])
        if _coin(g, cfg.noise_prob):
            std = _uniform(g, *cfg.noise_std)
            x = x + std * torch.randn(x.shape, generator=g, dtype=x.dtype)
        x = x.clamp(0.0, 1.0)
        return (x - cfg.mean) / cfg.std  # (1, size, size)

    def _collimate(self, x: Tensor, g: torch.Generator) -> Tensor:
        """Collimator borders on a (1, s, s) crop: each side with probability 1/2, a strip up to
        ``collimation_max`` of the side, all black or all white (as the synthetic films have)."""
        s = x.shape[-1]
        widths = [int(_uniform(g, 0, self.cfg.collimation_max) * s) if _coin(g, 0.5) else 0 for _ in range(4)]
        fill = 1.0 if _coin(g, 0.5) else 0.0
        x = x.clone()
        left, right, top, bottom = widths
        x[..., :, :left] = fill
        x[..., :, s - right:] = fill  # a zero width is an empty slice
        x[..., :top, :] = fill
        x[..., s - bottom:, :] = fill
        return x

    def _jitter(self, x: Tensor, g: torch.Generator) -> Tensor:
        """Brightness, contrast and gamma on a (1, s, s) crop in [0, 1]."""
        cfg = self.cfg
        b = max(0.0, _uniform(g, 1 - cfg.brightness, 1 + cfg.brightness))
        c = max(0.0, _uniform(g, 1 - cfg.contrast, 1 + cfg.contrast))
        # Log-uniform so gamma < 1 and gamma > 1 are equally likely around 1.
        gamma = math.exp(_uniform(g, math.log(cfg.gamma[0]), math.log(cfg.gamma[1])))
        x = (x * b).clamp(0.0, 1.0)
        m = x.mean()
        x = ((x - m) * c + m).clamp(0.0, 1.0)
        return x.pow(gamma)


def range_compress(x: Tensor, k: float) -> Tensor:
    """Large-scale range compression of a (1, s, s) crop in [0, 1], as CR/DX processing does:
    ``x - k * (lowpass(x) - mean(lowpass(x)))`` with a Gaussian low-pass of sigma ``s / 12``
    (k > 0 flattens the large-scale contrast, k < 0 steepens it), clamped to [0, 1]."""
    s = x.shape[-1]
    sigma = s / 12
    k_size = min(2 * math.ceil(3 * sigma) + 1, 2 * (s // 2) - 1)
    low = TF.gaussian_blur(x, [k_size, k_size], [sigma, sigma])
    return (x - k * (low - low.mean())).clamp(0.0, 1.0)


def collate_multicrop(
    samples: list[dict],
    grid_global: tuple[int, int],
    mask_cfg: dict | None,
    generator: torch.Generator,
) -> dict:
    """Stack per-image crops crop-major and draw iBOT masks for the global crops.

    Returns ``global_crops`` (2B, C, g, g) ordered [crop0 of every image, crop1 of every image],
    ``local_crops`` (L*B, C, l, l) in the same order or None (C: the crops' channels, 1 from
    :class:`MultiCrop`), ``masks`` (2B, H*W) bool,
    ``mask_indices`` (M,), ``mask_weights`` (M,) and ``n_masked`` (= M). ``mask_cfg`` holds
    keyword arguments of :func:`sample_masks` (``style``, ``mask_ratio_range``, ...; ``style``
    ``"dinov2"`` when absent); None means no masking.
    """
    B = len(samples)
    n_global = len(samples[0]["global_crops"])
    n_local = len(samples[0]["local_crops"])
    global_crops = torch.stack([s["global_crops"][k] for k in range(n_global) for s in samples])
    local_crops = None
    if n_local:
        local_crops = torch.stack([s["local_crops"][k] for k in range(n_local) for s in samples])
    n_views = n_global * B
    if mask_cfg is None:
        masks = torch.zeros(n_views, grid_global[0] * grid_global[1], dtype=torch.bool)
    else:
        masks = sample_masks(n_views, grid_global, generator=generator, **mask_cfg)
    mask_idx, mask_w = masked_indices(masks)
    return {
        "global_crops": global_crops,
        "local_crops": local_crops,
        "masks": masks,
        "mask_indices": mask_idx,
        "mask_weights": mask_w,
        "n_masked": int(mask_idx.numel()),
    }

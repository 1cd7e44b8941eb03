"""Batch augmentation on the batch's device: fastai's `aug_transforms` + `Normalize(imagenet_stats)` in plain PyTorch.

Behaviour follows fastai 2.8.12's `aug_transforms` and `Normalize` (fastai/vision/augment.py), with these deliberate
differences:

* One resampling instead of two. With min_scale < 1, fastai samples the flip/rotate/zoom/warp at the input size (460)
  and then samples again for `RandomResizedCropGPU` (to 224). Here the crop, flip, rotation, zoom and warp are composed
  into ONE map from output pixels to input coordinates, evaluated directly at the output size, and the input is read
  with ONE bilinear `grid_sample` (align_corners=True, padding `pad_mode`). This means less blur and less work.
* The crop is drawn per image. fastai draws one crop for the whole batch, and fastai PR #3252 notes that users found
  that surprising. With `batch=True` every draw, the crop included, is shared by the whole batch.
* Anti-aliasing happens once per batch. fastai area-downsamples before bilinear sampling when the shrink ratio exceeds
  2. Here, when the input's short side exceeds 2*size, the whole batch is area-resized so that side becomes 2*size.
  On the validation path that is exactly fastai's 460 -> 448 (area) -> 224 (bilinear). Crops are kept in normalised
  coordinates, so they select the same region of the shrunk image.
* Random draws come from an explicit CPU `torch.Generator`, never from the global RNG, and the results are then moved
  to the device. So one seed gives the same augmentation on CPU and CUDA. fastai draws from the global torch RNG and
  Python's `random`.

Coordinates are normalised with align_corners=True: pixel i of an n-pixel axis sits at 2i/(n-1) - 1. Points and grids
hold (x, y). For an output point q, the source point in the input is H(M(C q)), where:
C is the crop window, M = F·R·Z is flip · rotate · zoom, and H is the warp homography.
C and M are affine and H is projective, so each image needs one 3x3 matrix P = H·M·C (`sampling_matrix`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # fastai imagenet_stats
IMAGENET_STD = (0.229, 0.224, 0.225)
PAD_MODES = ("zeros", "border", "reflection")  # grid_sample padding modes
LOGIT_EPS = 1e-7  # fastai lighting clamps x to [1e-7, 1-1e-7] before the logit
FLIP_PROBABILITY = 0.5  # fastai aug_transforms: Flip(p=0.5) / Dihedral(p=0.5)
CANONICAL_CORNERS = ((-1.0, -1.0), (-1.0, 1.0), (1.0, -1.0), (1.0, 1.0))  # warp target corners, fastai order
# The 8 dihedral ops (fastai Dihedral) as signed permutation matrices (a, b, c, d) = [[a, b], [c, d]] on (x, y).
DIHEDRAL_OPS = (
    (1, 0, 0, 1),
    (-1, 0, 0, 1),
    (1, 0, 0, -1),
    (-1, 0, 0, -1),
    (0, 1, 1, 0),
    (0, -1, 1, 0),
    (0, 1, -1, 0),
    (0, -1, -1, 0),
)


@dataclass(frozen=True)
class AugmentSettings:
    """Settings of fastai's `aug_transforms`, with its defaults except `size` and `min_scale` (fastbook ch. 5)."""

    size: int = 224  # output side; fastbook ch. 5 passes size=224
    min_scale: float = 0.75  # smallest crop area fraction; fastbook ch. 5 passes 0.75 (fastai default 1.0 = no crop)
    mult: float = 1.0  # fastai default; scales max_rotate, max_lighting and max_warp
    do_flip: bool = True  # fastai default
    flip_vert: bool = False  # fastai default; True -> one of the 8 dihedral ops (p=0.5) instead of horizontal flips
    max_rotate: float = 10.0  # fastai default, degrees
    min_zoom: float = 1.0  # fastai default
    max_zoom: float = 1.1  # fastai default
    max_lighting: float = 0.2  # fastai default
    max_warp: float = 0.2  # fastai default
    p_affine: float = 0.75  # fastai default; for rotate, zoom and each warp magnitude
    p_lighting: float = 0.75  # fastai default; for brightness and contrast separately
    pad_mode: str = "reflection"  # fastai default; grid_sample padding_mode
    batch: bool = False  # fastai default; True -> one draw for the whole batch

    def __post_init__(self) -> None:
        problems = _settings_problems(self)
        if problems:
            raise ValueError("invalid AugmentSettings: " + "; ".join(problems))

    @property
    def zooms(self) -> bool:
        """Return whether zoom is drawn at all (fastai adds Zoom only when min_zoom<1 or max_zoom>1)."""
        return self.min_zoom < 1 or self.max_zoom > 1


def _settings_problems(settings: AugmentSettings) -> list[str]:
    """List what is wrong with the settings, each message naming the field and the accepted range."""
    problems = []
    if not isinstance(settings.size, int) or settings.size < 1:
        problems.append(f"size must be an integer >= 1, got {settings.size!r}")
    if not 0 < settings.min_scale <= 1:
        problems.append(f"min_scale must be in (0, 1], got {settings.min_scale!r} (1 means no random crop)")
    for name in ("p_affine", "p_lighting"):
        if not 0 <= getattr(settings, name) <= 1:
            problems.append(f"{name} must be a probability in [0, 1], got {getattr(settings, name)!r}")
    for name in ("mult", "max_rotate", "max_warp", "max_lighting"):
        if getattr(settings, name) < 0:
            problems.append(f"{name} must be >= 0, got {getattr(settings, name)!r}")
    if not 0 < settings.min_zoom <= settings.max_zoom:
        problems.append(
            f"min_zoom must be > 0 and <= max_zoom, got min_zoom={settings.min_zoom!r}, max_zoom={settings.max_zoom!r}"
        )
    if settings.max_lighting * settings.mult >= 1:
        problems.append(
            f"max_lighting * mult must be < 1 (contrast uses log(1 - it)), got max_lighting="
            f"{settings.max_lighting!r}, mult={settings.mult!r}"
        )
    if settings.pad_mode not in PAD_MODES:
        problems.append(f"pad_mode must be one of {PAD_MODES}, got {settings.pad_mode!r}")
    return problems


@dataclass(frozen=True)
class AugmentDraw:
    """The random parameters of one batch, one row per image, as float64 CPU tensors."""

    flip: torch.Tensor  # B x 2 x 2: identity, diag(-1, 1) (horizontal flip) or a dihedral op
    angle: torch.Tensor  # B: rotation in degrees (R = [[cos, sin], [-sin, cos]])
    zoom: torch.Tensor  # B: zoom factor z; the source window shrinks by 1/z
    zoom_centre: torch.Tensor  # B x 2: (u_x, u_y) in [0, 1], where the zoom window sits
    warp: torch.Tensor  # B x 2: (m_x, m_y) corner perturbations of the perspective warp
    crop: torch.Tensor  # B x 4: (centre_x, centre_y, scale_x, scale_y): crop point p = centre + q * scale
    brightness: torch.Tensor  # B: b in (0, 1); 0.5 is neutral
    contrast: torch.Tensor  # B: c > 0; 1 is neutral

    def __len__(self) -> int:
        return len(self.angle)

    @property
    def flipped(self) -> torch.Tensor:
        """Return which images have x -> -x (the horizontal flip; dihedral ops 1 and 3 also have it)."""
        return self.flip[:, 0, 0] < 0

    def rows(self, chosen: slice) -> AugmentDraw:
        """The draw of some images of the batch: a data-parallel rank's share of the global batch's draw."""
        return AugmentDraw(**{f.name: getattr(self, f.name)[chosen] for f in fields(self)})

    def expand(self, batch_size: int) -> AugmentDraw:
        """Repeat a one-image draw for a whole batch (fastai's batch=True)."""
        return AugmentDraw(
            **{f.name: getattr(self, f.name).expand(batch_size, *getattr(self, f.name).shape[1:]) for f in fields(self)}
        )


def identity_draw(batch_size: int) -> AugmentDraw:
    """Return the neutral draw: no flip, rotation, zoom, warp, crop or lighting change."""
    zeros = torch.zeros(batch_size, dtype=torch.float64)
    ones = torch.ones(batch_size, dtype=torch.float64)
    return AugmentDraw(
        flip=torch.eye(2, dtype=torch.float64).expand(batch_size, 2, 2).clone(),
        angle=zeros,
        zoom=ones,
        zoom_centre=torch.full((batch_size, 2), 0.5, dtype=torch.float64),
        warp=torch.zeros(batch_size, 2, dtype=torch.float64),
        crop=torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64).expand(batch_size, 4).clone(),
        brightness=torch.full((batch_size,), 0.5, dtype=torch.float64),
        contrast=ones,
    )


def crop_window(left: torch.Tensor, top: torch.Tensor, side: torch.Tensor, *, height: int, width: int) -> torch.Tensor:
    """Express square pixel crops as (centre_x, centre_y, scale_x, scale_y): q=-1 -> left, q=1 -> left+side-1."""
    left, top, side = (torch.as_tensor(v, dtype=torch.float64) for v in (left, top, side))
    centre_x = (2 * left + side - 1) / (width - 1) - 1
    centre_y = (2 * top + side - 1) / (height - 1) - 1
    scale_x = (side - 1) / (width - 1)
    scale_y = (side - 1) / (height - 1)
    return torch.stack([centre_x, centre_y, scale_x, scale_y], dim=-1)


def _uniform(generator: torch.Generator, *shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return low + (high - low) * torch.rand(*shape, generator=generator, dtype=torch.float64)


def _chance(generator: torch.Generator, probability: float, *shape: int) -> torch.Tensor:
    return _uniform(generator, *shape) < probability


def _draw_flip(settings: AugmentSettings, count: int, generator: torch.Generator) -> torch.Tensor:
    """Draw horizontal flips, or dihedral ops when flip_vert, each with probability 0.5."""
    ops = torch.tensor(DIHEDRAL_OPS, dtype=torch.float64).view(8, 2, 2)
    if not settings.do_flip:
        return ops[torch.zeros(count, dtype=torch.long)]
    apply = _chance(generator, FLIP_PROBABILITY, count)
    if settings.flip_vert:
        choice = torch.randint(0, 8, (count,), generator=generator)
    else:
        choice = torch.ones(count, dtype=torch.long)  # DIHEDRAL_OPS[1] is the horizontal flip
    return ops[torch.where(apply, choice, 0)]


def _draw_geometry(settings: AugmentSettings, count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Draw rotation, zoom and warp, each applied with probability p_affine (each warp magnitude separately)."""
    max_rotate = settings.max_rotate * settings.mult
    angle = _uniform(generator, count, low=-max_rotate, high=max_rotate)
    angle = torch.where(_chance(generator, settings.p_affine, count), angle, 0.0)
    zoom = torch.ones(count, dtype=torch.float64)
    zoom_centre = torch.full((count, 2), 0.5, dtype=torch.float64)
    if settings.zooms:
        zoom = _uniform(generator, count, low=settings.min_zoom, high=settings.max_zoom)
        zoom = torch.where(_chance(generator, settings.p_affine, count), zoom, 1.0)
        zoom_centre = _uniform(generator, count, 2)
    max_warp = settings.max_warp * settings.mult
    warp = _uniform(generator, count, 2, low=-max_warp, high=max_warp)
    warp = torch.where(_chance(generator, settings.p_affine, count, 2), warp, 0.0)
    return {"angle": angle, "zoom": zoom, "zoom_centre": zoom_centre, "warp": warp}


def _draw_crop(
    settings: AugmentSettings, count: int, height: int, width: int, generator: torch.Generator
) -> torch.Tensor:
    """Draw square crops: area a ~ U(min_scale, 1), side = round(short side * sqrt(a)), integer left/top."""
    if settings.min_scale >= 1:
        return identity_draw(count).crop
    area = _uniform(generator, count, low=settings.min_scale, high=1.0)
    side = torch.round(min(height, width) * area.sqrt())  # fastai RandomResizedCropGPU, ratio=(1, 1)
    # randint(0, length - side) inclusive, as fastai does with Python's random
    left = torch.floor(_uniform(generator, count) * (width - side + 1)).clamp(max=width - side)
    top = torch.floor(_uniform(generator, count) * (height - side + 1)).clamp(max=height - side)
    return crop_window(left, top, side, height=height, width=width)


def _draw_lighting(settings: AugmentSettings, count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Draw brightness b ~ U(0.5(1-l), 0.5(1+l)) and contrast exp(U(log(1-l), -log(1-l))), each with p_lighting."""
    level = settings.max_lighting * settings.mult
    brightness = _uniform(generator, count, low=0.5 * (1 - level), high=0.5 * (1 + level))
    brightness = torch.where(_chance(generator, settings.p_lighting, count), brightness, 0.5)
    log_contrast = -math.log1p(-level)
    contrast = _uniform(generator, count, low=-log_contrast, high=log_contrast).exp()
    contrast = torch.where(_chance(generator, settings.p_lighting, count), contrast, 1.0)
    return {"brightness": brightness, "contrast": contrast}


def draw_augmentation(
    settings: AugmentSettings, batch_size: int, *, height: int, width: int, generator: torch.Generator
) -> AugmentDraw:
    """Draw one batch's augmentation parameters on the CPU from `generator`, in a fixed order."""
    count = 1 if settings.batch else batch_size
    draw = AugmentDraw(
        flip=_draw_flip(settings, count, generator),
        **_draw_geometry(settings, count, generator),
        crop=_draw_crop(settings, count, height, width, generator),
        **_draw_lighting(settings, count, generator),
    )
    return draw.expand(batch_size) if settings.batch else draw


def affine_matrix(draw: AugmentDraw, *, height: int, width: int) -> torch.Tensor:
    """Return M = F·R·Z (B x 3 x 3), with fastai's off-diagonal aspect correction for non-square inputs."""
    count = len(draw)
    flip = torch.eye(3, dtype=torch.float64).repeat(count, 1, 1)
    flip[:, :2, :2] = draw.flip
    theta = torch.deg2rad(draw.angle)
    cos, sin = theta.cos(), theta.sin()
    rotate = torch.eye(3, dtype=torch.float64).repeat(count, 1, 1)
    rotate[:, 0, 0], rotate[:, 0, 1], rotate[:, 1, 0], rotate[:, 1, 1] = cos, sin, -sin, cos
    scale = 1 / draw.zoom
    zoom = torch.eye(3, dtype=torch.float64).repeat(count, 1, 1)
    zoom[:, 0, 0], zoom[:, 1, 1] = scale, scale
    zoom[:, :2, 2] = (1 - scale)[:, None] * (2 * draw.zoom_centre - 1)
    matrix = flip @ rotate @ zoom
    matrix[:, 0, 1] *= height / width
    matrix[:, 1, 0] *= width / height
    return matrix


def warp_homography(warp: torch.Tensor) -> torch.Tensor:
    """Return the homographies (B x 3 x 3) mapping fastai's perturbed corners onto the canonical corners."""
    m_x, m_y = warp[:, 0:1], warp[:, 1:2]
    perturbed_x = torch.cat([-1 - m_y, -1 + m_y, 1 + m_y, 1 - m_y], dim=1)  # fastai Warp corner table, B x 4
    perturbed_y = torch.cat([-1 - m_x, 1 + m_x, -1 + m_x, 1 - m_x], dim=1)
    target = torch.tensor(CANONICAL_CORNERS, dtype=warp.dtype).expand(len(warp), 4, 2)
    u, v = target[..., 0], target[..., 1]
    x, y = perturbed_x, perturbed_y
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    # u = (h0 x + h1 y + h2) / (h6 x + h7 y + 1), v = (h3 x + h4 y + h5) / (h6 x + h7 y + 1), linear in h
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], dim=-1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], dim=-1)
    system = torch.stack([rows_u, rows_v], dim=2).reshape(len(warp), 8, 8)
    rhs = torch.stack([u, v], dim=2).reshape(len(warp), 8)
    coefficients = torch.linalg.solve(system, rhs)
    return torch.cat([coefficients, torch.ones(len(warp), 1, dtype=warp.dtype)], dim=1).view(-1, 3, 3)


def crop_matrix(crop: torch.Tensor) -> torch.Tensor:
    """Return the crop windows as affine maps (B x 3 x 3) from output points q to points p = centre + q * scale."""
    matrix = torch.eye(3, dtype=crop.dtype).repeat(len(crop), 1, 1)
    matrix[:, 0, 0], matrix[:, 1, 1] = crop[:, 2], crop[:, 3]
    matrix[:, 0, 2], matrix[:, 1, 2] = crop[:, 0], crop[:, 1]
    return matrix


def sampling_matrix(draw: AugmentDraw, *, height: int, width: int) -> torch.Tensor:
    """Return P = H·M·C (B x 3 x 3): output point q -> homogeneous source point in the input."""
    return warp_homography(draw.warp) @ affine_matrix(draw, height=height, width=width) @ crop_matrix(draw.crop)


def sampling_grid(
    draw: AugmentDraw, *, height: int, width: int, size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Return the B x size x size x 2 grid of (x, y) input coordinates for grid_sample(align_corners=True)."""
    matrix = sampling_matrix(draw, height=height, width=width).to(device=device, dtype=torch.float32)
    axis = torch.linspace(-1, 1, size, device=device)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    points = torch.stack([x, y, torch.ones_like(x)], dim=-1)
    mapped = torch.einsum("bij,hwj->bhwi", matrix, points)
    return mapped[..., :2] / mapped[..., 2:]


def area_shrink(images: torch.Tensor, size: int) -> torch.Tensor:
    """Area-resize float images so a short side above 2*size becomes 2*size (fastai's anti-aliasing trick)."""
    height, width = images.shape[-2:]
    short = min(height, width)
    if short <= 2 * size:
        return images
    target = (round(height * 2 * size / short), round(width * 2 * size / short))
    return F.interpolate(images, size=target, mode="area")


def lighting(images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """Apply per-image brightness then contrast in logit space: sigmoid((logit(x) + logit(b)) * c)."""
    shift = torch.logit(brightness.to(images.device, images.dtype)).view(-1, 1, 1, 1)
    factor = contrast.to(images.device, images.dtype).view(-1, 1, 1, 1)
    logits = torch.logit(images.clamp(LOGIT_EPS, 1 - LOGIT_EPS))
    return torch.sigmoid((logits + shift) * factor)


def _stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return mean, std


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Normalise float images in [0, 1] per channel with the ImageNet statistics."""
    mean, std = _stats(images)
    return (images - mean) / std


def denormalize(normalized: torch.Tensor) -> torch.Tensor:
    """Undo `normalize`, clamp to [0, 1] and return uint8 pixels (rounded) for display."""
    mean, std = _stats(normalized)
    return (normalized * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)


def _unit_pixels(images: torch.Tensor) -> torch.Tensor:
    """Check a B x 3 x H x W batch and return it as float32 in [0, 1] (uint8 is divided by 255)."""
    if images.ndim != 4 or images.shape[1] != 3 or min(images.shape[-2:]) < 2:
        raise ValueError(f"expected a B x 3 x H x W image batch with H, W >= 2, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    if images.is_floating_point():
        return images.float()
    raise ValueError(f"expected uint8 pixels (or floats in [0, 1]), got dtype {images.dtype}")


def _generator_or_fresh(generator: torch.Generator | None) -> torch.Generator:
    """Return the CPU generator given, or a fresh one seeded from OS entropy (the global RNG is never touched)."""
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    elif generator.device.type != "cpu":
        raise ValueError(f"pass a CPU torch.Generator (draws happen on the CPU), got one on {generator.device}")
    return generator


class BatchAugmentation:
    """fastai's `aug_transforms` + `Normalize(imagenet_stats)` as one callable on batches, on their device."""

    def __init__(self, settings: AugmentSettings = AugmentSettings()) -> None:
        self.settings = settings

    def __repr__(self) -> str:
        return f"BatchAugmentation({self.settings!r})"

    def __call__(
        self,
        images: torch.Tensor,
        *,
        train: bool,
        generator: torch.Generator | None = None,
        share: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Augment (train) or just resize (valid) a B x 3 x H x W batch to normalised float32 B x 3 x size x size.

        `share` (rank, world size): the batch is a data-parallel rank's share of a global batch of B x world images;
        the draw is the global batch's and the batch gets its rows, as one process augmenting it all would.
        """
        if not train:
            pixels = _unit_pixels(images)
            # One identity grid serves the whole batch, so the batch size stays symbolic under torch.export.
            height, width = pixels.shape[-2:]
            grid = sampling_grid(identity_draw(1), height=height, width=width, size=self.settings.size)
            return normalize(self._sample(pixels, grid.to(pixels.device).expand(pixels.shape[0], -1, -1, -1)))
        height, width = images.shape[-2:]
        if share is None:
            return self.apply(images, self.draw(len(images), height=height, width=width, generator=generator))
        rank, world_size = share
        whole = self.draw(len(images) * world_size, height=height, width=width, generator=generator)
        return self.apply(images, whole.rows(slice(rank * len(images), (rank + 1) * len(images))))

    def on_device(
        self,
        images: torch.Tensor,
        device: torch.device,
        *,
        train: bool,
        channels_last: bool,
        generator: torch.Generator | None = None,
        share: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Move a loader's uint8 batch to the device and augment (or just resize) it there, channels_last if asked."""
        batch = self(images.to(device, non_blocking=True), train=train, generator=generator, share=share)
        return batch.contiguous(memory_format=torch.channels_last) if channels_last else batch

    def draw(
        self, batch_size: int, *, height: int, width: int, generator: torch.Generator | None = None
    ) -> AugmentDraw:
        """Draw the parameters `__call__(train=True)` would use for this generator state."""
        return draw_augmentation(
            self.settings, batch_size, height=height, width=width, generator=_generator_or_fresh(generator)
        )

    def apply(self, images: torch.Tensor, draw: AugmentDraw) -> torch.Tensor:
        """Apply a given draw: one geometric resampling, then lighting, then normalisation."""
        pixels = _unit_pixels(images)
        if len(draw) != len(pixels):
            raise ValueError(f"the draw is for {len(draw)} images but the batch has {len(pixels)}; draw for this batch")
        return normalize(lighting(self._resample(pixels, draw), draw.brightness, draw.contrast))

    def decode(self, normalized: torch.Tensor) -> torch.Tensor:
        """Turn a normalised batch back into uint8 pixels for show_batch and top-loss grids."""
        return denormalize(normalized)

    def _resample(self, pixels: torch.Tensor, draw: AugmentDraw) -> torch.Tensor:
        """Sample the batch once along the draw's grid at the output size."""
        height, width = pixels.shape[-2:]
        return self._sample(
            pixels, sampling_grid(draw, height=height, width=width, size=self.settings.size, device=pixels.device)
        )

    def _sample(self, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Area-shrink the batch if needed, then sample it along a grid in one interpolation."""
        source = area_shrink(pixels, self.settings.size)
        return F.grid_sample(source, grid, mode="bilinear", padding_mode=self.settings.pad_mode, align_corners=True)


def aug_transforms(size: int = 224, min_scale: float = 0.75, **overrides) -> BatchAugmentation:
    """Build the batch augmentation fastbook ch. 5 uses: aug_transforms(size=224, min_scale=0.75) + Normalize."""
    return BatchAugmentation(AugmentSettings(size=size, min_scale=min_scale, **overrides))

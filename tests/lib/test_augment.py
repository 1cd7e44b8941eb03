import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lib.data.augment import (
    DIHEDRAL_OPS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentSettings,
    BatchAugmentation,
    aug_transforms,
    crop_window,
    denormalize,
    draw_augmentation,
    identity_draw,
    lighting,
    normalize,
    sampling_grid,
    warp_homography,
)

STILL = {"do_flip": False, "p_affine": 0.0, "p_lighting": 0.0, "min_scale": 1.0}  # no random change at all


def random_images(batch=4, side=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, generator=generator)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def unit(images):
    return images.float() / 255


def area_then_bilinear(images, *, shrunk, size):
    """fastai's measured validation path: area-resize to shrunk, then bilinear(align_corners=True) to size."""
    pixels = unit(images)
    if shrunk is not None:
        pixels = F.interpolate(pixels, size=(shrunk, shrunk), mode="area")
    return normalize(F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=True))


class GridSampleCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.grid_sample:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_train_and_valid_give_normalised_float32_batches_of_the_output_size():
    augment = aug_transforms(size=224, min_scale=0.75)
    images = random_images(batch=2, side=460)
    for train in (True, False):
        out = augment(images, train=train, generator=seeded(0))
        assert out.shape == (2, 3, 224, 224)
        assert out.dtype == torch.float32
        assert out.device == images.device
        assert out.min() < -1.5 and out.max() > 2.0  # normalised, not [0, 1] and not [0, 255]


def test_validation_is_deterministic_and_matches_fastai_area_then_bilinear_oracle():
    augment = aug_transforms(size=224, min_scale=0.75)
    images = random_images(batch=2, side=460)
    first = augment(images, train=False)
    assert torch.equal(first, augment(images, train=False))
    # fastai valid == area(460->448) -> bilinear(align_corners=True) -> 224 (measured on fastai 2.8.12)
    oracle = area_then_bilinear(images, shrunk=448, size=224)
    assert torch.allclose(first, oracle, atol=5e-4)  # float rounding of two sampling codes, ~5e-5 in pixel units
    shrunk = F.interpolate(unit(images), size=(448, 448), mode="area")
    identity = F.affine_grid(torch.eye(2, 3).expand(2, 2, 3), [2, 3, 224, 224], align_corners=True)
    exact = F.grid_sample(shrunk, identity, mode="bilinear", padding_mode="reflection", align_corners=True)
    assert torch.allclose(first, normalize(exact), atol=1e-5)


def test_validation_of_a_small_input_is_plain_bilinear_without_area_shrink():
    augment = aug_transforms(size=40, min_scale=0.75)
    images = random_images(side=64)  # 64 <= 2 * 40: no shrink
    assert torch.allclose(augment(images, train=False), area_then_bilinear(images, shrunk=None, size=40), atol=5e-4)


def test_training_with_nothing_random_and_same_size_returns_the_normalised_input():
    augment = aug_transforms(size=64, **STILL)
    images = random_images(side=64)
    out = augment(images, train=True, generator=seeded(3))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(out * std + mean, unit(images), atol=1e-5)  # grid_sample rounding, in [0, 1] units


def test_flip_mirrors_exactly_the_images_drawn_flipped():
    augment = aug_transforms(size=32, do_flip=True, p_affine=0.0, p_lighting=0.0, min_scale=1.0)
    images = random_images(batch=8, side=48)
    draw = augment.draw(8, height=48, width=48, generator=seeded(5))
    flipped = draw.flipped
    assert 0 < flipped.sum() < 8, "pick a seed that flips some images and not others"
    out = augment(images, train=True, generator=seeded(5))
    plain = augment(images, train=False)
    assert torch.allclose(out[flipped], torch.flip(plain[flipped], dims=[-1]), atol=1e-5)
    assert torch.allclose(out[~flipped], plain[~flipped], atol=1e-5)


def dihedral_images(pixels):
    """The 8 symmetries of a square image batch, as torch ops."""
    variants = []
    for turned in (pixels, pixels.transpose(-2, -1)):
        for dims in ([], [-1], [-2], [-2, -1]):
            variants.append(torch.flip(turned, dims=dims) if dims else turned)
    return variants


def test_flip_vert_draws_dihedral_ops_and_each_output_is_one_symmetry_of_the_image():
    augment = aug_transforms(size=32, flip_vert=True, p_affine=0.0, p_lighting=0.0, min_scale=1.0)
    draw = augment.draw(400, height=48, width=48, generator=seeded(1))
    ops = {tuple(int(v) for v in op.flatten()) for op in draw.flip}
    assert ops == set(DIHEDRAL_OPS)
    identity_share = (draw.flip == torch.eye(2, dtype=torch.float64)).all(dim=(1, 2)).double().mean()
    assert abs(identity_share - (0.5 + 0.5 / 8)) < 0.06  # p=0.5, and op 0 of 8 is the identity
    images = random_images(batch=12, side=48)
    out = augment(images, train=True, generator=seeded(2))
    plain = augment(images, train=False)
    candidates = torch.stack(dihedral_images(plain))  # 8 x B x 3 x 32 x 32
    matches = (candidates - out).abs().amax(dim=(2, 3, 4)) < 1e-5
    assert matches.any(dim=0).all()
    assert not matches[0].all()  # some outputs are not the identity


def test_one_training_batch_does_one_grid_sample_with_the_public_grid():
    augment = aug_transforms(size=32, min_scale=0.75)
    images = random_images(side=96)  # 96 > 2 * 32: area-shrunk to 64 first
    with GridSampleCounter() as counter:
        out = augment(images, train=True, generator=seeded(11))
    assert counter.calls == 1
    draw = draw_augmentation(augment.settings, 4, height=96, width=96, generator=seeded(11))
    grid = sampling_grid(draw, height=96, width=96, size=32)
    assert grid.shape == (4, 32, 32, 2)
    shrunk = F.interpolate(unit(images), size=(64, 64), mode="area")
    sampled = F.grid_sample(shrunk, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    assert torch.allclose(out, normalize(lighting(sampled, draw.brightness, draw.contrast)), atol=1e-6)
    assert not torch.allclose(out, augment(images, train=False), atol=1e-2)


def test_rotation_by_90_degrees_turns_the_image_clockwise_like_rot90_k_minus_1():
    # R = [[cos, sin], [-sin, cos]] maps output (x, y) to source (y, -x) at +90 degrees: the picture turns clockwise
    # on screen (rows go down), which is torch.rot90(k=-1) on (H, W).
    augment = aug_transforms(size=33, **STILL)
    images = random_images(side=33)
    draw = dataclasses.replace(identity_draw(4), angle=torch.full((4,), 90.0, dtype=torch.float64))
    out = augment.apply(images, draw)
    expected = normalize(torch.rot90(unit(images), k=-1, dims=(-2, -1)))
    assert torch.allclose(out[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], atol=1e-4)
    assert not torch.allclose(out, normalize(torch.rot90(unit(images), k=1, dims=(-2, -1))), atol=1e-2)


def test_crop_window_maps_the_output_corners_to_the_first_and_last_crop_pixels():
    window = crop_window(torch.tensor([5.0]), torch.tensor([9.0]), torch.tensor([32.0]), height=64, width=64)
    centre_x, centre_y, scale_x, scale_y = window[0].tolist()
    to_pixel = lambda p: (p + 1) / 2 * 63  # noqa: E731  (align_corners=True)
    assert to_pixel(centre_x - scale_x) == pytest.approx(5) and to_pixel(centre_x + scale_x) == pytest.approx(36)
    assert to_pixel(centre_y - scale_y) == pytest.approx(9) and to_pixel(centre_y + scale_y) == pytest.approx(40)


def test_a_crop_selects_its_pixel_window_at_the_output_size():
    augment = aug_transforms(size=32, **STILL)
    images = random_images(side=64)
    window = crop_window(torch.full((4,), 5.0), torch.full((4,), 9.0), torch.full((4,), 32.0), height=64, width=64)
    out = augment.apply(images, dataclasses.replace(identity_draw(4), crop=window))
    assert torch.allclose(out, normalize(unit(images)[..., 9:41, 5:37]), atol=1e-4)


def test_the_crop_is_taken_from_the_flipped_image_as_fastai_crops_after_the_affine():
    augment = aug_transforms(size=32, **STILL)
    images = random_images(side=64)
    left_half = crop_window(torch.zeros(4), torch.zeros(4), torch.full((4,), 32.0), height=64, width=64)
    flip = torch.tensor([[-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64).expand(4, 2, 2)
    out = augment.apply(images, dataclasses.replace(identity_draw(4), crop=left_half, flip=flip))
    # the left half of the mirrored image is the mirrored right half of the original
    assert torch.allclose(out, normalize(torch.flip(unit(images)[..., 0:32, 32:64], dims=[-1])), atol=1e-4)


@pytest.mark.parametrize(
    ("centre", "rows", "cols"), [(1.0, slice(31, 63), slice(31, 63)), (0.0, slice(0, 32), slice(0, 32))]
)
def test_zoom_2_shows_the_quarter_its_centre_fractions_point_at(centre, rows, cols):
    augment = aug_transforms(size=32, **STILL)
    images = random_images(side=63)
    draw = dataclasses.replace(
        identity_draw(4), zoom=torch.full((4,), 2.0, dtype=torch.float64), zoom_centre=torch.full((4, 2), centre)
    )
    assert torch.allclose(augment.apply(images, draw), normalize(unit(images)[..., rows, cols]), atol=1e-4)


def test_flip_is_applied_after_zoom_as_in_m_equals_f_r_z():
    augment = aug_transforms(size=32, **STILL)
    images = random_images(side=63)
    flip = torch.tensor([[-1.0, 0.0], [0.0, 1.0]], dtype=torch.float64).expand(4, 2, 2)
    draw = dataclasses.replace(
        identity_draw(4), flip=flip, zoom=torch.full((4,), 2.0, dtype=torch.float64), zoom_centre=torch.ones(4, 2)
    )
    # source x = -(x/2 + 1/2): the mirrored LEFT quarter columns; rows follow the zoom centre (bottom)
    expected = torch.flip(unit(images)[..., 31:63, 0:32], dims=[-1])
    assert torch.allclose(augment.apply(images, draw), normalize(expected), atol=1e-4)


def test_warp_homography_sends_fastai_perturbed_corners_to_the_canonical_corners():
    m_x, m_y = 0.13, -0.17
    homography = warp_homography(torch.tensor([[m_x, m_y]], dtype=torch.float64))[0]
    perturbed = torch.tensor(
        [[-1 - m_y, -1 - m_x], [-1 + m_y, 1 + m_x], [1 + m_y, -1 + m_x], [1 - m_y, 1 - m_x]], dtype=torch.float64
    )
    mapped = torch.cat([perturbed, torch.ones(4, 1, dtype=torch.float64)], dim=1) @ homography.T
    corners = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(mapped[:, :2] / mapped[:, 2:], corners, atol=1e-12)
    assert torch.allclose(warp_homography(torch.zeros(3, 2, dtype=torch.float64)), torch.eye(3, dtype=torch.float64))
    assert not torch.allclose(homography, torch.eye(3, dtype=torch.float64), atol=1e-2)


def test_sampling_grid_composes_crop_then_flip_rotate_zoom_then_warp():
    theta, warp = math.radians(7.0), torch.tensor([[0.1, -0.05]], dtype=torch.float64)
    window = crop_window(torch.tensor([3.0]), torch.tensor([5.0]), torch.tensor([50.0]), height=64, width=64)
    draw = dataclasses.replace(
        identity_draw(1),
        flip=torch.tensor([[[-1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64),
        angle=torch.tensor([7.0], dtype=torch.float64),
        zoom=torch.tensor([1.05], dtype=torch.float64),
        zoom_centre=torch.tensor([[0.2, 0.7]], dtype=torch.float64),
        warp=warp,
        crop=window,
    )
    grid = sampling_grid(draw, height=64, width=64, size=9)
    homography = warp_homography(warp)[0]
    for row, col in [(0, 0), (0, 8), (8, 0), (8, 8), (4, 4), (2, 6)]:
        q = torch.tensor([-1 + col / 4, -1 + row / 4], dtype=torch.float64)
        p = window[0, :2] + q * window[0, 2:]  # crop
        s = 1 / 1.05
        z = s * p + (1 - s) * (2 * torch.tensor([0.2, 0.7], dtype=torch.float64) - 1)  # zoom
        r = torch.stack(
            [math.cos(theta) * z[0] + math.sin(theta) * z[1], -math.sin(theta) * z[0] + math.cos(theta) * z[1]]
        )
        m = torch.stack([-r[0], r[1]])  # flip
        h = homography @ torch.cat([m, torch.ones(1, dtype=torch.float64)])
        assert torch.allclose(grid[0, row, col].double(), h[:2] / h[2], atol=1e-5), (row, col)


def test_neutral_lighting_is_the_identity_and_brightness_moves_the_mean_its_way():
    pixels = unit(random_images())
    ones, halves = torch.ones(4), torch.full((4,), 0.5)
    assert torch.allclose(lighting(pixels, halves, ones), pixels, atol=1e-6)
    assert lighting(pixels, torch.full((4,), 0.6), ones).mean() > pixels.mean() + 0.05
    assert lighting(pixels, torch.full((4,), 0.4), ones).mean() < pixels.mean() - 0.05
    stronger = lighting(pixels, halves, torch.full((4,), 1.25))
    assert stronger.std() > pixels.std()  # contrast > 1 pushes values away from 0.5
    x, b, c = 0.3, 0.45, 0.9  # closed form: sigmoid((logit(x) + logit(b)) * c)
    expected = 1 / (1 + math.exp(-(math.log(x / (1 - x)) + math.log(b / (1 - b))) * c))
    got = lighting(torch.full((1, 3, 2, 2), x), torch.tensor([b]), torch.tensor([c]))
    assert torch.allclose(got, torch.full_like(got, expected), atol=1e-6)


def test_draws_respect_fastai_ranges_and_probabilities():
    settings = AugmentSettings()
    draw = draw_augmentation(settings, 4000, height=460, width=460, generator=seeded(0))
    assert draw.angle.abs().max() <= 10 and abs((draw.angle != 0).double().mean() - 0.75) < 0.03
    assert draw.zoom.min() >= 1 and draw.zoom.max() <= 1.1 and abs((draw.zoom != 1).double().mean() - 0.75) < 0.03
    assert draw.warp.abs().max() <= 0.2 and abs((draw.warp != 0).double().mean() - 0.75) < 0.03
    assert abs(draw.flipped.double().mean() - 0.5) < 0.03
    assert draw.brightness.min() >= 0.4 and draw.brightness.max() <= 0.6
    assert draw.contrast.min() >= 0.8 - 1e-12 and draw.contrast.max() <= 1.25 + 1e-12
    assert abs((draw.brightness != 0.5).double().mean() - 0.75) < 0.03
    side = draw.crop[:, 2] * 459 + 1  # scale = (side - 1) / (H - 1)
    assert torch.allclose(side, side.round()) and side.min() >= 398 and side.max() <= 460
    left = (draw.crop[:, 0] - draw.crop[:, 2] + 1) / 2 * 459
    assert torch.allclose(left, left.round(), atol=1e-9) and left.min() >= 0 and (left + side).max() <= 460


def test_mult_zero_turns_off_rotation_warp_and_lighting_and_batch_shares_one_draw():
    calm = draw_augmentation(AugmentSettings(mult=0.0), 64, height=64, width=64, generator=seeded(0))
    assert (calm.angle == 0).all() and (calm.warp == 0).all()
    assert (calm.brightness == 0.5).all() and (calm.contrast == 1).all()
    shared = draw_augmentation(AugmentSettings(batch=True), 8, height=64, width=64, generator=seeded(0))
    for field in dataclasses.fields(shared):
        values = getattr(shared, field.name)
        assert len(values) == 8 and (values == values[:1]).all(), field.name


def test_a_seed_fixes_the_augmentation_and_the_global_rng_is_untouched():
    augment = aug_transforms(size=32)
    images = random_images(side=64)
    state = torch.random.get_rng_state()
    first = augment(images, train=True, generator=seeded(7))
    assert torch.equal(first, augment(images, train=True, generator=seeded(7)))
    assert not torch.allclose(first, augment(images, train=True, generator=seeded(8)), atol=1e-3)
    unseeded = augment(images, train=True), augment(images, train=True)
    assert not torch.allclose(*unseeded, atol=1e-3)  # a fresh entropy-seeded generator each call
    assert torch.equal(torch.random.get_rng_state(), state)


def test_decode_inverts_normalize_to_uint8():
    images = random_images()
    assert (denormalize(normalize(unit(images))).int() - images.int()).abs().max() <= 1
    decoded = aug_transforms(size=64).decode(normalize(unit(images)))
    assert decoded.dtype == torch.uint8 and torch.equal(decoded, images)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(normalize(unit(images)), (unit(images) - mean) / std)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("size", 0),
        ("min_scale", 0.0),
        ("min_scale", 1.5),
        ("p_affine", 1.2),
        ("p_lighting", -0.1),
        ("min_zoom", 1.2),
        ("pad_mode", "mirror"),
        ("mult", -1.0),
        ("max_lighting", 1.0),
    ],
)
def test_invalid_settings_name_the_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        AugmentSettings(**{field: value})


def test_bad_batches_and_generators_are_refused_with_the_reason():
    augment = aug_transforms(size=32)
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        augment(torch.zeros(3, 64, 64, dtype=torch.uint8), train=True)
    with pytest.raises(ValueError, match="dtype"):
        augment(torch.zeros(1, 3, 64, 64, dtype=torch.int32), train=False)
    with pytest.raises(ValueError, match="draw for this batch"):
        augment.apply(random_images(), identity_draw(3))


def test_a_settings_object_builds_the_same_augmentation_as_the_factory():
    assert BatchAugmentation(AugmentSettings(size=96)).settings == aug_transforms(size=96).settings
    assert BatchAugmentation().settings == AugmentSettings(size=224, min_scale=0.75)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_seed_gives_the_same_augmentation_on_cpu_and_cuda():
    augment = aug_transforms(size=224)
    images = random_images(batch=4, side=460)
    on_cpu = augment(images, train=True, generator=seeded(4))
    on_cuda = augment(images.cuda(), train=True, generator=seeded(4))
    assert on_cuda.device.type == "cuda"
    assert torch.allclose(on_cuda.cpu(), on_cpu, atol=2e-3)
    assert torch.allclose(augment(images.cuda(), train=False).cpu(), augment(images, train=False), atol=1e-4)

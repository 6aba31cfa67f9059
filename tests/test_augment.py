"""Tests for genadapt.data.augment (DiffAugment and the ADA subset). Small tensors, CPU, fast."""

from __future__ import annotations

import math

import pytest
import torch

from genadapt.data.augment import (
    ADA_SPEED_KIMG,
    ADA_TARGET,
    DIFFAUGMENT_DEFAULT_POLICY,
    AdaptiveAugment,
    AugmentSpecError,
    DiffAugment,
    NoAugment,
    diff_augment,
    make_augment,
    parse_policy,
)
from genadapt.errors import UserError


def _images(n: int = 4, c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, c, h, w), generator=g) * 2 - 1


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# DiffAugment


@pytest.mark.parametrize("policy", ["color", "translation", "cutout", DIFFAUGMENT_DEFAULT_POLICY])
@pytest.mark.parametrize("shape", [(4, 3, 16, 16), (3, 1, 12, 20)])
def test_diff_augment_keeps_shape_dtype_and_is_finite(policy, shape):
    x = _images(*shape)
    y = diff_augment(x, policy, generator=_gen(1))
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert torch.isfinite(y).all()
    y64 = diff_augment(x.double(), policy, generator=_gen(1))
    assert y64.dtype == torch.float64


@pytest.mark.parametrize("policy", ["color", "translation", "cutout", DIFFAUGMENT_DEFAULT_POLICY])
def test_diff_augment_gradient_flows(policy):
    x = _images().requires_grad_(True)
    y = diff_augment(x, policy, generator=_gen(2))
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("policy", ["", "none", "  None "])
def test_diff_augment_empty_policy_is_identity(policy):
    x = _images()
    assert torch.equal(diff_augment(x, policy), x)
    assert torch.equal(DiffAugment(policy)(x), x)


def test_diff_augment_seeded_is_deterministic_and_seeds_differ():
    x = _images(n=8)
    a = diff_augment(x, generator=_gen(123))
    b = diff_augment(x, generator=_gen(123))
    c = diff_augment(x, generator=_gen(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)


def test_diff_augment_color_parameter_ranges():
    # Constant grey images: saturation and contrast act on zero deviation, so only brightness remains,
    # and it is an offset in [-0.5, 0.5] per image.
    x = torch.full((64, 3, 4, 4), 0.25)
    y = diff_augment(x, "color", generator=_gen(3))
    offsets = (y - x)[:, 0, 0, 0]
    assert torch.allclose(y - x, offsets.view(-1, 1, 1, 1).expand_as(y), atol=1e-6)
    assert offsets.min() >= -0.5 - 1e-6 and offsets.max() <= 0.5 + 1e-6
    assert offsets.std() > 0.1  # not a constant


def test_diff_augment_translation_at_most_one_eighth():
    h = w = 32
    max_shift = h // 8
    x = torch.full((64, 1, h, w), -1.0)
    x[:, :, h // 2, w // 2] = 1.0  # one bright pixel in the middle
    y = diff_augment(x, "translation", generator=_gen(4))
    shifts = set()
    for img in y[:, 0]:
        ys, xs = torch.nonzero(img == 1.0, as_tuple=True)
        assert len(ys) == 1  # moved, not duplicated or lost
        dy, dx = int(ys[0]) - h // 2, int(xs[0]) - w // 2
        assert abs(dy) <= max_shift and abs(dx) <= max_shift
        shifts.add((dy, dx))
        # vacated pixels are 0 (zero padding), everything else is the original background
        assert set(torch.unique(img).tolist()) <= {-1.0, 0.0, 1.0}
    assert len(shifts) > 5  # really random
    assert any(abs(dy) == max_shift or abs(dx) == max_shift for dy, dx in shifts)


def test_diff_augment_translation_zero_fills_vacated_border():
    x = torch.ones((32, 1, 16, 16))
    y = diff_augment(x, "translation", generator=_gen(5))
    zero_rows = (y[:, 0] == 0).all(dim=2).sum(dim=1)  # fully vacated rows per image
    zero_cols = (y[:, 0] == 0).all(dim=1).sum(dim=1)
    assert zero_rows.max() <= 2 and zero_cols.max() <= 2
    assert (zero_rows + zero_cols).max() > 0


@pytest.mark.parametrize("size", [16, 10])  # even and odd cutout sides (8 and 5)
def test_diff_augment_cutout_zeroes_one_square_of_half_size(size):
    side = size // 2
    x = torch.ones((64, 3, size, size))
    y = diff_augment(x, "cutout", generator=_gen(6))
    assert set(torch.unique(y).tolist()) <= {0.0, 1.0}
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 0], y[:, 2])  # same square in all channels
    full = 0
    for img in y[:, 0]:
        ys, xs = torch.nonzero(img == 0, as_tuple=True)
        assert len(ys) > 0
        hh = int(ys.max() - ys.min()) + 1
        ww = int(xs.max() - xs.min()) + 1
        assert hh * ww == len(ys)  # the zeroed set is one axis-aligned rectangle
        # a half-size square, clipped to the image: at least half of each side stays inside
        assert math.ceil(side / 2) <= hh <= side and math.ceil(side / 2) <= ww <= side
        full += hh == side and ww == side
    assert full > 0  # unclipped squares have exactly the documented size


def test_diff_augment_non_square_sizes():
    x = torch.ones((16, 1, 8, 24))
    y = diff_augment(x, "cutout", generator=_gen(7))
    for img in y[:, 0]:
        ys, xs = torch.nonzero(img == 0, as_tuple=True)
        assert int(ys.max() - ys.min()) + 1 <= 4 and int(xs.max() - xs.min()) + 1 <= 12


def test_bad_policy_raises_clear_value_error():
    with pytest.raises(ValueError, match=r"unknown DiffAugment policy 'flip'.*color, translation, cutout"):
        diff_augment(_images(), "color,flip")
    with pytest.raises(ValueError, match="color, translation, cutout"):
        DiffAugment("colour")
    with pytest.raises(UserError):  # the CLI reports it as a user error, not a traceback
        parse_policy("translation,,cutout")
    assert parse_policy(" Color , CUTOUT ") == ("color", "cutout")


def test_diff_augment_rejects_bad_input():
    with pytest.raises(ValueError, match="4-D"):
        diff_augment(torch.zeros(3, 8, 8))
    with pytest.raises(TypeError, match="floating"):
        diff_augment(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


# --------------------------------------------------------------------------------------------------
# ADA


def _feed(ada: AdaptiveAugment, sign: float, steps: int, batch: int = 8) -> list[float]:
    ps = []
    for _ in range(steps):
        ps.append(ada.update(torch.full((batch, 1), sign)))
    return ps


def test_ada_defaults():
    ada = AdaptiveAugment()
    assert ada.target == ADA_TARGET == 0.6
    assert ada.interval == 4
    assert ada.speed_kimg == ADA_SPEED_KIMG
    assert ada.p == 0.0 and ada.rt is None


def test_ada_exact_update_step():
    ada = AdaptiveAugment(speed_kimg=1.0)  # step = batch * interval / 1000
    ps = _feed(ada, +3.0, steps=4, batch=8)
    assert ps[:3] == [0.0, 0.0, 0.0]  # only adjusts every `interval` calls
    assert ps[3] == pytest.approx(8 * 4 / 1000)
    assert ada.rt == 1.0
    # Fixed batch_size overrides the counted number of images (e.g. global batch under DDP).
    ada = AdaptiveAugment(speed_kimg=1.0, batch_size=32)
    _feed(ada, +1.0, steps=4, batch=8)
    assert ada.p == pytest.approx(32 * 4 / 1000)


def test_ada_p_increases_when_real_logits_positive():
    ada = AdaptiveAugment(speed_kimg=1.0)
    ps = _feed(ada, +2.5, steps=40)
    assert ps[-1] > 0.0
    assert all(b >= a for a, b in zip(ps, ps[1:]))  # monotone non-decreasing
    assert ada.rt == pytest.approx(1.0)


def test_ada_p_uses_sign_against_target():
    # r_t = 0.5 < 0.6: p decreases even though most logits are positive.
    ada = AdaptiveAugment(speed_kimg=1.0, p=0.5)
    for _ in range(4):
        ada.update(torch.tensor([1.0, 1.0, 1.0, -1.0]))  # mean sign 0.5
    assert ada.rt == pytest.approx(0.5)
    assert ada.p < 0.5
    # r_t = 0.75 > 0.6: p increases (6 positive, 2 negative logits of any magnitude).
    ada = AdaptiveAugment(speed_kimg=1.0, p=0.5)
    for _ in range(4):
        ada.update(torch.tensor([[3.0], [0.2], [1.0], [7.0], [2.0], [-4.0], [1.0], [-0.1]]))
    assert ada.rt == pytest.approx(0.5)
    assert ada.p < 0.5
    ada = AdaptiveAugment(speed_kimg=1.0, p=0.5)
    for _ in range(4):
        ada.update(torch.tensor([3.0, 0.2, 1.0, 7.0, 2.0, 4.0, 1.0, -0.1]))
    assert ada.rt == pytest.approx(0.75)
    assert ada.p > 0.5
    # The target is configurable: r_t = 0.5 > 0.4 increases p.
    ada = AdaptiveAugment(target=0.4, speed_kimg=1.0, p=0.5)
    for _ in range(4):
        ada.update(torch.tensor([3.0, 0.2, 1.0, 7.0, 2.0, -4.0, 1.0, -0.1]))
    assert ada.p > 0.5


def test_ada_p_decreases_to_zero_and_stays_clamped():
    ada = AdaptiveAugment(speed_kimg=0.5, p=0.3)
    ps = _feed(ada, -1.0, steps=200)
    assert ps[-1] == 0.0
    assert min(ps) == 0.0
    first_zero = ps.index(0.0)
    assert all(p == 0.0 for p in ps[first_zero:])  # stays at 0, never negative
    assert ada.p == 0.0


def test_ada_p_never_leaves_unit_interval():
    ada = AdaptiveAugment(speed_kimg=0.01)  # huge steps: 32 images / 10 = 3.2 per adjustment
    g = _gen(8)
    for _ in range(200):
        sign = 1.0 if torch.rand((), generator=g) < 0.7 else -1.0
        p = ada.update(torch.full((8,), sign))
        assert 0.0 <= p <= 1.0
    ps = _feed(AdaptiveAugment(speed_kimg=0.01), +1.0, steps=40)
    assert max(ps) == 1.0 and all(0.0 <= p <= 1.0 for p in ps)


def test_ada_patch_logits_and_zero_logits():
    ada = AdaptiveAugment(speed_kimg=1.0, p=0.5)
    for _ in range(4):
        ada.update(torch.zeros(2, 1, 4, 4))  # sign 0 -> r_t = 0 < 0.6 -> decrease
    assert ada.rt == 0.0 and ada.p == pytest.approx(0.5 - 2 * 4 / 1000)


def test_ada_state_dict_round_trip():
    ada = AdaptiveAugment(target=0.55, speed_kimg=2.0)
    _feed(ada, +1.0, steps=10)  # 2 adjustments + 2 steps into the third interval
    state = ada.state_dict()
    assert state["p"] > 0 and state["steps"] == 2
    restored = AdaptiveAugment(target=0.55, speed_kimg=2.0)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    # Both continue identically (the partial interval resumes where it was).
    assert _feed(ada, +1.0, steps=6) == _feed(restored, +1.0, steps=6)
    # Survives torch.save / torch.load (plain Python values only).
    import io

    buf = io.BytesIO()
    torch.save(ada.state_dict(), buf)
    buf.seek(0)
    again = AdaptiveAugment(target=0.55, speed_kimg=2.0)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert again.p == ada.p and again.rt == ada.rt
    with pytest.raises(ValueError):
        AdaptiveAugment().load_state_dict({"spec": "none"})


def test_ada_apply_p_zero_is_identity():
    x = _images()
    ada = AdaptiveAugment()
    assert ada.p == 0.0
    assert torch.equal(ada.apply(x, generator=_gen(0)), x)
    assert torch.equal(ada(x), x)


def test_ada_apply_shape_grad_determinism():
    ada = AdaptiveAugment(p=0.8)
    for shape in [(8, 3, 16, 16), (4, 1, 8, 12)]:
        x = _images(*shape).requires_grad_(True)
        y = ada.apply(x, generator=_gen(9))
        assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
        (y * torch.randn_like(y)).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
    x = _images(n=8)
    assert torch.equal(ada.apply(x, generator=_gen(10)), ada.apply(x, generator=_gen(10)))
    assert not torch.equal(ada.apply(x, generator=_gen(10)), ada.apply(x, generator=_gen(11)))


def test_ada_apply_probability_is_per_image():
    # Fraction of untouched images ~ (1 - p)^6 ops (flip counts half): check against p = 1 and small p.
    x = _images(n=256, h=8, w=8)
    y = AdaptiveAugment().apply(x, generator=_gen(12), p=1.0)
    unchanged = (y == x).flatten(1).all(dim=1).float().mean()
    assert unchanged == 0.0
    y = AdaptiveAugment().apply(x, generator=_gen(12), p=0.05)
    unchanged = (y == x).flatten(1).all(dim=1).float().mean()
    assert 0.6 < unchanged < 0.95


def test_ada_apply_reflect_padding_and_grey_axis():
    # Geometric ops use reflect padding (no zero borders) and the colour ops are per-image affine maps
    # that keep grey grey, so a constant grey image stays a constant grey image (of a new value).
    x = torch.full((64, 3, 16, 16), 0.5)
    y = AdaptiveAugment().apply(x, generator=_gen(13), p=1.0)
    flat = y.flatten(1)
    assert torch.allclose(flat, flat[:, :1].expand_as(flat), atol=1e-6)
    assert flat[:, 0].std() > 0.05


# --------------------------------------------------------------------------------------------------
# make_augment


def test_make_augment_specs():
    assert isinstance(make_augment("none"), NoAugment)
    assert isinstance(make_augment(""), NoAugment)
    assert isinstance(make_augment(None), NoAugment)
    da = make_augment("diffaugment")
    assert isinstance(da, DiffAugment) and da.policy == "color,translation,cutout"
    da = make_augment(" DiffAugment:color,translation ")
    assert isinstance(da, DiffAugment) and da.policy_names == ("color", "translation")
    ada = make_augment("ada")
    assert isinstance(ada, AdaptiveAugment) and ada.target == 0.6
    ada = make_augment("ada:0.7", speed_kimg=10, interval=2)
    assert ada.target == 0.7 and ada.speed_kimg == 10 and ada.interval == 2
    assert make_augment("diffaugment", speed_kimg=10).policy == DIFFAUGMENT_DEFAULT_POLICY  # ADA-only kwargs


def test_make_augment_uniform_interface():
    x = _images()
    for spec in ["none", "diffaugment", "ada"]:
        aug = make_augment(spec)
        y = aug(x, generator=_gen(0))
        assert y.shape == x.shape
        aug.update(torch.ones(4, 1))
        aug.load_state_dict(aug.state_dict())
    assert torch.equal(make_augment("none")(x), x)


@pytest.mark.parametrize(
    "spec, pattern",
    [
        ("diffaug", "unknown augmentation 'diffaug'"),
        ("ada:high", "not a number"),
        ("ada:1.5", r"\(-1, 1\)"),
        ("diffaugment:", "empty policy"),
        ("diffaugment:color,zoom", "unknown DiffAugment policy 'zoom'"),
        ("none:1", "unknown augmentation"),
    ],
)
def test_make_augment_bad_spec(spec, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        make_augment(spec)
    assert isinstance(info.value, (AugmentSpecError, UserError))

"""The `style` feature space (genadapt.eval.style): sees style shifts, tracks a mixture, deterministic, 32 and 64 px.

Tiny settings: 128 source/reference icons (two disjoint halves of 64), 3 random splits. The full validation
is `benchmarks/style_shift.py` (docs/style-aware-evaluation.md).
"""

import re

import numpy as np
import pytest
import torch

from genadapt.data import load_dataset
from genadapt.data.openmoji import render
from genadapt.eval import features as Fe
from genadapt.eval import style as S
from genadapt.eval.metrics import kid

N = 256  # 32 px icons (two halves of 128)
N64 = 128  # 64 px icons, rendered for the test (two halves of 64)
SPLITS = 3  # half-splits averaged for the shifted KIDs and the mixtures
NULL_SPLITS = 20  # half-splits for the noise level
# Far = mean KID(shift(B), A) over the splits >= RATIO x RMS KID(B, A) (two halves of the unshifted set).
# In the benchmark (156 icons per half, 32 px) the smallest ratio of the five shifts in the style space on
# source/reference is line-weight's, 26.6; the noise of the unbiased KID falls as 1/n while the shift's
# MMD² does not, so at 128 per half ~26.6 x 128/156 = 22 is expected (measured here: 26). 10 leaves a
# factor > 2 of margin, yet a style-blind space fails it: pocket gives 2.0 (line-weight) and 6.7
# (texture) in this very test. The 64 px check has half the icons, hence half the threshold (style's
# smallest there: 15, texture; pocket: 0.8 line-weight, 0.1 texture).
RATIO = 10.0
RATIO_64 = RATIO * N64 / N


@pytest.fixture(scope="module")
def extractor():
    return Fe.get_extractor("style")


@pytest.fixture(scope="module")
def icons():
    return load_dataset("builtin:openmoji/source/reference", resolution=32)


def feats(extractor, pixels) -> torch.Tensor:
    return Fe.extract(extractor, pixels, progress=False).double()


def splits(n: int = N, count: int = SPLITS):
    rng = np.random.default_rng(0)
    return [rng.permutation(n) for _ in range(count)]


def ratio(base: torch.Tensor, moved: torch.Tensor) -> float:
    """mean KID(shift(B), A) / RMS KID(B, A) over random disjoint halves A, B (the benchmark's ratio)."""
    n, half = len(base), len(base) // 2
    null = np.sqrt(np.mean([kid(base[p[half:]], base[p[:half]]) ** 2 for p in splits(n, NULL_SPLITS)]))
    return float(np.mean([kid(moved[p[half:]], base[p[:half]]) for p in splits(n)]) / null)


@pytest.fixture(scope="module")
def base(extractor, icons):
    return feats(extractor, icons.pixels[:N])


@pytest.fixture(scope="module")
def shifted(extractor, icons):
    return {name: feats(extractor, shift(icons.pixels[:N])) for name, shift in S.STYLE_SHIFTS.items()}


def test_style_is_a_spec_with_its_own_id_and_cache_key(extractor):
    pocket = Fe.get_extractor("pocket")
    assert isinstance(extractor, S.StyleExtractor) and not extractor.training
    assert re.fullmatch(r"genadapt-style-v1@[0-9a-f]{12}", extractor.extractor_id)
    assert Fe.get_extractor("style").extractor_id == extractor.extractor_id  # the same id on every load
    assert Fe.extractor_cache_key(extractor) != Fe.extractor_cache_key(pocket)
    assert sum(extractor.statistics.block_dims) == 532 and extractor.statistics.block_dims[0] == pocket.feature_dim
    other = S.load_style_extractor((0.25, 0.25, 0.25, 0.25))
    assert other.extractor_id != extractor.extractor_id  # the weights are part of the id
    with pytest.raises(ValueError):
        S.load_style_extractor((0.5, 0.5, 0.5, 0.5))


def test_the_content_block_is_the_pocket_encoder(extractor, icons):
    pocket = Fe.get_extractor("pocket")
    raw = Fe.extract(extractor.statistics, icons.pixels[:16], progress=False)
    assert torch.equal(raw[:, : pocket.feature_dim], Fe.extract(pocket, icons.pixels[:16], progress=False))


def test_blocks_hold_their_weights_on_the_calibration_domain(extractor, base):
    # On source icons (the calibration domain) block b holds about w_b of the squared norm, E|f|^2/D ~ 1.
    total = (base**2).sum(1).mean()
    assert 0.5 < float(total) / base.shape[1] < 2.0
    for (name, part), weight in zip(extractor.block_slices.items(), extractor.weights):
        share = float((base[:, part] ** 2).sum(1).mean() / total)
        assert weight / 2 < share < weight * 2, (name, share, weight)


@pytest.mark.parametrize("shift", list(S.STYLE_SHIFTS))
def test_each_style_shift_is_far_from_the_original(base, shifted, shift):
    assert ratio(base, shifted[shift]) > RATIO


@pytest.mark.parametrize("shift", list(S.STYLE_SHIFTS))
def test_a_mixture_is_closer_to_the_shift_the_more_of_it_is_shifted(base, shifted, shift):
    # A model adapted towards a shift must score closer to the shift's held-out images than the base:
    # a fraction f of B shifted (f = 0: the base) against shift(A); in expectation KID falls as (1 - f)^2.
    moved, half = shifted[shift], N // 2
    curve = []
    for fraction in (0.0, 0.5, 1.0):
        k = round(fraction * half)
        curve.append(np.mean([kid(torch.cat([moved[p[half:][:k]], base[p[half:][k:]]]), moved[p[:half]]) for p in splits()]))
    assert curve[0] > curve[1] > curve[2], curve
    assert curve[1] < 0.5 * curve[0]  # (1 - 0.5)^2 = 0.25 in expectation


def test_features_are_deterministic_and_batch_independent(extractor, icons, base):
    again = feats(extractor, icons.pixels[:N])
    assert torch.equal(again, base)
    fresh = feats(Fe.get_extractor("style"), icons.pixels[:N])
    assert torch.equal(fresh, base)
    small_batches = Fe.extract(extractor, icons.pixels[:N], batch_size=7, progress=False).double()
    assert torch.allclose(small_batches, base, atol=1e-4, rtol=1e-4)
    shift = S.STYLE_SHIFTS["texture"]
    assert np.array_equal(shift(icons.pixels[:8]), shift(icons.pixels[:8]))


def test_it_works_at_32_and_64_px(extractor, icons, base):
    codes = [record.id for record in icons.records[:N64]]
    large = render(codes, 64)  # the renderer's own 64 px glyphs, not an upsampled copy
    f64 = feats(extractor, large)
    assert f64.shape == (N64, base.shape[1]) and bool(torch.isfinite(f64).all())
    assert torch.equal(f64, feats(extractor, large))
    # Style shifts scaled to 64 px are as visible; not the half-size re-rendering, which at 64 px is the
    # 32 px icon again (the space analyses at 32 px; the benchmark has its 64 px ratios).
    for name, shift in S.STYLE_SHIFTS.items():
        if name != "rerender":
            assert ratio(f64, feats(extractor, shift(large))) > RATIO_64, name


def test_cached_features_use_the_style_key(extractor, icons, base, tmp_path):
    first = Fe.cached_features(extractor, icons.pixels[:N], tmp_path, progress=False)
    assert torch.equal(first.double(), base)
    assert torch.equal(Fe.cached_features(extractor, icons.pixels[:N], tmp_path, progress=False), first)
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert folder.name.startswith("genadapt-style-v1@")

"""Tests for the pure-PyTorch StyleGAN2 nets (rosinality state-dict layout)."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from genadapt.families.stylegan2_nets import (
    Blur,
    Discriminator,
    Downsample,
    Generator,
    ModulatedConv2d,
    Upsample,
    default_channels,
    fused_leaky_relu,
    make_kernel,
    upfirdn2d,
)

# Expected (key, shape) lists for rosinality's stylegan2-pytorch model.py (commit bef283a),
# Generator(256, 512, 8, channel_multiplier=2) and Discriminator(256, channel_multiplier=2),
# in its state_dict order. Dumped from *their* model.py (instantiated on CPU with the CUDA ops
# stubbed by their own native fallbacks) and checked by hand against the code: ConvLayer =
# Sequential[Blur?, EqualConv2d, FusedLeakyReLU?]; PixelNorm is style.0 so mapping layers start
# at style.1; noise_i is [1,1,2**((i+5)//2)]^2; upsampling convs and to_rgbs carry a 4x4
# blur/upsample kernel buffer. Do not regenerate this from our own classes.
EXPECTED_G_256 = [
    ("style.1.weight", (512, 512)),
    ("style.1.bias", (512,)),
    ("style.2.weight", (512, 512)),
    ("style.2.bias", (512,)),
    ("style.3.weight", (512, 512)),
    ("style.3.bias", (512,)),
    ("style.4.weight", (512, 512)),
    ("style.4.bias", (512,)),
    ("style.5.weight", (512, 512)),
    ("style.5.bias", (512,)),
    ("style.6.weight", (512, 512)),
    ("style.6.bias", (512,)),
    ("style.7.weight", (512, 512)),
    ("style.7.bias", (512,)),
    ("style.8.weight", (512, 512)),
    ("style.8.bias", (512,)),
    ("input.input", (1, 512, 4, 4)),
    ("conv1.conv.weight", (1, 512, 512, 3, 3)),
    ("conv1.conv.modulation.weight", (512, 512)),
    ("conv1.conv.modulation.bias", (512,)),
    ("conv1.noise.weight", (1,)),
    ("conv1.activate.bias", (512,)),
    ("to_rgb1.bias", (1, 3, 1, 1)),
    ("to_rgb1.conv.weight", (1, 3, 512, 1, 1)),
    ("to_rgb1.conv.modulation.weight", (512, 512)),
    ("to_rgb1.conv.modulation.bias", (512,)),
    ("convs.0.conv.weight", (1, 512, 512, 3, 3)),
    ("convs.0.conv.blur.kernel", (4, 4)),
    ("convs.0.conv.modulation.weight", (512, 512)),
    ("convs.0.conv.modulation.bias", (512,)),
    ("convs.0.noise.weight", (1,)),
    ("convs.0.activate.bias", (512,)),
    ("convs.1.conv.weight", (1, 512, 512, 3, 3)),
    ("convs.1.conv.modulation.weight", (512, 512)),
    ("convs.1.conv.modulation.bias", (512,)),
    ("convs.1.noise.weight", (1,)),
    ("convs.1.activate.bias", (512,)),
    ("convs.2.conv.weight", (1, 512, 512, 3, 3)),
    ("convs.2.conv.blur.kernel", (4, 4)),
    ("convs.2.conv.modulation.weight", (512, 512)),
    ("convs.2.conv.modulation.bias", (512,)),
    ("convs.2.noise.weight", (1,)),
    ("convs.2.activate.bias", (512,)),
    ("convs.3.conv.weight", (1, 512, 512, 3, 3)),
    ("convs.3.conv.modulation.weight", (512, 512)),
    ("convs.3.conv.modulation.bias", (512,)),
    ("convs.3.noise.weight", (1,)),
    ("convs.3.activate.bias", (512,)),
    ("convs.4.conv.weight", (1, 512, 512, 3, 3)),
    ("convs.4.conv.blur.kernel", (4, 4)),
    ("convs.4.conv.modulation.weight", (512, 512)),
    ("convs.4.conv.modulation.bias", (512,)),
    ("convs.4.noise.weight", (1,)),
    ("convs.4.activate.bias", (512,)),
    ("convs.5.conv.weight", (1, 512, 512, 3, 3)),
    ("convs.5.conv.modulation.weight", (512, 512)),
    ("convs.5.conv.modulation.bias", (512,)),
    ("convs.5.noise.weight", (1,)),
    ("convs.5.activate.bias", (512,)),
    ("convs.6.conv.weight", (1, 512, 512, 3, 3)),
    ("convs.6.conv.blur.kernel", (4, 4)),
    ("convs.6.conv.modulation.weight", (512, 512)),
    ("convs.6.conv.modulation.bias", (512,)),
    ("convs.6.noise.weight", (1,)),
    ("convs.6.activate.bias", (512,)),
    ("convs.7.conv.weight", (1, 512, 512, 3, 3)),
    ("convs.7.conv.modulation.weight", (512, 512)),
    ("convs.7.conv.modulation.bias", (512,)),
    ("convs.7.noise.weight", (1,)),
    ("convs.7.activate.bias", (512,)),
    ("convs.8.conv.weight", (1, 256, 512, 3, 3)),
    ("convs.8.conv.blur.kernel", (4, 4)),
    ("convs.8.conv.modulation.weight", (512, 512)),
    ("convs.8.conv.modulation.bias", (512,)),
    ("convs.8.noise.weight", (1,)),
    ("convs.8.activate.bias", (256,)),
    ("convs.9.conv.weight", (1, 256, 256, 3, 3)),
    ("convs.9.conv.modulation.weight", (256, 512)),
    ("convs.9.conv.modulation.bias", (256,)),
    ("convs.9.noise.weight", (1,)),
    ("convs.9.activate.bias", (256,)),
    ("convs.10.conv.weight", (1, 128, 256, 3, 3)),
    ("convs.10.conv.blur.kernel", (4, 4)),
    ("convs.10.conv.modulation.weight", (256, 512)),
    ("convs.10.conv.modulation.bias", (256,)),
    ("convs.10.noise.weight", (1,)),
    ("convs.10.activate.bias", (128,)),
    ("convs.11.conv.weight", (1, 128, 128, 3, 3)),
    ("convs.11.conv.modulation.weight", (128, 512)),
    ("convs.11.conv.modulation.bias", (128,)),
    ("convs.11.noise.weight", (1,)),
    ("convs.11.activate.bias", (128,)),
    ("to_rgbs.0.bias", (1, 3, 1, 1)),
    ("to_rgbs.0.upsample.kernel", (4, 4)),
    ("to_rgbs.0.conv.weight", (1, 3, 512, 1, 1)),
    ("to_rgbs.0.conv.modulation.weight", (512, 512)),
    ("to_rgbs.0.conv.modulation.bias", (512,)),
    ("to_rgbs.1.bias", (1, 3, 1, 1)),
    ("to_rgbs.1.upsample.kernel", (4, 4)),
    ("to_rgbs.1.conv.weight", (1, 3, 512, 1, 1)),
    ("to_rgbs.1.conv.modulation.weight", (512, 512)),
    ("to_rgbs.1.conv.modulation.bias", (512,)),
    ("to_rgbs.2.bias", (1, 3, 1, 1)),
    ("to_rgbs.2.upsample.kernel", (4, 4)),
    ("to_rgbs.2.conv.weight", (1, 3, 512, 1, 1)),
    ("to_rgbs.2.conv.modulation.weight", (512, 512)),
    ("to_rgbs.2.conv.modulation.bias", (512,)),
    ("to_rgbs.3.bias", (1, 3, 1, 1)),
    ("to_rgbs.3.upsample.kernel", (4, 4)),
    ("to_rgbs.3.conv.weight", (1, 3, 512, 1, 1)),
    ("to_rgbs.3.conv.modulation.weight", (512, 512)),
    ("to_rgbs.3.conv.modulation.bias", (512,)),
    ("to_rgbs.4.bias", (1, 3, 1, 1)),
    ("to_rgbs.4.upsample.kernel", (4, 4)),
    ("to_rgbs.4.conv.weight", (1, 3, 256, 1, 1)),
    ("to_rgbs.4.conv.modulation.weight", (256, 512)),
    ("to_rgbs.4.conv.modulation.bias", (256,)),
    ("to_rgbs.5.bias", (1, 3, 1, 1)),
    ("to_rgbs.5.upsample.kernel", (4, 4)),
    ("to_rgbs.5.conv.weight", (1, 3, 128, 1, 1)),
    ("to_rgbs.5.conv.modulation.weight", (128, 512)),
    ("to_rgbs.5.conv.modulation.bias", (128,)),
    ("noises.noise_0", (1, 1, 4, 4)),
    ("noises.noise_1", (1, 1, 8, 8)),
    ("noises.noise_2", (1, 1, 8, 8)),
    ("noises.noise_3", (1, 1, 16, 16)),
    ("noises.noise_4", (1, 1, 16, 16)),
    ("noises.noise_5", (1, 1, 32, 32)),
    ("noises.noise_6", (1, 1, 32, 32)),
    ("noises.noise_7", (1, 1, 64, 64)),
    ("noises.noise_8", (1, 1, 64, 64)),
    ("noises.noise_9", (1, 1, 128, 128)),
    ("noises.noise_10", (1, 1, 128, 128)),
    ("noises.noise_11", (1, 1, 256, 256)),
    ("noises.noise_12", (1, 1, 256, 256)),
]
EXPECTED_D_256 = [
    ("convs.0.0.weight", (128, 3, 1, 1)),
    ("convs.0.1.bias", (128,)),
    ("convs.1.conv1.0.weight", (128, 128, 3, 3)),
    ("convs.1.conv1.1.bias", (128,)),
    ("convs.1.conv2.0.kernel", (4, 4)),
    ("convs.1.conv2.1.weight", (256, 128, 3, 3)),
    ("convs.1.conv2.2.bias", (256,)),
    ("convs.1.skip.0.kernel", (4, 4)),
    ("convs.1.skip.1.weight", (256, 128, 1, 1)),
    ("convs.2.conv1.0.weight", (256, 256, 3, 3)),
    ("convs.2.conv1.1.bias", (256,)),
    ("convs.2.conv2.0.kernel", (4, 4)),
    ("convs.2.conv2.1.weight", (512, 256, 3, 3)),
    ("convs.2.conv2.2.bias", (512,)),
    ("convs.2.skip.0.kernel", (4, 4)),
    ("convs.2.skip.1.weight", (512, 256, 1, 1)),
    ("convs.3.conv1.0.weight", (512, 512, 3, 3)),
    ("convs.3.conv1.1.bias", (512,)),
    ("convs.3.conv2.0.kernel", (4, 4)),
    ("convs.3.conv2.1.weight", (512, 512, 3, 3)),
    ("convs.3.conv2.2.bias", (512,)),
    ("convs.3.skip.0.kernel", (4, 4)),
    ("convs.3.skip.1.weight", (512, 512, 1, 1)),
    ("convs.4.conv1.0.weight", (512, 512, 3, 3)),
    ("convs.4.conv1.1.bias", (512,)),
    ("convs.4.conv2.0.kernel", (4, 4)),
    ("convs.4.conv2.1.weight", (512, 512, 3, 3)),
    ("convs.4.conv2.2.bias", (512,)),
    ("convs.4.skip.0.kernel", (4, 4)),
    ("convs.4.skip.1.weight", (512, 512, 1, 1)),
    ("convs.5.conv1.0.weight", (512, 512, 3, 3)),
    ("convs.5.conv1.1.bias", (512,)),
    ("convs.5.conv2.0.kernel", (4, 4)),
    ("convs.5.conv2.1.weight", (512, 512, 3, 3)),
    ("convs.5.conv2.2.bias", (512,)),
    ("convs.5.skip.0.kernel", (4, 4)),
    ("convs.5.skip.1.weight", (512, 512, 1, 1)),
    ("convs.6.conv1.0.weight", (512, 512, 3, 3)),
    ("convs.6.conv1.1.bias", (512,)),
    ("convs.6.conv2.0.kernel", (4, 4)),
    ("convs.6.conv2.1.weight", (512, 512, 3, 3)),
    ("convs.6.conv2.2.bias", (512,)),
    ("convs.6.skip.0.kernel", (4, 4)),
    ("convs.6.skip.1.weight", (512, 512, 1, 1)),
    ("final_conv.0.weight", (512, 513, 3, 3)),
    ("final_conv.1.bias", (512,)),
    ("final_linear.0.weight", (512, 8192)),
    ("final_linear.0.bias", (512,)),
    ("final_linear.1.weight", (1, 512)),
    ("final_linear.1.bias", (1,)),
]

TINY_CH = {4: 32, 8: 32, 16: 32, 32: 16}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops: one thread avoids OpenMP contention with a busy machine (100x faster here)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_g(seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    return Generator(32, 64, 2, channel_multiplier=1, channels=TINY_CH)


def tiny_d(seed: int = 0) -> Discriminator:
    torch.manual_seed(seed)
    return Discriminator(32, channel_multiplier=1, channels=TINY_CH)


def _perturb(module: torch.nn.Module, seed: int = 123) -> None:
    """Zero-initialised params (noise weights, biases) would hide bugs; make them non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _keys_shapes(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in module.state_dict().items()]


# ----------------------------------------------------------------------------- layout


def test_generator_256_state_dict_matches_rosinality():
    with torch.device("meta"):
        g = Generator(256, 512, 8, channel_multiplier=2)
    assert _keys_shapes(g) == EXPECTED_G_256
    # Parameter order (what optimizer state dicts index by) = state_dict order minus buffers.
    buffers = {k for k, _ in g.named_buffers()}
    assert [k for k, _ in g.named_parameters()] == [k for k, _ in EXPECTED_G_256 if k not in buffers]
    assert buffers == {k for k, _ in EXPECTED_G_256 if k.startswith("noises.") or k.endswith("kernel")}
    assert (g.num_layers, g.n_latent) == (13, 14)


def test_discriminator_256_state_dict_matches_rosinality():
    with torch.device("meta"):
        d = Discriminator(256, channel_multiplier=2)
    assert _keys_shapes(d) == EXPECTED_D_256
    assert d.num_blocks == 7


@pytest.mark.parametrize("size", [32, 64, 128, 512, 1024])
def test_all_sizes_construct(size):
    with torch.device("meta"):
        g = Generator(size, 512, 8)
        d = Discriminator(size)
    log = int(math.log2(size))
    assert len(g.convs) == 2 * (log - 2) and len(g.to_rgbs) == log - 2
    assert g.state_dict()[f"noises.noise_{g.num_layers - 1}"].shape == (1, 1, size, size)
    assert d.state_dict()["convs.0.0.weight"].shape == (default_channels(2)[size], 3, 1, 1)
    assert len(d.convs) == log - 1


def test_channels_override_and_validation():
    g = tiny_g()
    assert g.channels[32] == 16 and g.input.input.shape == (1, 32, 4, 4)
    with pytest.raises(ValueError):
        Generator(48, 64, 2)
    with pytest.raises(ValueError):
        Discriminator(2048)  # no default channel count for 2048


# ----------------------------------------------------------------------------- FIR / activation


def _naive_upfirdn(x, k, up, down, p0, p1):
    """Literal definition: zero-insert, pad, true convolution (flipped kernel), keep every down-th."""
    n, c, h, w = x.shape
    xu = torch.zeros(n, c, h * up, w * up, dtype=x.dtype)
    xu[:, :, ::up, ::up] = x
    xp = F.pad(xu, [p0, p1, p0, p1])
    kh, kw = k.shape
    oh, ow = xp.shape[2] - kh + 1, xp.shape[3] - kw + 1
    out = torch.zeros(n, c, oh, ow, dtype=x.dtype)
    for y in range(oh):
        for xx in range(ow):
            win = xp[:, :, y : y + kh, xx : xx + kw]
            out[:, :, y, xx] = (win * k.flip(0, 1)).sum((2, 3))
    return out[:, :, ::down, ::down]


@pytest.mark.parametrize("up,down,pad", [(2, 1, (2, 1)), (1, 2, (1, 1)), (1, 1, (2, 2)), (2, 2, (1, 2))])
def test_upfirdn2d_matches_naive(up, down, pad):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    k = torch.rand(4, 4, dtype=torch.float64)  # asymmetric: catches a missing flip
    got = upfirdn2d(x, k, up=up, down=down, pad=pad)
    want = _naive_upfirdn(x, k, up, down, *pad)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)


def test_upsample_blur_equals_zero_insertion_conv():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    up = Upsample((1, 3, 3, 1)).double()
    k = make_kernel([1, 3, 3, 1]).double() * 4
    xu = torch.zeros(1, 2, 8, 8, dtype=torch.float64)
    xu[:, :, ::2, ::2] = x
    ref = F.conv2d(F.pad(xu, [2, 1, 2, 1]), k.flip(0, 1).expand(2, 1, 4, 4), groups=2)
    torch.testing.assert_close(up(x), ref)
    assert up(x).shape == (1, 2, 8, 8)
    # DC gain 1: a constant image stays constant away from the borders.
    ones = torch.ones(1, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(up(ones)[..., 2:-2, 2:-2], torch.ones(1, 1, 12, 12, dtype=torch.float64))
    torch.testing.assert_close(Downsample((1, 3, 3, 1)).double()(ones)[..., 1:-1, 1:-1],
                               torch.ones(1, 1, 2, 2, dtype=torch.float64))
    assert Blur((1, 3, 3, 1), pad=(2, 1))(torch.ones(1, 1, 6, 6)).shape == (1, 1, 6, 6)


def test_upfirdn2d_negative_pad_crops():
    x = torch.arange(36.0).view(1, 1, 6, 6)
    one = torch.ones(1, 1)
    torch.testing.assert_close(upfirdn2d(x, one, pad=(-1, -2)), x[:, :, 1:4, 1:4])


def test_fused_leaky_relu():
    x = torch.tensor([[-1.0, 2.0], [0.5, -3.0]])
    b = torch.tensor([0.5, -1.0])
    want = torch.tensor([[-0.5 * 0.2, 1.0], [1.0, -4.0 * 0.2]]) * math.sqrt(2)
    torch.testing.assert_close(fused_leaky_relu(x, b), want)


# ----------------------------------------------------------------------------- modulated conv


@pytest.mark.parametrize("demodulate", [True, False])
def test_modulated_conv_equals_unfused_formula(demodulate):
    """Grouped per-sample conv == modulate input, shared conv, demodulate output (Eq. 1 and 3)."""
    torch.manual_seed(0)
    m = ModulatedConv2d(6, 5, 3, 8, demodulate=demodulate).double()
    x = torch.randn(3, 6, 7, 7, dtype=torch.float64)
    w = torch.randn(3, 8, dtype=torch.float64)
    s = m.modulation(w)  # [B, in]
    weight = m.scale * m.weight[0]  # [out, in, k, k]
    ref = F.conv2d(x * s[:, :, None, None], weight, padding=1)
    if demodulate:
        wmod = weight[None] * s[:, None, :, None, None]
        ref = ref * torch.rsqrt(wmod.pow(2).sum([2, 3, 4]) + 1e-8)[:, :, None, None]
    torch.testing.assert_close(m(x, w), ref)


def test_modulated_conv_up_down_shapes_and_per_sample():
    torch.manual_seed(0)
    up = ModulatedConv2d(4, 3, 3, 8, upsample=True)
    down = ModulatedConv2d(4, 3, 3, 8, downsample=True)
    x, w = torch.randn(2, 4, 8, 8), torch.randn(2, 8)
    assert up(x, w).shape == (2, 3, 16, 16)
    assert down(x, w).shape == (2, 3, 4, 4)
    # Each sample only sees its own style.
    torch.testing.assert_close(up(x, w)[1:], up(x[1:], w[1:]))


# ----------------------------------------------------------------------------- generator


def test_tiny_generator_forward_backward_and_determinism():
    g = tiny_g()
    _perturb(g)
    torch.manual_seed(1)
    z = torch.randn(2, 64)
    noise = g.make_noise()
    img, lat = g([z], noise=noise)
    assert img.shape == (2, 3, 32, 32) and lat is None
    assert torch.isfinite(img).all()
    assert 0.01 < img.std().item() < 10 and img.abs().max().item() < 50
    assert not torch.allclose(img[0], img[1])
    img2, _ = g([z], noise=noise)
    assert torch.equal(img, img2)
    # randomize_noise=False uses the stored buffers deterministically.
    a, _ = g([z], randomize_noise=False)
    b, _ = g([z], randomize_noise=False)
    assert torch.equal(a, b)
    # Random noise is seed-driven.
    torch.manual_seed(7)
    c, _ = g([z])
    torch.manual_seed(7)
    d, _ = g([z])
    assert torch.equal(c, d) and not torch.equal(c, a)

    img.square().mean().backward()
    missing = [n for n, p in g.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


def test_generator_features_latents_mixing_truncation():
    g = tiny_g()
    _perturb(g)
    z, z2 = torch.randn(3, 64), torch.randn(3, 64)
    base, _ = g([z], randomize_noise=False)
    img, lat, feats = g([z], randomize_noise=False, return_latents=True, return_features=True)
    assert torch.equal(img, base)  # default behaviour unchanged
    assert lat.shape == (3, g.n_latent, 64)
    assert len(feats) == g.num_layers == 7
    assert [(f.shape[1], f.shape[2]) for f in feats] == g.feature_shapes()
    assert feats[0].shape == (3, 32, 4, 4) and feats[-1].shape == (3, 16, 32, 32)

    # W+ input reproduces the z path.
    again, _ = g([lat], input_is_latent=True, randomize_noise=False)
    torch.testing.assert_close(again, base)

    # Style mixing at a given index: first rows from z, rest from z2.
    _, lat_mix = g([z, z2], inject_index=3, randomize_noise=False, return_latents=True)
    torch.testing.assert_close(lat_mix[:, 2], g.get_latent(z))
    torch.testing.assert_close(lat_mix[:, 3], g.get_latent(z2))

    # truncation=0 collapses every sample onto the truncation latent.
    with torch.no_grad():
        mean_w = g.mean_latent(64)
    assert mean_w.shape == (1, 64)
    t0, _ = g([z], truncation=0.0, truncation_latent=mean_w, randomize_noise=False)
    torch.testing.assert_close(t0[0], t0[2])


def test_state_dict_round_trip_bitwise():
    g, d = tiny_g(0), tiny_d(0)
    _perturb(g)
    _perturb(d)
    buf = io.BytesIO()
    torch.save({"g_ema": g.state_dict(), "d": d.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    g2, d2 = tiny_g(99), tiny_d(99)
    g2.load_state_dict(ckpt["g_ema"], strict=True)
    d2.load_state_dict(ckpt["d"], strict=True)
    z = torch.randn(4, 64)
    noise = g.make_noise()
    with torch.no_grad():
        a, _ = g([z], noise=noise)
        b, _ = g2([z], noise=noise)
        assert torch.equal(a, b)
        assert torch.equal(g([z], randomize_noise=False)[0], g2([z], randomize_noise=False)[0])
        assert torch.equal(d(a), d2(a))


# ----------------------------------------------------------------------------- discriminator


def test_tiny_discriminator_logits_features_and_r1():
    d = tiny_d()
    _perturb(d)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    logits = d(x)
    assert logits.shape == (4, 1)
    out, feats = d(x, return_features=True)
    assert torch.equal(out, logits)
    assert len(feats) == d.num_blocks + 1 == 5
    assert [tuple(f.shape[1:]) for f in feats] == [(16, 32, 32), (32, 16, 16), (32, 8, 8), (32, 4, 4), (32, 4, 4)]

    named = d.features(x, inner=True)
    assert [(k, v.shape[1], v.shape[2]) for k, v in named.items()] == d.feature_info(inner=True)
    for k in range(d.num_blocks):
        torch.testing.assert_close(named[f"convs.{k}"], feats[k])
    assert list(d.features(x, upto=1)) == ["convs.0", "convs.1"]
    torch.testing.assert_close(d.head(named[f"convs.{d.num_blocks - 1}"]), logits)

    # R1 needs double backward through upfirdn2d / fused lrelu.
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(d(xr).sum(), xr, create_graph=True)
    grad.square().sum().backward()
    # Every weight is reached; only biases that shift the logit (final_linear.1.bias) are not.
    no_grad = [n for n, p in d.named_parameters() if p.grad is None]
    assert no_grad == ["final_linear.1.bias"]


def test_discriminator_minibatch_stddev_groups():
    d = tiny_d()
    x = torch.randn(6, 3, 32, 32)  # not divisible by 4: falls back to groups of 3
    assert d(x).shape == (6, 1)
    # Batch of 8 with group 4: samples n and n+2 share statistics, so changing sample 1
    # leaves the stddev channel of sample 0 untouched.
    x8 = torch.randn(8, 3, 32, 32)
    h = d.convs(x8)
    y = d.minibatch_stddev(h)
    assert y.shape == (8, h.shape[1] + 1, 4, 4)
    x8b = x8.clone()
    x8b[1] += 1
    y2 = d.minibatch_stddev(d.convs(x8b))
    assert torch.equal(y[0, -1], y2[0, -1]) and not torch.equal(y[1, -1], y2[1, -1])

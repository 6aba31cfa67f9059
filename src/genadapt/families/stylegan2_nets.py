"""StyleGAN2 generator and discriminator in pure PyTorch (CPU friendly, no CUDA extensions).

Architecture: Karras et al. 2020, "Analyzing and Improving the Image Quality of StyleGAN"
(StyleGAN2, config F: skip generator, residual discriminator).

Module and parameter names, shapes, buffer names and the order of parameters follow
rosinality's ``stylegan2-pytorch`` (``model.py``), so the ``g_ema`` / ``g`` / ``d`` state dicts
in its ``.pt`` checkpoints load with ``load_state_dict(strict=True)``; because the parameter
order is the same, its ``g_optim`` / ``d_optim`` Adam states line up with ``.parameters()`` too.
The code itself is our own.

Images are float NCHW tensors in [-1, 1].
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "default_channels",
    "make_kernel",
    "upfirdn2d",
    "fused_leaky_relu",
    "FusedLeakyReLU",
    "PixelNorm",
    "Upsample",
    "Downsample",
    "Blur",
    "EqualConv2d",
    "EqualLinear",
    "ModulatedConv2d",
    "NoiseInjection",
    "ConstantInput",
    "StyledConv",
    "ToRGB",
    "ConvLayer",
    "ResBlock",
    "Generator",
    "Discriminator",
]

_SQRT2 = math.sqrt(2.0)


# ----------------------------------------------------------------------------- helpers


def default_channels(channel_multiplier: int = 2) -> dict[int, int]:
    """rosinality's resolution -> channels table (StyleGAN2 config F at channel_multiplier=2)."""
    m = channel_multiplier
    return {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * m, 128: 128 * m, 256: 64 * m,
            512: 32 * m, 1024: 16 * m}


def _resolve_channels(
    size: int, channel_multiplier: int, channels: Mapping[int, int] | None
) -> dict[int, int]:
    if size < 4 or size & (size - 1):
        raise ValueError(f"size must be a power of two >= 4, got {size}")
    table = default_channels(channel_multiplier)
    if channels is not None:
        table.update({int(k): int(v) for k, v in channels.items()})
    needed = [2**i for i in range(2, int(math.log2(size)) + 1)]
    missing = [r for r in needed if r not in table]
    if missing:
        raise ValueError(f"channels table has no entry for resolutions {missing}; pass channels={{...}}")
    bad = {r: table[r] for r in needed if table[r] <= 0}
    if bad:
        raise ValueError(f"channel counts must be positive, got {bad}")
    return table


def make_kernel(k: Sequence[float] | Tensor) -> Tensor:
    """Separable 1-D taps -> normalised 2-D FIR kernel (sums to 1)."""
    k = torch.as_tensor(k, dtype=torch.float32)
    if k.ndim == 1:
        k = k[None, :] * k[:, None]
    return k / k.sum()


def upfirdn2d(
    x: Tensor, kernel: Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)
) -> Tensor:
    """Upsample (zero insertion), pad, FIR filter, downsample, per channel.

    Same semantics as the reference ``upfirdn2d`` (and ``upfirdn2d_native``) used by StyleGAN2:
    the kernel is *flipped* (true convolution), ``pad=(p0, p1)`` applies to both axes and may
    be negative (crops). Output side = (in*up + p0 + p1 - k) // down + 1.
    """
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    p0, p1 = pad
    if up > 1:
        # Zero insertion: each sample followed by up-1 zeros along each axis.
        x = x.reshape(n, c, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(n, c, h * up, w * up)
    x = F.pad(x, [max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)])
    if p0 < 0 or p1 < 0:
        x = x[:, :, max(-p0, 0) : x.shape[2] - max(-p1, 0), max(-p0, 0) : x.shape[3] - max(-p1, 0)]
    # One filter for every channel as a depthwise conv: ~3x faster backward on CPU than folding
    # channels into the batch for a 1-channel conv (measured on pocket-stylegan2's training step).
    weight = torch.flip(kernel, [0, 1]).to(dtype=x.dtype, device=x.device).view(1, 1, kh, kw).repeat(c, 1, 1, 1)
    # Striding the conv == computing it fully and keeping every `down`-th sample.
    return F.conv2d(x, weight, stride=down, groups=c)


def fused_leaky_relu(
    x: Tensor, bias: Tensor | None = None, negative_slope: float = 0.2, scale: float = _SQRT2
) -> Tensor:
    """leaky_relu(x + bias, 0.2) * sqrt(2); bias broadcast over dim 1.

    The sqrt(2) gain keeps activation variance ~constant (He init), as in StyleGAN2.
    """
    if bias is not None:
        x = x + bias.view(1, -1, *([1] * (x.ndim - 2)))
    return F.leaky_relu(x, negative_slope) * scale


# ----------------------------------------------------------------------------- layers


class FusedLeakyReLU(nn.Module):
    """Per-channel bias + leaky ReLU(0.2) * sqrt(2). Parameter: ``bias`` [C] (if bias)."""

    def __init__(self, channel: int, bias: bool = True, negative_slope: float = 0.2,
                 scale: float = _SQRT2):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channel)) if bias else None
        self.negative_slope = negative_slope
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return fused_leaky_relu(x, self.bias, self.negative_slope, self.scale)


class PixelNorm(nn.Module):
    """Normalise each latent vector to unit RMS (input of the mapping network)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class Upsample(nn.Module):
    """2x upsample with FIR low-pass; buffer ``kernel`` (scaled by factor^2 to keep DC gain)."""

    def __init__(self, kernel: Sequence[float] = (1, 3, 3, 1), factor: int = 2):
        super().__init__()
        self.factor = factor
        k = make_kernel(kernel) * (factor**2)
        self.register_buffer("kernel", k)
        p = k.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: Tensor) -> Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, down=1, pad=self.pad)


class Downsample(nn.Module):
    """FIR low-pass then 2x decimation; buffer ``kernel``."""

    def __init__(self, kernel: Sequence[float] = (1, 3, 3, 1), factor: int = 2):
        super().__init__()
        self.factor = factor
        k = make_kernel(kernel)
        self.register_buffer("kernel", k)
        p = k.shape[0] - factor
        self.pad = ((p + 1) // 2, p // 2)

    def forward(self, x: Tensor) -> Tensor:
        return upfirdn2d(x, self.kernel, up=1, down=self.factor, pad=self.pad)


class Blur(nn.Module):
    """FIR filter with explicit padding; buffer ``kernel``.

    Used after a strided transposed conv (upsample_factor=2: kernel * 4) or before a strided
    conv (anti-aliasing).
    """

    def __init__(self, kernel: Sequence[float], pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        k = make_kernel(kernel)
        if upsample_factor > 1:
            k = k * (upsample_factor**2)
        self.register_buffer("kernel", k)
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class EqualConv2d(nn.Module):
    """Conv2d with equalized learning rate (Karras et al. 2018, ProGAN §4.1).

    Weights are stored N(0, 1) and scaled by 1/sqrt(fan_in) at run time so Adam sees
    every layer at the same scale. Parameters: ``weight`` [out, in, k, k], ``bias`` [out].
    """

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channel, in_channel, kernel_size, kernel_size))
        self.scale = 1.0 / math.sqrt(in_channel * kernel_size**2)
        self.stride = stride
        self.padding = padding
        self.bias = nn.Parameter(torch.zeros(out_channel)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.scale, bias=self.bias, stride=self.stride,
                        padding=self.padding)

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i}, {o}, {k}, stride={self.stride}, padding={self.padding}"


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate and a learning-rate multiplier.

    ``lr_mul`` (0.01 in the mapping network, StyleGAN §C) is applied by storing weight/lr_mul
    and multiplying by lr_mul at run time. ``activation='fused_lrelu'`` adds the fused
    leaky ReLU (its bias is this layer's ``bias``). Parameters: ``weight`` [out, in], ``bias`` [out].
    """

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, bias_init: float = 0.0,
                 lr_mul: float = 1.0, activation: str | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.zeros(out_dim).fill_(bias_init)) if bias else None
        self.activation = activation
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias * self.lr_mul if self.bias is not None else None
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), bias)
        return F.linear(x, self.weight * self.scale, bias=bias)

    def extra_repr(self) -> str:
        o, i = self.weight.shape
        return f"{i}, {o}, lr_mul={self.lr_mul}, activation={self.activation}"


class ModulatedConv2d(nn.Module):
    """Weight-modulated convolution (StyleGAN2, Karras et al. 2020 §2.2).

    With s = ``modulation``(w) (affine, bias init 1):
      Eq. 1  modulation:    w'_ijk  = s_i * w_ijk
      Eq. 3  demodulation:  w''_ijk = w'_ijk / sqrt(sum_{i,k} w'_ijk^2 + eps)   (if demodulate)
    Each sample gets its own weights; implemented as one grouped conv (groups = batch).
    upsample: stride-2 transposed conv then blur; downsample: blur then stride-2 conv.
    Parameters: ``weight`` [1, out, in, k, k], ``modulation.{weight,bias}``; buffer ``blur.kernel``
    when up/downsampling.
    """

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int,
                 demodulate: bool = True, upsample: bool = False, downsample: bool = False,
                 blur_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        self.eps = 1e-8
        self.kernel_size = kernel_size
        self.in_channel = in_channel
        self.out_channel = out_channel
        self.upsample = upsample
        self.downsample = downsample

        factor = 2
        if upsample:
            # Pads chosen so that convT(stride 2) + blur gives exactly 2x the input size.
            p = (len(blur_kernel) - factor) - (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1),
                             upsample_factor=factor)
        if downsample:
            p = (len(blur_kernel) - factor) + (kernel_size - 1)
            self.blur = Blur(blur_kernel, pad=((p + 1) // 2, p // 2))

        self.scale = 1.0 / math.sqrt(in_channel * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_channel, in_channel, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_channel, bias_init=1)
        self.demodulate = demodulate

    def extra_repr(self) -> str:
        return (f"{self.in_channel}, {self.out_channel}, {self.kernel_size}, "
                f"upsample={self.upsample}, downsample={self.downsample}, demodulate={self.demodulate}")

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        batch, in_ch, h, w = x.shape
        k = self.kernel_size
        s = self.modulation(style).view(batch, 1, in_ch, 1, 1)
        weight = self.scale * self.weight * s  # Eq. 1, [B, out, in, k, k]
        if self.demodulate:
            demod = torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + self.eps)  # Eq. 3
            weight = weight * demod.view(batch, self.out_channel, 1, 1, 1)

        if self.upsample:
            # conv_transpose2d wants [in, out/groups, k, k] per group.
            weight = weight.transpose(1, 2).reshape(batch * in_ch, self.out_channel, k, k)
            out = F.conv_transpose2d(x.reshape(1, batch * in_ch, h, w), weight, padding=0,
                                     stride=2, groups=batch)
            out = out.view(batch, self.out_channel, out.shape[2], out.shape[3])
            return self.blur(out)

        weight = weight.reshape(batch * self.out_channel, in_ch, k, k)
        if self.downsample:
            x = self.blur(x)
            h, w = x.shape[2], x.shape[3]
            out = F.conv2d(x.reshape(1, batch * in_ch, h, w), weight, padding=0, stride=2,
                           groups=batch)
        else:
            out = F.conv2d(x.reshape(1, batch * in_ch, h, w), weight, padding=self.padding,
                           groups=batch)
        return out.view(batch, self.out_channel, out.shape[2], out.shape[3])


class NoiseInjection(nn.Module):
    """Adds per-pixel Gaussian noise scaled by a learned scalar ``weight`` [1] (init 0)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        if noise is None:
            b, _, h, w = x.shape
            noise = x.new_empty(b, 1, h, w).normal_()
        return x + self.weight * noise


class ConstantInput(nn.Module):
    """Learned 4x4 constant that starts synthesis; parameter ``input`` [1, C, 4, 4]."""

    def __init__(self, channel: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channel, size, size))

    def forward(self, latent: Tensor) -> Tensor:
        return self.input.repeat(latent.shape[0], 1, 1, 1)


class StyledConv(nn.Module):
    """ModulatedConv2d -> NoiseInjection -> bias + leaky ReLU (``conv``, ``noise``, ``activate``)."""

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int, style_dim: int,
                 upsample: bool = False, blur_kernel: Sequence[float] = (1, 3, 3, 1),
                 demodulate: bool = True):
        super().__init__()
        self.conv = ModulatedConv2d(in_channel, out_channel, kernel_size, style_dim,
                                    upsample=upsample, blur_kernel=blur_kernel,
                                    demodulate=demodulate)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_channel)

    def forward(self, x: Tensor, style: Tensor, noise: Tensor | None = None) -> Tensor:
        return self.activate(self.noise(self.conv(x, style), noise=noise))


class ToRGB(nn.Module):
    """1x1 modulated conv (no demodulation) to RGB + ``bias`` [1,3,1,1], added to the upsampled
    skip image from the previous resolution (StyleGAN2 skip generator, Fig. 7b)."""

    def __init__(self, in_channel: int, style_dim: int, upsample: bool = True,
                 blur_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        if upsample:
            self.upsample = Upsample(blur_kernel)
        self.conv = ModulatedConv2d(in_channel, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: Tensor, style: Tensor, skip: Tensor | None = None) -> Tensor:
        out = self.conv(x, style) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class ConvLayer(nn.Sequential):
    """[Blur] -> EqualConv2d -> [FusedLeakyReLU], as an ``nn.Sequential`` (keys ``0``, ``1``, ``2``).

    When ``activate`` the conv has no bias; the activation holds it (rosinality layout).
    """

    def __init__(self, in_channel: int, out_channel: int, kernel_size: int,
                 downsample: bool = False, blur_kernel: Sequence[float] = (1, 3, 3, 1),
                 bias: bool = True, activate: bool = True):
        layers: list[nn.Module] = []
        if downsample:
            factor = 2
            p = (len(blur_kernel) - factor) + (kernel_size - 1)
            layers.append(Blur(blur_kernel, pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_channel, out_channel, kernel_size, padding=padding,
                                  stride=stride, bias=bias and not activate))
        if activate:
            layers.append(FusedLeakyReLU(out_channel, bias=bias))
        super().__init__(*layers)
        self.padding = padding


class ResBlock(nn.Module):
    """Residual discriminator block (StyleGAN2 Fig. 7c): halves resolution.

    out = (conv2(conv1(x)) + skip(x)) / sqrt(2); the 1/sqrt(2) keeps the variance of the sum.
    """

    def __init__(self, in_channel: int, out_channel: int,
                 blur_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        self.conv1 = ConvLayer(in_channel, in_channel, 3, blur_kernel=blur_kernel)
        self.conv2 = ConvLayer(in_channel, out_channel, 3, downsample=True, blur_kernel=blur_kernel)
        self.skip = ConvLayer(in_channel, out_channel, 1, downsample=True, blur_kernel=blur_kernel,
                              activate=False, bias=False)

    def forward(self, x: Tensor, return_inner: bool = False):
        """Block output, or (output, conv1 output, conv2 output) if ``return_inner``."""
        h1 = self.conv1(x)
        h2 = self.conv2(h1)
        out = (h2 + self.skip(x)) / _SQRT2
        if return_inner:
            return out, h1, h2
        return out


# ----------------------------------------------------------------------------- generator


class Generator(nn.Module):
    """StyleGAN2 generator (config F: skip architecture), rosinality state-dict layout.

    Args:
        size: output resolution (power of two, >= 4).
        style_dim: z / w dimensionality.
        n_mlp: number of mapping-network layers.
        channel_multiplier: scales channels for resolutions >= 64 (rosinality's table).
        blur_kernel: FIR taps for up/downsampling.
        lr_mlp: learning-rate multiplier of the mapping network.
        channels: optional {resolution: channels} entries overriding the default table, e.g.
            ``{4: 64, 8: 64, 16: 64, 32: 32}`` for a tiny model; default reproduces rosinality.

    Layer counting: ``num_layers = 2*log2(size) - 3`` synthesis convs (``conv1`` then
    ``convs.0..``), ``n_latent = 2*log2(size) - 2`` w vectors (one per conv plus the last ToRGB).
    """

    def __init__(self, size: int, style_dim: int, n_mlp: int, channel_multiplier: int = 2,
                 blur_kernel: Sequence[float] = (1, 3, 3, 1), lr_mlp: float = 0.01,
                 channels: Mapping[int, int] | None = None):
        super().__init__()
        blur_kernel = list(blur_kernel)
        self.size = size
        self.style_dim = style_dim
        self.channels = _resolve_channels(size, channel_multiplier, channels)

        self.style = nn.Sequential(
            PixelNorm(),
            *[EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation="fused_lrelu")
              for _ in range(n_mlp)],
        )

        c4 = self.channels[4]
        self.input = ConstantInput(c4)
        self.conv1 = StyledConv(c4, c4, 3, style_dim, blur_kernel=blur_kernel)
        self.to_rgb1 = ToRGB(c4, style_dim, upsample=False)

        self.log_size = int(math.log2(size))
        self.num_layers = (self.log_size - 2) * 2 + 1

        # Registration order (convs, upsamples, to_rgbs, noises) matches rosinality so that
        # state-dict / parameter order (and thus optimizer state) line up.
        self.convs = nn.ModuleList()
        self.upsamples = nn.ModuleList()  # unused, kept for layout parity
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for layer_idx in range(self.num_layers):
            res = 2 ** ((layer_idx + 5) // 2)
            self.noises.register_buffer(f"noise_{layer_idx}", torch.randn(1, 1, res, res))

        in_ch = c4
        for i in range(3, self.log_size + 1):
            out_ch = self.channels[2**i]
            self.convs.append(StyledConv(in_ch, out_ch, 3, style_dim, upsample=True,
                                         blur_kernel=blur_kernel))
            self.convs.append(StyledConv(out_ch, out_ch, 3, style_dim, blur_kernel=blur_kernel))
            self.to_rgbs.append(ToRGB(out_ch, style_dim, blur_kernel=blur_kernel))
            in_ch = out_ch

        self.n_latent = self.log_size * 2 - 2

    # -- latent helpers (same names as rosinality)

    def make_noise(self) -> list[Tensor]:
        """Fresh noise maps, one per synthesis conv ([1,1,res,res])."""
        device = self.input.input.device
        noises = [torch.randn(1, 1, 4, 4, device=device)]
        for i in range(3, self.log_size + 1):
            for _ in range(2):
                noises.append(torch.randn(1, 1, 2**i, 2**i, device=device))
        return noises

    def mean_latent(self, n_latent: int) -> Tensor:
        """Average w over ``n_latent`` random z ([1, style_dim]); the truncation centre."""
        z = torch.randn(n_latent, self.style_dim, device=self.input.input.device)
        return self.style(z).mean(0, keepdim=True)

    def get_latent(self, z: Tensor) -> Tensor:
        """Mapping network z -> w."""
        return self.style(z)

    def feature_shapes(self) -> list[tuple[int, int]]:
        """(channels, resolution) of each entry of ``forward(..., return_features=True)``'s list."""
        shapes = [(self.channels[4], 4)]
        for i in range(3, self.log_size + 1):
            shapes += [(self.channels[2**i], 2**i)] * 2
        return shapes

    def forward(
        self,
        styles: Sequence[Tensor] | Tensor,
        return_latents: bool = False,
        inject_index: int | None = None,
        truncation: float = 1,
        truncation_latent: Tensor | None = None,
        input_is_latent: bool = False,
        noise: Sequence[Tensor | None] | None = None,
        randomize_noise: bool = True,
        return_features: bool = False,
    ):
        """Synthesize images.

        Args:
            styles: list of z ([B, style_dim]) or, with ``input_is_latent``, w ([B, style_dim])
                or W+ ([B, n_latent, style_dim], first entry only). Two entries = style mixing
                at ``inject_index`` (random in [1, n_latent-1] if None, via Python ``random``).
            truncation, truncation_latent: w <- w_avg + psi * (w - w_avg) when psi < 1.
            noise: per-layer noise maps (``num_layers`` entries; None entries = random).
                If None: random noise when ``randomize_noise`` else the stored ``noises`` buffers.
            return_features: also return per-layer activations (see Returns).

        Returns:
            ``(image, latent_or_None)`` with image [B, 3, size, size] (roughly [-1, 1], not
            clamped); latent is the W+ tensor [B, n_latent, style_dim] if ``return_latents``.
            With ``return_features=True``: ``(image, latent_or_None, features)`` where
            ``features`` has ``num_layers`` tensors: the output of ``conv1`` (4x4), then of
            ``convs.0``, ``convs.1``, ... (two per resolution 8..size), i.e. the activations
            after noise + bias + leaky ReLU, before ToRGB (the CDC ``feat_list``).
        """
        if isinstance(styles, Tensor):
            styles = [styles]
        if not input_is_latent:
            styles = [self.style(s) for s in styles]

        if noise is None:
            if randomize_noise:
                noise = [None] * self.num_layers
            else:
                noise = [getattr(self.noises, f"noise_{i}") for i in range(self.num_layers)]

        if truncation < 1:
            if truncation_latent is None:
                raise ValueError("truncation < 1 needs truncation_latent (e.g. g.mean_latent(4096))")
            styles = [truncation_latent + truncation * (s - truncation_latent) for s in styles]

        if len(styles) < 2:
            s = styles[0]
            latent = s.unsqueeze(1).repeat(1, self.n_latent, 1) if s.ndim < 3 else s
        else:
            if inject_index is None:
                inject_index = random.randint(1, self.n_latent - 1)
            latent = torch.cat(
                [styles[0].unsqueeze(1).repeat(1, inject_index, 1),
                 styles[1].unsqueeze(1).repeat(1, self.n_latent - inject_index, 1)],
                dim=1,
            )

        feats: list[Tensor] = []
        out = self.input(latent)
        out = self.conv1(out, latent[:, 0], noise=noise[0])
        feats.append(out)
        skip = self.to_rgb1(out, latent[:, 1])

        i = 1
        for conv_up, conv, noise1, noise2, to_rgb in zip(
            self.convs[::2], self.convs[1::2], noise[1::2], noise[2::2], self.to_rgbs
        ):
            out = conv_up(out, latent[:, i], noise=noise1)
            feats.append(out)
            out = conv(out, latent[:, i + 1], noise=noise2)
            feats.append(out)
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2

        image = skip
        latent_out = latent if return_latents else None
        if return_features:
            return image, latent_out, feats
        return image, latent_out


# ----------------------------------------------------------------------------- discriminator


class Discriminator(nn.Module):
    """StyleGAN2 residual discriminator (config F), rosinality state-dict layout.

    Block indexing (from the input; what FreezeD "first N blocks" means):
      ``convs.0``           fromRGB: 1x1 ConvLayer(3 -> channels[size]) at full resolution
      ``convs.k`` (k >= 1)  ResBlock size/2^(k-1) -> size/2^k, for k = 1 .. log2(size) - 2
      ``final_conv``        minibatch-stddev (+1 channel) then 3x3 ConvLayer at 4x4
      ``final_linear``      EqualLinear(C*16 -> C, lrelu), EqualLinear(C -> 1)
    At 256 px: convs.1 256->128, convs.2 128->64, convs.3 64->32, convs.4 32->16,
    convs.5 16->8, convs.6 8->4. Freezing ``convs.0..convs.4`` equals official FreezeD
    ``--feature_loc 3`` and SG2-ADA ``--freezed=13``; ``convs.0..convs.3`` equals ``--freezed=10``.

    Args:
        size, channel_multiplier, blur_kernel: as rosinality.
        channels: optional {resolution: channels} overrides (see ``Generator``).

    Note: rosinality's ResBlock ignores ``blur_kernel`` (always [1,3,3,1]); we pass it
    through. Identical for the default kernel, which every published checkpoint uses.
    """

    def __init__(self, size: int, channel_multiplier: int = 2,
                 blur_kernel: Sequence[float] = (1, 3, 3, 1),
                 channels: Mapping[int, int] | None = None):
        super().__init__()
        blur_kernel = list(blur_kernel)
        self.size = size
        self.channels = _resolve_channels(size, channel_multiplier, channels)
        log_size = int(math.log2(size))

        blocks: list[nn.Module] = [ConvLayer(3, self.channels[size], 1)]
        in_ch = self.channels[size]
        for i in range(log_size, 2, -1):
            out_ch = self.channels[2 ** (i - 1)]
            blocks.append(ResBlock(in_ch, out_ch, blur_kernel))
            in_ch = out_ch
        self.convs = nn.Sequential(*blocks)

        self.stddev_group = 4
        self.stddev_feat = 1

        c4 = self.channels[4]
        self.final_conv = ConvLayer(in_ch + 1, c4, 3)
        self.final_linear = nn.Sequential(
            EqualLinear(c4 * 4 * 4, c4, activation="fused_lrelu"),
            EqualLinear(c4, 1),
        )

    @property
    def num_blocks(self) -> int:
        """len(convs): fromRGB + ResBlocks."""
        return len(self.convs)

    def feature_info(self, inner: bool = False) -> list[tuple[str, int, int]]:
        """(name, channels, resolution) for the entries of ``features(x, inner)``, in order."""
        info = [("convs.0", self.channels[self.size], self.size)]
        res = self.size
        for k in range(1, len(self.convs)):
            c_in, c_out = self.channels[res], self.channels[res // 2]
            if inner:
                info += [(f"convs.{k}.conv1", c_in, res), (f"convs.{k}.conv2", c_out, res // 2)]
            info.append((f"convs.{k}", c_out, res // 2))
            res //= 2
        return info

    def minibatch_stddev(self, h: Tensor) -> Tensor:
        """Append one channel: mean over features of the std across a group of samples.

        Sample n is grouped with n + m*M (M = batch/group), like rosinality. Where rosinality
        would fail (batch not divisible by 4), we use the largest group size that divides it.
        """
        b, c, hh, ww = h.shape
        group = min(b, self.stddev_group)
        while b % group:
            group -= 1
        f = self.stddev_feat
        y = h.view(group, -1, f, c // f, hh, ww)
        y = torch.sqrt(y.var(0, unbiased=False) + 1e-8)
        y = y.mean([2, 3, 4], keepdim=True).squeeze(2)  # [M, f, 1, 1]
        y = y.repeat(group, 1, hh, ww)
        return torch.cat([h, y], 1)

    def head(self, h: Tensor, return_final: bool = False):
        """Logits [N, 1] from the last block's output (mbstd -> final_conv -> final_linear)."""
        h = self.final_conv(self.minibatch_stddev(h))
        logits = self.final_linear(h.reshape(h.shape[0], -1))
        return (logits, h) if return_final else logits

    def features(self, x: Tensor, inner: bool = False, upto: int | None = None) -> dict[str, Tensor]:
        """Named intermediate activations (insertion-ordered dict, input side first).

        Keys ``convs.k`` = output of block k. With ``inner``, each ResBlock also gives
        ``convs.k.conv1`` (same resolution as its input) and ``convs.k.conv2`` (downsampled,
        before the skip sum) - the maps CDC's patch discriminator reads. ``upto=k`` stops after
        block k (saves compute when only early maps are needed).
        """
        last = len(self.convs) - 1 if upto is None else upto
        out: dict[str, Tensor] = {}
        h = x
        for k, block in enumerate(self.convs):
            if k > last:
                break
            if k > 0 and inner:
                h, h1, h2 = block(h, return_inner=True)
                out[f"convs.{k}.conv1"] = h1
                out[f"convs.{k}.conv2"] = h2
            else:
                h = block(h)
            out[f"convs.{k}"] = h
        return out

    def forward(self, x: Tensor, return_features: bool = False):
        """Logits [N, 1] for images x [N, 3, size, size] in [-1, 1].

        With ``return_features=True`` returns ``(logits, feats)``: ``feats[k]`` is the output of
        ``convs[k]`` (k = 0 .. num_blocks-1, input side first) and ``feats[-1]`` (index
        ``num_blocks``) the ``final_conv`` output at 4x4.
        """
        if not return_features:
            return self.head(self.convs(x))
        feats = []
        h = x
        for block in self.convs:
            h = block(h)
            feats.append(h)
        logits, final = self.head(h, return_final=True)
        feats.append(final)
        return logits, feats

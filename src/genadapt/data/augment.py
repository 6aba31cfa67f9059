"""Differentiable augmentation for few-shot adaptation (GAN discriminators and diffusion images).

Two schemes, both operating on float NCHW image batches in ``[-1, 1]`` and both differentiable
(gradients flow back to the input, so they can sit between a generator and a discriminator):

* **DiffAugment** — Zhao, Liu, Lin, Zhu, Han, "Differentiable Augmentation for Data-Efficient GAN
  Training", NeurIPS 2020 (arXiv 2006.10738; reference code ``mit-han-lab/data-efficient-gans``,
  ``DiffAugment_pytorch.py``). A fixed policy applied to every image: :func:`diff_augment`,
  :class:`DiffAugment`.
* **ADA** — Karras, Aittala, Hellsten, Laine, Lehtinen, Aila, "Training Generative Adversarial Networks
  with Limited Data", NeurIPS 2020 (arXiv 2006.06676; reference code ``NVlabs/stylegan2-ada-pytorch``,
  ``training/training_loop.py`` and ``training/augment.py``). Each op is applied per image with a
  probability ``p`` that is tuned online from the sign of the discriminator's outputs on reals:
  :class:`AdaptiveAugment`.

How to use them (both papers): apply the *same* augmentation to real and generated images, every time
either goes into the discriminator, in the D step *and* in the G step (``D(T(x))``; the G gradient flows
through ``T``). For diffusion fine-tuning, apply it to the training images before noising.

All three augmenters (:class:`NoAugment`, :class:`DiffAugment`, :class:`AdaptiveAugment`) share one
small interface, so a training loop can be written once::

    aug = make_augment("ada")              # or "none", "diffaugment", "diffaugment:color", "ada:0.6"
    real_logits = D(aug(real))             # aug(x, generator=None) -> augmented x
    fake_logits = D(aug(fake))
    aug.update(real_logits)                # no-op except for ADA
    ckpt["augment"] = aug.state_dict()     # ... and aug.load_state_dict(ckpt["augment"]) on resume
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from genadapt.errors import UserError

__all__ = [
    "ADA_INTERVAL",
    "ADA_SPEED_KIMG",
    "ADA_TARGET",
    "DIFFAUGMENT_DEFAULT_POLICY",
    "DIFFAUGMENT_POLICIES",
    "AdaptiveAugment",
    "Augment",
    "AugmentSpecError",
    "DiffAugment",
    "NoAugment",
    "diff_augment",
    "make_augment",
    "parse_policy",
]

# --- DiffAugment constants (Zhao et al. 2020, DiffAugment_pytorch.py) --------------------------------
DIFFAUGMENT_POLICIES: tuple[str, ...] = ("color", "translation", "cutout")
DIFFAUGMENT_DEFAULT_POLICY = "color,translation,cutout"  # "strongest"; recommended for ~100s of images
TRANSLATION_RATIO = 1 / 8  # max shift = floor(size / 8) pixels per axis, zero padding
CUTOUT_RATIO = 1 / 2  # square side = floor(size / 2) pixels per axis

# --- ADA constants (Karras et al. 2020, stylegan2-ada-pytorch) ----------------------------------------
ADA_TARGET = 0.6  # target for r_t = E[sign(D(x_real))]
ADA_INTERVAL = 4  # adjust p every 4 minibatches
# p can move by 1.0 per `speed_kimg` thousand real images. SG2-ADA uses 500 from scratch and 100 when
# `--resume`-ing from a pretrained network ("make ADA react faster at the beginning"). genadapt always
# starts from a pretrained network, so the resume value is the default.
ADA_SPEED_KIMG = 100.0
# bgc-subset op parameters (stylegan2-ada-pytorch training/augment.py defaults)
ADA_XINT_MAX = 0.125  # integer translation, relative to the image size
ADA_BRIGHTNESS_STD = 0.2  # additive, N(0, 0.2^2)
ADA_CONTRAST_STD = 0.5  # multiplicative about 0, 2^N(0, 0.5^2)
ADA_SATURATION_STD = 1.0  # about the per-pixel grey (luma) axis, 2^N(0, 1)

_NONE_WORDS = ("", "none")


class AugmentSpecError(UserError, ValueError):
    """An augmentation policy or spec string is not valid (a ``ValueError`` and a ``UserError``)."""


# ----------------------------------------------------------------------------------------------------
# Random helpers: sample on the generator's device (a CPU generator works for CUDA inputs), then move.


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    if generator is None:
        out = torch.rand(shape, device=like.device)
    else:
        out = torch.rand(shape, generator=generator, device=generator.device)
    return out.to(device=like.device, dtype=like.dtype)


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    if generator is None:
        out = torch.randn(shape, device=like.device)
    else:
        out = torch.randn(shape, generator=generator, device=generator.device)
    return out.to(device=like.device, dtype=like.dtype)


def _randint(low: int, high: int, shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Integers in ``[low, high)`` as int64 on ``like.device``."""
    if generator is None:
        out = torch.randint(low, high, shape, device=like.device)
    else:
        out = torch.randint(low, high, shape, generator=generator, device=generator.device)
    return out.to(device=like.device)


def _bernoulli(p: float, n: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Bool mask of shape ``(n,)``: each entry True with probability ``p``."""
    if generator is None:
        u = torch.rand((n,), device=like.device)
    else:
        u = torch.rand((n,), generator=generator, device=generator.device)
    return (u < p).to(like.device)


def _check_images(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"augmentation expects a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"augmentation expects an NCHW image batch (4-D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"augmentation expects floating-point images in [-1, 1], got dtype {x.dtype}")


def _shift_axis(x: Tensor, shift: Tensor, dim: int, mode: str) -> Tensor:
    """Move each image's content by ``shift[n]`` pixels along ``dim`` (2 = rows, 3 = columns).

    ``out[..., i, ...] = x[..., i - shift, ...]``; pixels that come from outside the image are zero
    (``mode="zeros"``) or mirrored without repeating the edge (``mode="reflect"``, valid for
    ``|shift| < size``). Implemented as a gather, so it is differentiable with respect to ``x``.
    """
    n, size = x.shape[0], x.shape[dim]
    src = torch.arange(size, device=x.device).unsqueeze(0) - shift.view(n, 1)  # (N, size)
    if mode == "zeros":
        valid = (src >= 0) & (src < size)
        src = src.clamp(0, size - 1)
    elif mode == "reflect":
        src = torch.where(src < 0, -src, src)
        src = torch.where(src > size - 1, 2 * (size - 1) - src, src)
        src = src.clamp(0, size - 1)  # only matters for |shift| >= size, which callers avoid
        valid = None
    else:  # pragma: no cover - internal
        raise ValueError(mode)
    view = [n, 1, 1, 1]
    view[dim] = size
    index = src.view(view).expand_as(x)
    out = x.gather(dim, index)
    if valid is not None:
        out = out * valid.view(view).to(x.dtype)
    return out


# ----------------------------------------------------------------------------------------------------
# DiffAugment (Zhao et al., NeurIPS 2020)


def parse_policy(policy: str | None) -> tuple[str, ...]:
    """Split a DiffAugment policy string into op names, validating each.

    ``""``, ``"none"`` and ``None`` mean no augmentation (an empty tuple). Otherwise a comma-separated
    list of names from :data:`DIFFAUGMENT_POLICIES`; whitespace and case are ignored, order is kept
    (and is the order the ops run in), repeats are allowed.

    Raises:
        AugmentSpecError: (a ``ValueError``) naming the unknown policy and the valid ones.
    """
    if policy is None:
        return ()
    if not isinstance(policy, str):
        raise AugmentSpecError(f"DiffAugment policy must be a string, got {type(policy).__name__}")
    text = policy.strip().lower()
    if text in _NONE_WORDS:
        return ()
    names = tuple(part.strip() for part in text.split(","))
    for name in names:
        if name not in DIFFAUGMENT_POLICIES:
            shown = repr(name) if name else "an empty name"
            raise AugmentSpecError(
                f"unknown DiffAugment policy {shown} in {policy!r}; valid policies are "
                f"{', '.join(DIFFAUGMENT_POLICIES)} (comma-separated, e.g. {DIFFAUGMENT_DEFAULT_POLICY!r}), "
                "or 'none'"
            )
    return names


def _da_color(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """DiffAugment 'color': brightness, then saturation, then contrast (one random factor per image)."""
    n = x.shape[0]
    # brightness: add U(-0.5, 0.5)
    x = x + (_rand((n, 1, 1, 1), generator, x) - 0.5)
    # saturation: scale the deviation from the per-pixel channel mean by U(0, 2)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand((n, 1, 1, 1), generator, x) * 2) + mean
    # contrast: scale the deviation from the image mean (over C, H, W) by U(0.5, 1.5)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (_rand((n, 1, 1, 1), generator, x) + 0.5) + mean
    return x


def _da_translation(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """DiffAugment 'translation': integer shift in [-floor(size/8), floor(size/8)] per axis, zero padded."""
    n, _, h, w = x.shape
    max_dy, max_dx = int(h * TRANSLATION_RATIO), int(w * TRANSLATION_RATIO)
    dy = _randint(-max_dy, max_dy + 1, (n,), generator, x)
    dx = _randint(-max_dx, max_dx + 1, (n,), generator, x)
    if max_dy > 0:
        x = _shift_axis(x, dy, 2, "zeros")
    if max_dx > 0:
        x = _shift_axis(x, dx, 3, "zeros")
    return x


def _da_cutout(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """DiffAugment 'cutout': zero (the [-1, 1] midpoint) one floor(H/2) x floor(W/2) square per image.

    The centre is uniform like the reference code: for an even side it lies on a pixel boundary in
    ``[0, size]``, for an odd side on a pixel in ``[0, size - 1]``; squares that reach past the border
    are clipped, so the zeroed area is between a quarter of and the full square.
    """
    n, _, h, w = x.shape
    ch, cw = int(h * CUTOUT_RATIO), int(w * CUTOUT_RATIO)
    cy = _randint(0, h + 1 - ch % 2, (n,), generator, x)
    cx = _randint(0, w + 1 - cw % 2, (n,), generator, x)
    top = (cy - ch // 2).view(n, 1)
    left = (cx - cw // 2).view(n, 1)
    rows = torch.arange(h, device=x.device).view(1, h)
    cols = torch.arange(w, device=x.device).view(1, w)
    in_rows = (rows >= top) & (rows < top + ch)  # (N, H)
    in_cols = (cols >= left) & (cols < left + cw)  # (N, W)
    cut = in_rows.view(n, 1, h, 1) & in_cols.view(n, 1, 1, w)
    return x * (~cut).to(x.dtype)


_DA_OPS = {"color": _da_color, "translation": _da_translation, "cutout": _da_cutout}


def diff_augment(
    x: Tensor,
    policy: str = DIFFAUGMENT_DEFAULT_POLICY,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DiffAugment (Zhao et al., NeurIPS 2020): differentiable ``T(x)`` for every image in the batch.

    Policies (applied in the order given; random parameters are drawn independently per image):

    * ``color`` — brightness ``x + U(-0.5, 0.5)``; saturation ``(x - m_c) * U(0, 2) + m_c`` with ``m_c``
      the per-pixel mean over channels; contrast ``(x - m) * U(0.5, 1.5) + m`` with ``m`` the image mean.
    * ``translation`` — integer shift of up to ``floor(size / 8)`` pixels along each axis independently
      (ratio 1/8), vacated pixels set to 0.
    * ``cutout`` — one ``floor(H / 2) x floor(W / 2)`` square (ratio 1/2) at a uniformly random centre
      set to 0 (the midpoint of ``[-1, 1]``), clipped at the image border.

    Args:
        x: float images, NCHW, nominally in ``[-1, 1]`` (not clamped; ``color`` may leave the range).
        policy: comma-separated policies; default ``"color,translation,cutout"`` (the paper's choice for
            datasets of a few hundred images or fewer). ``""`` or ``"none"`` returns ``x`` unchanged.
        generator: optional ``torch.Generator`` for reproducible draws (may live on the CPU for CUDA x).

    Returns:
        A tensor with the shape, dtype and device of ``x``; gradients flow back to ``x``.

    Raises:
        AugmentSpecError: (a ``ValueError``) for an unknown policy name.
    """
    names = parse_policy(policy)
    _check_images(x)
    for name in names:
        x = _DA_OPS[name](x, generator)
    return x


# ----------------------------------------------------------------------------------------------------
# Augmenter objects with one shared interface


class Augment:
    """Common interface: ``aug(x, generator=None)``, ``update(real_logits)``, ``state_dict()``."""

    spec: str = "none"

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def update(self, real_logits: Tensor) -> None:
        """Feed the discriminator's raw outputs on (augmented) reals; only ADA uses them."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"spec": self.spec}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


class NoAugment(Augment):
    """Identity: returns the input unchanged."""

    spec = "none"

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return x


class DiffAugment(Augment):
    """DiffAugment (Zhao et al., NeurIPS 2020) with a fixed policy; see :func:`diff_augment`."""

    def __init__(self, policy: str = DIFFAUGMENT_DEFAULT_POLICY) -> None:
        self.policy_names = parse_policy(policy)
        self.policy = ",".join(self.policy_names)
        self.spec = f"diffaugment:{self.policy or 'none'}"

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return diff_augment(x, self.policy, generator=generator)


# ----------------------------------------------------------------------------------------------------
# ADA (Karras et al., NeurIPS 2020)


class AdaptiveAugment(Augment):
    """ADA (Karras et al., NeurIPS 2020): augmentation probability ``p`` tuned from D's outputs on reals.

    **Heuristic** (as in stylegan2-ada-pytorch ``training/training_loop.py``): the overfitting estimate is
    ``r_t = mean(sign(D(x_real)))`` over the raw outputs (logits) on the *augmented* reals collected since
    the last adjustment. Every ``interval`` calls to :meth:`update`::

        p <- p + sign(r_t - target) * (batch_size * interval) / (speed_kimg * 1000)

    so ``p`` can move by 1.0 per ``speed_kimg`` thousand real images. ``batch_size * interval`` is the
    number of real images seen in the interval: by default it is counted from the logits passed in
    (``real_logits.shape[0]`` per call; identical to SG2-ADA for a constant batch); pass ``batch_size``
    to fix it instead (e.g. the *global* batch under data-parallel training, where you should also pass
    all ranks' logits). ``r_t`` equal to the target leaves ``p`` unchanged. SG2-ADA only clamps at 0; we
    clamp ``p`` to ``[0, 1]`` so it stays a probability.

    Defaults: ``target=0.6``, ``interval=4`` (SG2-ADA); ``speed_kimg=100`` — SG2-ADA's value when resuming
    from a pretrained network, which is every genadapt run (its from-scratch value is 500). Note that at
    few-shot batch sizes ``p`` moves slowly: batch 8 over 5 000 steps is 40 kimg, i.e. at most 0.4 of
    movement at ``speed_kimg=100``; lower ``speed_kimg`` for faster reaction on short runs.

    **Pipeline — a subset of ADA, not all of it.** ADA's full pipeline has 18 ops and SG2-ADA's default
    ``--augpipe=bgc`` uses 11 of them (blit + geom + color). This class implements only these six,
    differentiably, each applied independently per image with probability ``p`` (parameters as in
    SG2-ADA ``training/augment.py``):

    * blit: x-flip (when chosen, flip with probability 1/2), 90° rotation (uniform k in {0, 1, 2, 3};
      for non-square images only 0° or 180°), integer translation by ``round(U(-0.125, 0.125) * size)``
      pixels per axis with reflect padding;
    * colour: brightness ``x + N(0, 0.2²)``; contrast ``x * 2^N(0, 0.5²)`` (about 0, the mid-grey of
      ``[-1, 1]``); saturation ``m + (x - m) * 2^N(0, 1)`` with ``m`` the per-pixel channel mean (the grey
      axis; no-op for 1-channel images).

    Omitted from ``bgc``: isotropic/anisotropic scaling, arbitrary rotation, fractional translation (these
    need SG2-ADA's filtered up/down-sampled ``grid_sample``), luma flip and hue rotation. Also omitted
    (not in ``bgc``): image-space filtering, noise and cutout. Expect weaker regularisation than SG2-ADA
    at the same ``p``. As in the paper, keep ``p`` below roughly 0.8 to avoid augmentations leaking into
    the generator (the heuristic normally does).
    """

    def __init__(
        self,
        target: float = ADA_TARGET,
        interval: int = ADA_INTERVAL,
        speed_kimg: float = ADA_SPEED_KIMG,
        p: float = 0.0,
        batch_size: int | None = None,
    ) -> None:
        target = float(target)
        if not (math.isfinite(target) and -1.0 < target < 1.0):
            raise AugmentSpecError(f"ADA target must be in (-1, 1) (the paper uses 0.6), got {target}")
        if int(interval) != interval or interval < 1:
            raise AugmentSpecError(f"ADA interval must be a positive integer, got {interval}")
        if not (math.isfinite(float(speed_kimg)) and speed_kimg > 0):
            raise AugmentSpecError(f"ADA speed_kimg must be > 0, got {speed_kimg}")
        if not (0.0 <= float(p) <= 1.0):
            raise AugmentSpecError(f"ADA initial p must be in [0, 1], got {p}")
        if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
            raise AugmentSpecError(f"ADA batch_size must be a positive integer or None, got {batch_size}")
        self.target = target
        self.interval = int(interval)
        self.speed_kimg = float(speed_kimg)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.p = float(p)
        self.rt: float | None = None  # last r_t estimate (None before the first adjustment)
        self.num_adjustments = 0
        self._steps = 0  # update() calls since the last adjustment
        self._sign_sum: Tensor | float = 0.0
        self._sign_count = 0
        self._images = 0

    @property
    def spec(self) -> str:  # type: ignore[override]
        return f"ada:{self.target:g}"

    # -- heuristic ---------------------------------------------------------------------------------

    def update(self, real_logits: Tensor) -> float:  # type: ignore[override]
        """Accumulate ``sign(real_logits)``; every ``interval`` calls adjust ``p``. Returns ``p``.

        ``real_logits`` are D's raw outputs on the augmented real batch, any shape with the batch first
        (``(N,)``, ``(N, 1)``, or patch outputs ``(N, 1, h, w)``: r_t is the mean over all elements).
        """
        logits = torch.as_tensor(real_logits).detach()
        signs = torch.sign(logits.float())
        self._sign_sum = self._sign_sum + signs.sum()  # stays on the logits' device between adjustments
        self._sign_count += signs.numel()
        self._images += int(logits.shape[0]) if logits.ndim > 0 else 1
        self._steps += 1
        if self._steps >= self.interval:
            self._adjust()
        return self.p

    def _adjust(self) -> None:
        if self._sign_count > 0:
            rt = float(self._sign_sum) / self._sign_count
            n_images = self.batch_size * self.interval if self.batch_size is not None else self._images
            step = n_images / (self.speed_kimg * 1000.0)
            direction = (rt > self.target) - (rt < self.target)  # sign(r_t - target)
            self.p = min(max(self.p + direction * step, 0.0), 1.0)
            self.rt = rt
            self.num_adjustments += 1
        self._steps = 0
        self._sign_sum = 0.0
        self._sign_count = 0
        self._images = 0

    # -- augmentation ------------------------------------------------------------------------------

    def apply(self, x: Tensor, generator: torch.Generator | None = None, p: float | None = None) -> Tensor:
        """Augment ``x`` (NCHW floats in ``[-1, 1]``), each op per image with probability ``p``.

        ``p`` defaults to the current adaptive probability. With ``p == 0`` returns ``x`` itself.
        Differentiable with respect to ``x``; shape, dtype and device are kept.
        """
        _check_images(x)
        prob = self.p if p is None else float(p)
        if prob <= 0.0:
            return x
        n, _, h, w = x.shape

        # x-flip: chosen with probability p, then flipped with probability 1/2 (as in SG2-ADA).
        flip = _bernoulli(prob, n, generator, x) & _bernoulli(0.5, n, generator, x)
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)

        # 90-degree rotations: k uniform in {0, 1, 2, 3} (only {0, 2} unless square).
        chosen = _bernoulli(prob, n, generator, x)
        if h == w:
            k = _randint(0, 4, (n,), generator, x)
        else:
            k = _randint(0, 2, (n,), generator, x) * 2
        k = torch.where(chosen, k, torch.zeros_like(k))
        for turns in (1, 2, 3):
            if h != w and turns != 2:
                continue
            x = torch.where((k == turns).view(n, 1, 1, 1), torch.rot90(x, turns, dims=(2, 3)), x)

        # integer translation: round(U(-xint_max, xint_max) * size) per axis, reflect padding.
        chosen = _bernoulli(prob, n, generator, x)
        t = (_rand((n, 2), generator, x).float() * 2 - 1) * ADA_XINT_MAX
        dx = torch.round(t[:, 0] * w).long().clamp(-(w - 1), w - 1)
        dy = torch.round(t[:, 1] * h).long().clamp(-(h - 1), h - 1)
        dx = torch.where(chosen, dx, torch.zeros_like(dx))
        dy = torch.where(chosen, dy, torch.zeros_like(dy))
        x = _shift_axis(x, dy, 2, "reflect")
        x = _shift_axis(x, dx, 3, "reflect")

        # brightness: add N(0, 0.2^2).
        chosen = _bernoulli(prob, n, generator, x)
        b = _randn((n,), generator, x) * ADA_BRIGHTNESS_STD
        b = torch.where(chosen, b, torch.zeros_like(b))
        x = x + b.view(n, 1, 1, 1)

        # contrast: multiply by 2^N(0, 0.5^2) (about 0, the mid-grey).
        chosen = _bernoulli(prob, n, generator, x)
        c = torch.exp2(_randn((n,), generator, x) * ADA_CONTRAST_STD)
        c = torch.where(chosen, c, torch.ones_like(c))
        x = x * c.view(n, 1, 1, 1)

        # saturation: scale the component orthogonal to the grey axis by 2^N(0, 1).
        chosen = _bernoulli(prob, n, generator, x)
        s = torch.exp2(_randn((n,), generator, x) * ADA_SATURATION_STD).view(n, 1, 1, 1)
        if x.shape[1] > 1:
            mean = x.mean(dim=1, keepdim=True)
            x = torch.where(chosen.view(n, 1, 1, 1), mean + (x - mean) * s, x)
        return x

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.apply(x, generator=generator)

    # -- checkpointing -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (p, r_t, the partial interval's statistics, and the config for reference)."""
        return {
            "spec": self.spec,
            "p": self.p,
            "rt": self.rt,
            "num_adjustments": self.num_adjustments,
            "steps": self._steps,
            "sign_sum": float(self._sign_sum),
            "sign_count": self._sign_count,
            "images": self._images,
            "target": self.target,
            "interval": self.interval,
            "speed_kimg": self.speed_kimg,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``p``, ``r_t`` and the partial-interval statistics.

        The configuration (target, interval, speed_kimg, batch_size) is *not* overwritten: it comes from
        the constructor, as SG2-ADA restores only ``p`` on resume.
        """
        if "p" not in state:
            raise AugmentSpecError("ADA state has no 'p' (was it saved from a different augmentation?)")
        p = float(state["p"])
        if not (0.0 <= p <= 1.0):
            raise AugmentSpecError(f"ADA state has p={p}, outside [0, 1]")
        self.p = p
        rt = state.get("rt")
        self.rt = None if rt is None else float(rt)
        self.num_adjustments = int(state.get("num_adjustments", 0))
        self._steps = int(state.get("steps", 0))
        self._sign_sum = float(state.get("sign_sum", 0.0))
        self._sign_count = int(state.get("sign_count", 0))
        self._images = int(state.get("images", 0))

    def __repr__(self) -> str:
        return (
            f"AdaptiveAugment(target={self.target:g}, interval={self.interval}, "
            f"speed_kimg={self.speed_kimg:g}, p={self.p:.4f})"
        )


# ----------------------------------------------------------------------------------------------------
# Config strings

_SPEC_HELP = (
    "use 'none', 'diffaugment' (policy color,translation,cutout), 'diffaugment:<policy>' "
    "(comma-separated from color, translation, cutout), 'ada' (target 0.6) or 'ada:<target>'"
)


def make_augment(
    spec: str | None,
    *,
    speed_kimg: float = ADA_SPEED_KIMG,
    interval: int = ADA_INTERVAL,
    p: float = 0.0,
    batch_size: int | None = None,
) -> Augment:
    """Build an augmenter from a config string.

    ========================================  ==========================================================
    ``"none"`` (or ``""`` / ``None``)         :class:`NoAugment`
    ``"diffaugment"``                         :class:`DiffAugment` with ``"color,translation,cutout"``
    ``"diffaugment:color,translation"``       :class:`DiffAugment` with that policy
    ``"ada"``                                 :class:`AdaptiveAugment` with target 0.6
    ``"ada:0.7"``                             :class:`AdaptiveAugment` with target 0.7
    ========================================  ==========================================================

    Case and surrounding whitespace are ignored. The keyword arguments configure ADA only (they are
    ignored for the other kinds, so one call site can serve every spec).

    Raises:
        AugmentSpecError: (a ``ValueError``) for an unknown kind, policy or target.
    """
    if spec is None:
        return NoAugment()
    if not isinstance(spec, str):
        raise AugmentSpecError(f"augmentation spec must be a string, got {type(spec).__name__}; {_SPEC_HELP}")
    text = spec.strip().lower()
    kind, colon, arg = text.partition(":")
    kind, arg = kind.strip(), arg.strip()
    if kind in _NONE_WORDS and not colon:
        return NoAugment()
    if kind == "diffaugment":
        if colon and not arg:
            raise AugmentSpecError(f"augmentation spec {spec!r} has an empty policy; {_SPEC_HELP}")
        return DiffAugment(arg if colon else DIFFAUGMENT_DEFAULT_POLICY)
    if kind == "ada":
        target = ADA_TARGET
        if colon:
            try:
                target = float(arg)
            except ValueError:
                raise AugmentSpecError(
                    f"augmentation spec {spec!r}: ADA target {arg!r} is not a number; {_SPEC_HELP}"
                ) from None
        return AdaptiveAugment(target=target, interval=interval, speed_kimg=speed_kimg, p=p, batch_size=batch_size)
    raise AugmentSpecError(f"unknown augmentation {spec!r}; {_SPEC_HELP}")

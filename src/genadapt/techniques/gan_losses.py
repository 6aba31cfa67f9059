"""Loss techniques for GAN adaptation: each adds named, weighted terms to the generator and/or
discriminator objective of :mod:`genadapt.recipes.train_gan`.

A GAN loss technique has ``name``, ``weight`` and ``prepare(model, images, config)`` (snapshot the source,
compute a Fisher, add a head), and any of:

* ``loss(step) -> {name: tensor}``   terms added to G's loss (``step.outputs["fake"]`` etc.);
* ``d_loss(step) -> {name: tensor}`` terms added to D's loss (``step.outputs["real_augmented"]``);
* ``adversarial(step_index, model, default) -> Adversarial`` the latents and critic of this step's game
  (only CDC changes them; at most one technique may).

The loop multiplies every term by the technique's ``weight`` and logs it unweighted, by name. Randomness
during training comes from ``step.generator`` only, so a resumed run repeats the uninterrupted one;
``prepare`` draws from generators seeded with ``config.seed`` (plus a per-technique offset).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from genadapt.errors import UserError
from genadapt.families.gan import Adversarial, ensure_source, ensure_source_discriminator
from genadapt.families.stylegan2 import g_nonsaturating_loss
from genadapt.techniques import Step

FISHER_BATCH = 4  # D's minibatch-stddev group (Karras et al. 2020): each sample is scored as in training


def _generator_parameters(model) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad and n.startswith(("generator.", "latent_map."))}


def _discriminator_parameters(model) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad and n.startswith("discriminator.")}


# ----------------------------------------------------------------------------- EWC


def empirical_fisher(model, parameters: dict[str, Tensor], samples: int, generator: torch.Generator) -> dict[str, Tensor]:
    """Diagonal Fisher information of the source G (Li et al. 2020 §3, the F of eq. 3): F = E[(∂L(x|θ_S)/∂θ_S)²].

    L(x|θ_S) = −log σ(D_S(G_S(z))) (the non-saturating adversarial loss of the *source* D on the source G's
    own samples; no real data). Per-minibatch empirical Fisher: the mean over ⌈samples / 4⌉ minibatches of
    the squared gradient of the minibatch-mean loss (as the SG2-ADA-based reimplementation does, batch 32
    there); per-sample gradients would score each image without the minibatch-stddev context D was trained with.
    """
    names = list(parameters)
    fisher = {name: torch.zeros_like(parameters[name]) for name in names}
    batches = max(1, math.ceil(samples / FISHER_BATCH))
    for _ in range(batches):
        z = torch.randn((FISHER_BATCH, model.style_dim), generator=generator)
        images = model.generate([z], noise=model.noise(FISHER_BATCH, generator))[0]
        loss = g_nonsaturating_loss(model.discriminator(images))
        grads = torch.autograd.grad(loss, [parameters[n] for n in names], allow_unused=True)
        for name, grad in zip(names, grads):
            if grad is not None:
                fisher[name] += grad.detach() ** 2 / batches
    return fisher


class EWC:
    """Elastic weight consolidation for few-shot GANs, Li et al. 2020 eq. 3: λ Σ_i F_i (θ_i − θ_S,i)².

    F is :func:`empirical_fisher` of the trainable generator parameters, computed once before the first
    step (``--ewc-samples`` generated images); θ_S their source values. With LoRA the anchored parameters
    are the A, B factors. The paper's λ ≈ 5·10⁸ [recall, research notes §3] belongs to its Fisher
    normalisation; ours is measured on pocket-stylegan2 (see ``default_weight``).
    """

    name = "ewc"
    # Measured on pocket-stylegan2 (its pretraining checkpoint at step 3,500; 1,024 Fisher samples; unregularised
    # --train full, lr 0.002, batch 4, builtin:openmoji/flags 10 shots): Σ F Δθ² ≈ 0.01 after 10 steps and
    # 0.02-0.03 from 25 to 100 steps, so λ = 50 makes the penalty ≈ 1, the order of the adversarial loss
    # (the research notes' rule: penalty ≈ O(adv loss) at a typical displacement).
    default_weight = 50.0
    seed_offset = 101

    def __init__(self, weight: float | None = None):
        self.weight = self.default_weight if weight is None else weight

    def prepare(self, model, images, config) -> None:
        parameters = {n: p for n, p in _generator_parameters(model).items() if n.startswith("generator.")}
        if not parameters:
            raise UserError("--loss ewc anchors generator weights, but this --train leaves all of them frozen; use full, freeze or lora")
        generator = torch.Generator().manual_seed(config.seed + self.seed_offset)
        self.fisher = empirical_fisher(model, parameters, config.ewc_samples, generator)
        self.anchor = {name: p.detach().clone() for name, p in parameters.items()}

    def penalty(self, model) -> Tensor:
        parameters = dict(model.named_parameters())
        return sum((self.fisher[n] * (parameters[n] - self.anchor[n]) ** 2).sum() for n in self.fisher)

    def loss(self, step: Step) -> dict[str, Tensor]:
        return {"ewc": self.penalty(step.model)}


# ----------------------------------------------------------------------------- CDC


def cdc_distance_loss(feats_adapted: list[Tensor], feats_source: list[Tensor], layers: list[int]) -> Tensor:
    """Cross-domain distance consistency, Ojha et al. 2021 eq. 1-3, exactly as the official code computes it.

    For anchor i and its layer l_i: y_i = softmax_{j≠i} cos(vec F^{l_i}(z_i), vec F^{l_i}(z_j)) for the source
    (y^s) and adapted (y^{s→t}) generator; the loss is ``nn.KLDivLoss()(log y^{s→t}, y^s)`` =
    mean over the N(N−1) entries of y^s (log y^s − log y^{s→t}), i.e. KL(y^s ‖ y^{s→t}) with 'mean' reduction.
    Written with log-softmax on both sides so identical generators give exactly 0.
    """

    def similarities(feats: list[Tensor]) -> Tensor:
        rows = []
        for i, layer in enumerate(layers):
            flat = feats[layer].flatten(1)
            others = torch.cat([flat[:i], flat[i + 1:]])
            rows.append(F.cosine_similarity(flat[i:i + 1], others, dim=1))
        return torch.stack(rows)

    log_adapted = F.log_softmax(similarities(feats_adapted), dim=1)
    log_source = F.log_softmax(similarities(feats_source), dim=1)
    return (log_source.exp() * (log_source - log_adapted)).mean()


class CDC:
    """Few-shot adaptation via cross-domain correspondence (Ojha et al. CVPR 2021), as the official code.

    * Distance consistency (eq. 3, :func:`cdc_distance_loss`) on a fresh batch of N = 4 z each G step, one
      random generator layer per anchor from feature indices 1 .. n_latent − 2 (``randint(1, n_latent − 1)``;
      the 4x4 ``conv1`` output is never picked), same z and noise for the source and the adapted G; λ = 1000.
    * Relaxed realism (eq. 4): on every ``anchor_period``-th step (``--subspace_freq 4``; the first step is
      one) z is drawn near one of ``#shots`` fixed anchors, z = z_a + N(0, 0.1²) (``--subspace_std``, no style
      mixing), and judged by the full-image D; on the other steps z is drawn as usual and judged by a
      patch-level D: the third ResBlock's downsampling conv output (``convs.3.conv2``; 32x32 at 256 px, the
      ``--highp 1`` choice) through a new head ``ConvLayer(C, 1, 3)`` (with its bias + leaky ReLU, as the
      code's ``Extra``), a logit per patch. D's step and its R1 use the same critic as G's step.
    The patch head trains with D and is saved in checkpoints, not in the artifact.
    """

    name = "cdc"
    default_weight = 1000.0  # --kl_wt
    batch = 4  # --feat_const_batch
    anchor_period = 4  # --subspace_freq
    anchor_std = 0.1  # --subspace_std
    patch_feature = "convs.3.conv2"
    seed_offset = 202

    def __init__(self, weight: float | None = None):
        self.weight = self.default_weight if weight is None else weight

    def prepare(self, model, images, config) -> None:
        from genadapt.families.stylegan2_nets import ConvLayer

        info = {name: channels for name, channels, _ in model.discriminator.feature_info(inner=True)}
        if self.patch_feature not in info:
            raise UserError(f"--loss cdc needs a discriminator with at least 3 ResBlocks (32 px or larger); this one is {model.resolution} px")
        ensure_source(model)
        generator = torch.Generator().manual_seed(config.seed + self.seed_offset)
        self.anchors = torch.randn((len(images), model.style_dim), generator=generator)  # init_z, one per shot
        device = model.generator.input.input.device
        model.d_heads["cdc_patch"] = ConvLayer(info[self.patch_feature], 1, 3).to(device)
        model.d_heads["cdc_patch"].requires_grad_(True)

    def anchor_latents(self, batch: int, generator: torch.Generator):
        """``get_subspace``: each sample picks a random anchor and adds N(0, σ²) per dimension."""
        index = torch.randint(len(self.anchors), (batch,), generator=generator)
        z = self.anchors[index] + self.anchor_std * torch.randn((batch, self.anchors.shape[1]), generator=generator)
        return [z], None

    def patch_logits(self, model, images: Tensor) -> Tensor:
        """Logit map [N, 1, h, w]: one realism score per receptive-field patch."""
        feats = model.discriminator.features(images, inner=True, upto=int(self.patch_feature.split(".")[1]))
        return model.d_heads["cdc_patch"](feats[self.patch_feature])

    def adversarial(self, step_index: int, model, default: Adversarial) -> Adversarial:
        if step_index % self.anchor_period == 0:
            return Adversarial("anchor", self.anchor_latents, default.critic)
        return Adversarial("patch", default.latents, lambda images: self.patch_logits(model, images))

    def loss(self, step: Step) -> dict[str, Tensor]:
        model, generator = step.model, step.generator
        z = torch.randn((self.batch, model.style_dim), generator=generator)
        noise = model.noise(self.batch, generator)
        layers = torch.randint(1, model.generator.n_latent - 1, (self.batch,), generator=generator).tolist()
        _, _, feats_source = model.source_generate([z], noise=noise, return_features=True)
        _, _, feats_adapted = model.generate([z], noise=noise, return_features=True)
        return {"cdc": cdc_distance_loss(feats_adapted, feats_source, layers)}


# ----------------------------------------------------------------------------- L2-SP and feature matching


def l2sp_distance(parameters: dict[str, Tensor], anchor: dict[str, Tensor]) -> Tensor:
    """Σ_tensors mean((θ − θ⁰)²): the L2-SP penalty α/2 ‖w − w⁰‖² (Li, Grandvalet, Davoine 2018) in the per-tensor-mean
    form of FreezeD's ``--lambda_l2_G/--lambda_l2_D`` baseline (``F.mse_loss`` per tensor)."""
    return sum(F.mse_loss(parameters[n], anchor[n], reduction="mean") for n in anchor)


class L2SP:
    """L2-SP weight anchoring (Li, Grandvalet, Davoine 2018: Ω(w) = α/2 ‖w − w⁰‖²) on G (term ``l2sp_g``, G's loss) and D (``l2sp_d``,
    D's loss), each towards its source weights; one weight for both, as FreezeD's baseline sets both λ."""

    name = "l2sp"
    default_weight = 1.0  # no published GAN default (FreezeD's flags default to 0); Σ mean Δθ² is ~0.1-1 after a few hundred steps at lr 0.002

    def __init__(self, weight: float | None = None):
        self.weight = self.default_weight if weight is None else weight

    def prepare(self, model, images, config) -> None:
        self.g_anchor = {n: p.detach().clone() for n, p in _generator_parameters(model).items()}
        self.d_anchor = {n: p.detach().clone() for n, p in _discriminator_parameters(model).items()}

    def loss(self, step: Step) -> dict[str, Tensor]:
        return {"l2sp_g": l2sp_distance(dict(step.model.named_parameters()), self.g_anchor)} if self.g_anchor else {}

    def d_loss(self, step: Step) -> dict[str, Tensor]:
        return {"l2sp_d": l2sp_distance(dict(step.model.named_parameters()), self.d_anchor)} if self.d_anchor else {}


class DiscriminatorFeatureMatching:
    """Feature distillation on D (the ``--lambda_FM`` baseline of FreezeD's code, Mo et al. 2020):
    mean_k ‖D^k(x) − D_S^k(x)‖² (mean-squared, per block k) between the adapted and the frozen source D on
    the step's (augmented) real images, added to D's loss. Blocks are every ``convs.k`` output; frozen
    FreezeD blocks contribute 0."""

    name = "feature"
    default_weight = 1.0  # no published default (FreezeD's flag is user-set)

    def __init__(self, weight: float | None = None):
        self.weight = self.default_weight if weight is None else weight

    def prepare(self, model, images, config) -> None:
        if not _discriminator_parameters(model):
            raise UserError("--loss feature regularises the discriminator, but every D weight is frozen (--freeze-d)")
        self.source = ensure_source_discriminator(model)

    def d_loss(self, step: Step) -> dict[str, Tensor]:
        real = step.outputs["real_augmented"].detach()
        adapted = step.model.discriminator.features(real)
        with torch.no_grad():
            source = self.source.features(real)
        return {"feature": sum(F.mse_loss(adapted[k], source[k]) for k in adapted) / len(adapted)}


REGISTRY = {cls.name: cls for cls in (EWC, CDC, L2SP, DiscriminatorFeatureMatching)}


def make(name: str, weight: float | None):
    if name not in REGISTRY:
        raise UserError(f"--loss {name}: not available for GANs; choose from {', '.join(REGISTRY)}")
    return REGISTRY[name](weight)


def make_loss_techniques(config) -> list:
    losses = [make(spec.name, spec.weight) for spec in config.loss]
    changing = [t.name for t in losses if hasattr(t, "adversarial")]
    if len(changing) > 1:
        raise UserError(f"--loss {' and '.join(changing)}: both change the adversarial game; use one of them")
    return losses

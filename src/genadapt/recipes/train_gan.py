"""The GAN adaptation loop: one readable recipe that knows no technique.

Reads top to bottom: load the base (G, D, G_ema), load the few shots, let the parameter technique decide
what trains and the loss techniques snapshot what they need, then alternate StyleGAN2's two steps
(Karras et al. 2020, as rosinality's ``train.py``):

* D step: logistic loss on augmented reals and fakes, plus lazy R1 every 16 steps;
* G step: non-saturating loss through the augmented D, plus every loss technique's terms;
* G_ema ← β G_ema + (1 − β) G over the trainable generator weights.

DiffAugment / ADA (:mod:`genadapt.data.augment`) is applied to every image D sees, in both steps (Zhao et al.
2020; Karras et al. 2020b). A loss technique may swap a step's latents and critic (CDC's anchors and patch D)
through :class:`genadapt.families.gan.Adversarial`.

One ``torch.Generator`` drives batch choice, latents, noise maps, augmentation and the techniques' random
choices; ``checkpoints/state.pt`` (atomic) holds it with the trainable tensors, the EMA, both optimisers and
the augmentation state, so rerunning the same command resumes and repeats the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

from genadapt.config import AdaptConfig
from genadapt.errors import UserError
from genadapt.families import gan
from genadapt.families.stylegan2 import (
    R1_INTERVAL,
    LazyR1,
    copy_for_ema,
    d_logistic_loss,
    g_nonsaturating_loss,
    lazy_adam_hyperparameters,
)
from genadapt.recipes.train import STATE_FILE, _load_trainable_state, _trainable_state
from genadapt.runs import check_resumable, load_checkpoint, progress, save_torch, use_cpu, write_json, write_manifest, write_text, write_yaml
from genadapt.techniques import Step
from genadapt.techniques.gan import make_parameter_technique
from genadapt.techniques.gan_losses import make_loss_techniques

BETAS = (0.0, 0.99)  # Adam β for G and D: StyleGAN2 / rosinality / CDC
# G_ema decay per step, rosinality's and CDC's `accum = 0.5 ** (32 / (10 * 1000))` whatever the batch:
# a half-life of ~312 steps, short enough for 1k-step adaptation runs.
EMA_DECAY = 0.5 ** (32 / (10 * 1000))
DEFAULT_R1_GAMMA = 10.0  # rosinality --r1 10, used by CDC and FreezeD at 256 px


def r1_gamma(config: AdaptConfig, model: gan.GANModel) -> float:
    """``--r1-gamma``, else the γ the base was pretrained with (pocket-stylegan2 records it), else 10."""
    if config.r1_gamma is not None:
        return config.r1_gamma
    return float(model.config.get("pretraining", {}).get("r1_gamma", DEFAULT_R1_GAMMA))


def _split_sides(model: gan.GANModel, parameters) -> tuple[list, list]:
    """G's optimiser gets generator-side tensors (G, latent map), D's the rest (D, its extra heads)."""
    chosen = {id(p) for p in parameters}
    g_side, d_side = [], []
    for name, parameter in model.named_parameters():
        if id(parameter) in chosen:
            (g_side if name.split(".", 1)[0] in gan.GENERATOR_SIDE else d_side).append(parameter)
    return g_side, d_side


@torch.no_grad()
def _update_ema(model: gan.GANModel, decay: float) -> None:
    """θ_ema ← β θ_ema + (1 − β) θ over G's trainable weights only, so frozen and base weights stay bitwise."""
    ema = dict(model.g_ema.named_parameters())
    for name, parameter in model.generator.named_parameters():
        if parameter.requires_grad:
            ema[name].mul_(decay).add_(parameter.detach(), alpha=1 - decay)


def _ema_state(model: gan.GANModel) -> dict[str, torch.Tensor]:
    trained = {name for name, p in model.generator.named_parameters() if p.requires_grad}
    return {name: p.detach().clone() for name, p in model.g_ema.named_parameters() if name in trained}


@contextlib.contextmanager
def _no_grad_for(parameters):
    """D's weights take no gradient in G's step (it is only the critic there); restored afterwards."""
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)


def _add_terms(terms: dict, total: torch.Tensor, technique, produced: dict) -> torch.Tensor:
    for name, value in produced.items():
        terms[name] = value
        total = total + technique.weight * value
    return total


def _write_log(out: Path, history: list[dict]) -> None:
    write_text(out / "log.jsonl", "".join(json.dumps(record) + "\n" for record in history))


def _save_samples(model: gan.GANModel, config: AdaptConfig, out: Path, step: int) -> Path:
    from genadapt.grid import save_grid

    images = gan.sample(model, config.num_validation_images, seed=config.seed)
    return save_grid(images, out / "samples" / f"step-{step:06d}.png", columns=8, scale=2)


def adapt_gan(config: AdaptConfig) -> dict:
    """Train one GAN run into ``config.out``; resumes from ``checkpoints/state.pt`` if it exists."""
    from genadapt.data import load_dataset
    from genadapt.data.augment import make_augment
    from genadapt.grid import save_grid

    out = Path(config.out)
    use_cpu()
    model = gan.load(config.base, allow_pickle=config.allow_pickle)
    images = load_dataset(
        config.data, resolution=model.resolution, shots=config.shots, seed=config.seed,
        fit=config.fit, background=config.background, caption=config.caption, strict=config.strict,
    )
    reals = images.tensors()

    torch.manual_seed(config.seed)  # adapter, miner and head initialisation draw from the global generator
    technique = make_parameter_technique(config)
    technique.prepare(model)
    losses = make_loss_techniques(config)
    for loss_technique in losses:
        loss_technique.prepare(model, images, config)
    model.g_ema = copy_for_ema(model.generator)  # the EMA starts from the prepared G (adapters included)

    gamma = r1_gamma(config, model)
    resolved = {"family": "gan", **json.loads(config.model_dump_json()), **technique.resolved, "r1_gamma": gamma}
    check_resumable(out, STATE_FILE, resolved, ignored={"steps"})
    write_yaml(out / "config.yaml", resolved)
    write_manifest(out, config.seed, {"train": images}, {"base": config.base, "resolution": model.resolution})

    g_params, d_params = _split_sides(model, technique.parameters(model))
    if not g_params or not d_params:
        raise UserError(f"--train {config.train}: nothing trains in the {'generator' if not g_params else 'discriminator'}; loosen --freeze / --freeze-d")
    g_optim = torch.optim.Adam(g_params, lr=config.lr, betas=BETAS)  # no path-length reg, so no lazy correction
    d_lr, d_betas = lazy_adam_hyperparameters(config.lr, BETAS, R1_INTERVAL)
    d_optim = torch.optim.Adam(d_params, lr=d_lr, betas=d_betas)
    augment = make_augment(config.augment)
    r1 = LazyR1(gamma, R1_INTERVAL)

    generator = torch.Generator().manual_seed(config.seed)
    start, history = 0, []
    state_path = out / STATE_FILE
    if state_path.is_file():
        state = load_checkpoint(state_path, {"trainable", "ema", "g_optim", "d_optim", "augment", "generator", "step", "history"})
        _load_trainable_state(model, state["trainable"])
        with torch.no_grad():
            ema = dict(model.g_ema.named_parameters())
            for name, value in state["ema"].items():
                ema[name].copy_(value)
        g_optim.load_state_dict(state["g_optim"])
        d_optim.load_state_dict(state["d_optim"])
        augment.load_state_dict(state["augment"])
        generator.set_state(state["generator"])
        start, history = state["step"], state["history"]
    else:
        save_grid(reals, out / "samples" / "shots.png", columns=8, scale=2)
        _save_samples(model, config, out, 0)  # the source, for comparison

    def checkpoint(done: int) -> None:
        save_torch(state_path, {
            "trainable": _trainable_state(model), "ema": _ema_state(model),
            "g_optim": g_optim.state_dict(), "d_optim": d_optim.state_dict(), "augment": augment.state_dict(),
            "generator": generator.get_state(), "step": done, "history": history,
        })
        _write_log(out, history)

    default = gan.default_adversarial(model)
    batch = config.batch_size
    bar = progress(config.steps, start, f"adapt {config.train}")
    started = time.time()
    for step_index in range(start, config.steps):
        adversarial = default
        for loss_technique in losses:
            if hasattr(loss_technique, "adversarial"):
                adversarial = loss_technique.adversarial(step_index, model, default)
        index = torch.randint(len(reals), (batch,), generator=generator)
        real = reals[index]

        # D step: L_D = E[softplus(-D(T(x)))] + E[softplus(D(T(G(z))))] + Σ technique terms.
        with torch.no_grad():
            styles, inject_index = adversarial.latents(batch, generator)
            fake = model.generate(styles, inject_index, noise=model.noise(batch, generator))[0]
        real_augmented = augment(real, generator)
        real_logits = adversarial.critic(real_augmented)
        fake_logits = adversarial.critic(augment(fake, generator))
        d_terms = {"d_adv": d_logistic_loss(real_logits, fake_logits)}
        step = Step(step_index, model, {"real": real, "index": index},
                    {"real_augmented": real_augmented, "fake": fake, "real_logits": real_logits, "fake_logits": fake_logits}, generator)
        d_total = d_terms["d_adv"]
        for loss_technique in losses:
            if hasattr(loss_technique, "d_loss"):
                d_total = _add_terms(d_terms, d_total, loss_technique, loss_technique.d_loss(step))
        d_optim.zero_grad(set_to_none=True)
        d_total.backward()
        d_optim.step()
        augment.update(real_logits)
        scores = {"real_score": float(real_logits.detach().mean()), "fake_score": float(fake_logits.detach().mean())}

        # Lazy R1 (every 16 D steps) on the critic this step uses; a patch critic's map is averaged per image.
        if r1.due(step_index):
            critic = adversarial.critic
            r1_loss, d_terms["r1"] = r1(lambda x: critic(x).flatten(1).mean(1, keepdim=True), real, lambda x: augment(x, generator))
            d_optim.zero_grad(set_to_none=True)
            r1_loss.backward()
            d_optim.step()

        # G step: L_G = E[softplus(-D(T(G(z))))] + Σ technique terms.
        with _no_grad_for(d_params):
            styles, inject_index = adversarial.latents(batch, generator)
            fake = model.generate(styles, inject_index, noise=model.noise(batch, generator))[0]
            fake_logits = adversarial.critic(augment(fake, generator))
            g_terms = {"g_adv": g_nonsaturating_loss(fake_logits)}
            step = Step(step_index, model, {"real": real, "index": index},
                        {"fake": fake, "styles": styles, "inject_index": inject_index, "fake_logits": fake_logits}, generator)
            g_total = g_terms["g_adv"]
            for loss_technique in losses:
                if hasattr(loss_technique, "loss"):
                    g_total = _add_terms(g_terms, g_total, loss_technique, loss_technique.loss(step))
            g_optim.zero_grad(set_to_none=True)
            g_total.backward()
            g_optim.step()
        _update_ema(model, EMA_DECAY)

        done = step_index + 1
        record = {"step": done, "adversarial": adversarial.name, "d_loss": float(d_total.detach()), "g_loss": float(g_total.detach()),
                  **{k: float(v.detach()) for k, v in {**d_terms, **g_terms}.items()}, **scores}
        if hasattr(augment, "p"):
            record["augment_p"] = augment.p
        history.append(record)
        bar.update(1)
        bar.set_postfix(d=f"{record['d_loss']:.3f}", g=f"{record['g_loss']:.3f}")
        if done % config.checkpointing_steps == 0 or done == config.steps:
            checkpoint(done)
        if config.sample_every and done % config.sample_every == 0 and done != config.steps:
            _save_samples(model, config, out, done)
    bar.close()
    train_seconds = time.time() - started

    artifacts = technique.save(model, out)
    _save_samples(model, config, out, config.steps)
    _write_log(out, history)
    files = [f for a in map(Path, artifacts) for f in ([a] if a.is_file() else a.rglob("*")) if f.is_file()]
    summary = {
        "family": "gan",
        "steps": config.steps,
        "train_seconds": train_seconds,
        "trainable_parameters": sum(p.numel() for p in g_params + d_params),
        "trainable_generator_parameters": sum(p.numel() for p in g_params),
        "trainable_discriminator_parameters": sum(p.numel() for p in d_params),
        "artifacts": [str(Path(a).relative_to(out)) for a in artifacts],
        "artifact_bytes": sum(f.stat().st_size for f in files),
    }
    write_json(out / "summary.json", summary)
    summary["model"] = model
    return summary

"""The GAN adaptation loop: one readable recipe, driven by accelerate, knowing no technique.

Reads top to bottom: load the base (G, D, G_ema) on the accelerator's device, load the few shots, let the
parameter technique decide what trains and the loss techniques snapshot what they need, then alternate
StyleGAN2's two steps (Karras et al. 2020, as rosinality's ``train.py``):

* D step: logistic loss on augmented reals and fakes, plus lazy R1 every 16 steps;
* G step: non-saturating loss through the augmented D, plus every loss technique's terms;
* G_ema ← β G_ema + (1 − β) G over the trainable generator weights.

DiffAugment / ADA (:mod:`genadapt.data.augment`) is applied to every image D sees, in both steps (Zhao et al.
2020; Karras et al. 2020b). A loss technique may swap a step's latents and critic (CDC's anchors and patch D)
through :class:`genadapt.families.gan.Adversarial`.

accelerate gives the device, autocast for ``--mixed-precision`` and the process group. With N processes each
optimiser step averages the gradients of all processes (one all-reduce per step, as DDP's), each process on
its part of one global batch; ``--gradient-accumulation-steps K`` sums K micro-batches per step. DDP's module
wrapper is not used: a GAN step toggles D's gradients, runs D twice before one backward, takes R1's double
backward and uses CDC's patch head on alternate steps, all of which its reducer handles badly.

One shared ``torch.Generator`` draws the global batch (indices, latents, noise maps); a per-process one draws
augmentation and the techniques' random choices. ``checkpoints/state.pt`` (atomic) holds both with the
trainable tensors, the EMA, both optimisers and the augmentation state, so rerunning the same command resumes
and repeats the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from genadapt import techniques
from genadapt.config import AdaptConfig
from genadapt.errors import UserError
from genadapt.families import artifact_bytes, gan
from genadapt.families.stylegan2 import (
    R1_INTERVAL,
    LazyR1,
    copy_for_ema,
    d_logistic_loss,
    g_nonsaturating_loss,
    lazy_adam_hyperparameters,
)
from genadapt.recipes import (
    GracefulStop, add_terms, effective_lr, end_of_step, sample_interval, append_log, check_finite, check_ranks_agree, gather_states, load_trainable_state, make_accelerator, process_generators,
    restore_generators, rewrite_log, trainable_state, write_run_record,
)
from genadapt.recipes import optim
from genadapt.recipes.logging import Reporter
from genadapt.runfolder import check_not_shorter, check_same_data, data_digest
from genadapt.runs import check_resumable, field_defaults, load_checkpoint, progress, save_torch, use_cpu, write_json, write_manifest
from genadapt.techniques import Step

STATE_FILE = "checkpoints/state.pt"
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
    return {name: p.detach().cpu().clone() for name, p in model.g_ema.named_parameters() if name in trained}


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


def _average_gradients(parameters: list[torch.Tensor], accelerator) -> None:
    """All processes' gradients averaged, in one all-reduce of the flat gradient (what DDP's reducer does)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def _step(optimizer, parameters: list[torch.Tensor], config: AdaptConfig, accelerator) -> None:
    _average_gradients(parameters, accelerator)
    if config.max_grad_norm > 0:
        norm = accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
        if not torch.isfinite(torch.as_tensor(norm)):
            raise UserError(f"the gradient norm is {float(norm)}; the run diverged (lower --learning-rate). The last checkpoint in {config.out}/checkpoints is kept")
    optimizer.step()


def _save_samples(model: gan.GANModel, config: AdaptConfig, out: Path, step: int) -> Path:
    from genadapt.grid import save_grid

    images = gan.sample(model, config.num_validation_images, seed=config.seed)
    return save_grid(images, out / "samples" / f"step-{step:06d}.png", columns=8, scale=2)


def adapt_gan(config: AdaptConfig, accelerator=None) -> dict:
    """Train one GAN run into ``config.out``; resumes from ``checkpoints/state.pt`` if it exists."""
    from genadapt.data import load_dataset
    from genadapt.data.augment import make_augment
    from genadapt.grid import save_grid

    out = Path(config.out)
    use_cpu()
    accelerator = accelerator or make_accelerator(config.mixed_precision, 1, config.cpu)
    main, device = accelerator.is_main_process, accelerator.device
    model = gan.load(config.base, allow_pickle=config.allow_pickle, device=device)
    images = load_dataset(
        config.data, resolution=model.resolution, shots=config.shots, seed=config.seed,
        fit=config.fit, background=config.background, strict=config.strict,
    )
    reals = images.tensors()

    torch.manual_seed(config.seed)  # adapter, miner and head initialisation draw from the global generator
    technique = techniques.get(config.train, "parameter", "gan").build(config.section(config.train))
    technique.prepare(model)
    losses = []
    for spec in config.loss:
        loss_technique = techniques.get(spec.name, "loss", "gan").build(config.section(spec.name))
        loss_technique.prepare(model, images, config)
        losses.append((spec.weight, loss_technique))
    changing = [t.name for _, t in losses if hasattr(t, "adversarial")]
    if len(changing) > 1:
        raise UserError(f"--loss {' and '.join(changing)}: both change the adversarial game; use one of them")
    model.g_ema = copy_for_ema(model.generator)  # the EMA starts from the prepared G (adapters included)
    model.to(device)

    gamma = r1_gamma(config, model)
    resolved = {**config.resolved(), "r1_gamma": gamma}
    for used in [technique, *(t for _, t in losses)]:
        resolved.update(getattr(used, "resolved", {}))
    check_resumable(out, STATE_FILE, resolved, ignored={"steps"}, defaults=field_defaults(type(config)))
    check_same_data(out, STATE_FILE, images)
    if main:
        # config.yaml with the values the techniques resolved from the base (FreezeD's blocks, CDC's patch block, γ)
        write_run_record(out, config, "gan", resolved, device=str(device), processes=accelerator.num_processes)
        write_manifest(out, config.seed, {"train": images}, {"base": config.base, "resolution": model.resolution, "data_sha256": data_digest(images)})

    g_params, d_params = _split_sides(model, technique.parameters(model))
    if not g_params or not d_params:
        raise UserError(f"--train {config.train}: nothing trains in the {'generator' if not g_params else 'discriminator'}; loosen --freeze / --freeze-d")
    # --optimizer adam or adamw: the same update unless --adam-weight-decay is given (GAN techniques use no weight decay).
    weight_decay, betas, eps = optim.adam_settings(config, technique.weight_decay, BETAS)
    kind = "adam" if not weight_decay else config.optimizer
    g_optim = optim.make_optimizer(kind, g_params, effective_lr(config, accelerator), weight_decay, betas, eps)  # no path-length reg, so no lazy correction
    d_lr, d_betas = lazy_adam_hyperparameters(effective_lr(config, accelerator), betas, R1_INTERVAL)
    d_optim = optim.make_optimizer(kind, d_params, d_lr, weight_decay, d_betas, eps)
    # --lr-scheduler scales both rates by the same factor per step (D's lazy-R1 rate stays D's base rate).
    g_scheduler, d_scheduler = optim.make_scheduler(config, g_optim, config.steps), optim.make_scheduler(config, d_optim, config.steps)
    g_optim, d_optim = accelerator.prepare(g_optim, d_optim)
    augment = make_augment(config.augment)
    r1 = LazyR1(gamma, R1_INTERVAL)

    shared, local = process_generators(config.seed, accelerator)
    start, history = 0, []
    state_path = out / STATE_FILE
    if state_path.is_file():
        state = load_checkpoint(state_path, {"trainable", "ema", "g_optim", "d_optim", "g_scheduler", "d_scheduler", "augment", "shared_generator",
                                             "local_generators", "step", "history"})
        optim.check_schedule_steps(config, state, config.steps, state_path)
        load_trainable_state(model, state["trainable"], state_path)
        with torch.no_grad():
            ema = dict(model.g_ema.named_parameters())
            for name, value in state["ema"].items():
                ema[name].copy_(value)
        g_optim.load_state_dict(state["g_optim"])
        d_optim.load_state_dict(state["d_optim"])
        g_scheduler.load_state_dict(state["g_scheduler"])
        d_scheduler.load_state_dict(state["d_scheduler"])
        augment.load_state_dict(state["augment"])
        restore_generators(state, shared, local, accelerator, state_path)
        start, history = state["step"], state["history"]
        check_not_shorter(start, config.steps, out)
    elif main:
        save_grid(reals, out / "samples" / "shots.png", columns=8, scale=2)
        _save_samples(model, config, out, 0)  # the source, for comparison
    validation = None
    if config.validate_every:
        from genadapt.recipes.validation import Validation, validation_images

        if accelerator.num_processes > 1:
            raise UserError("--validate-every runs on one process; drop --num-processes, or score the run afterwards with genadapt evaluate")
        validation = Validation(config.validate_every, config.validation_samples, config.patience, config.copy_ceiling,
                                validation_images(config, images, model.resolution), images,
                                lambda model, n, seed: gan.sample(model, n, seed + 5), config.seed, out)
        if state_path.is_file() and "validation" in state:
            validation.load_state_dict(state["validation"])
    if main:
        rewrite_log(out, history)

    def restore_best() -> None:
        """The best validated step is what the run saves: its trained tensors and its G_ema."""
        load_trainable_state(model, validation.best_state["trainable"], state_path)
        with torch.no_grad():
            ema = dict(model.g_ema.named_parameters())
            for name, value in validation.best_state["ema"].items():
                ema[name].copy_(value)

    def checkpoint(done: int) -> None:
        locals_ = gather_states(local, accelerator)
        if main:
            save_torch(state_path, {
                "trainable": trainable_state(model), "ema": _ema_state(model),
                "g_optim": g_optim.state_dict(), "d_optim": d_optim.state_dict(), "augment": augment.state_dict(),
                "g_scheduler": g_scheduler.state_dict(), "d_scheduler": d_scheduler.state_dict(), "schedule_steps": config.steps,
                "shared_generator": shared.get_state(), "local_generators": locals_, "step": done, "history": history,
                **({"validation": validation.state_dict()} if validation is not None else {}),
            })

    batch, processes, rank = config.batch_size, accelerator.num_processes, accelerator.process_index
    part = slice(rank * batch, (rank + 1) * batch)
    accumulation = config.gradient_accumulation_steps

    def draw(adversarial):
        """This process's part of one global batch: real images, latents, noise maps."""
        index = torch.randint(len(reals), (batch * processes,), generator=shared)[part]
        styles, inject_index = adversarial.latents(batch * processes, shared)
        noise = model.noise(batch * processes, shared)
        return reals[index].to(device), [s[part].to(device) for s in styles], inject_index, [n[part] for n in noise], index

    default = gan.default_adversarial(model)
    bar = progress(config.steps, start, f"adapt {config.train}", disable=not main)
    started, first_step_seconds = time.time(), None  # the first step pays one-off warm-up and an R1: compare's timing probe sets it apart
    grid_every = sample_interval(config, len(images))
    with GracefulStop() as stop, Reporter(out, config.report_to, main, start) as reporter:
        for step_index in range(start, config.steps):
            if validation is not None and validation.stop:
                break  # stopped early: no better validation score for --patience checks
            lrs = {"lr": g_optim.param_groups[0]["lr"], "d_lr": d_optim.param_groups[0]["lr"]}
            adversarial = default
            for _, loss_technique in losses:
                if hasattr(loss_technique, "adversarial"):
                    adversarial = loss_technique.adversarial(step_index, model, default)

            # D step: L_D = E[softplus(-D(T(x)))] + E[softplus(D(T(G(z))))] + Σ technique terms.
            d_optim.zero_grad(set_to_none=True)
            d_reals = []
            for _ in range(accumulation):
                real, styles, inject_index, noise, index = draw(adversarial)
                d_reals.append(real)
                with accelerator.autocast():
                    with torch.no_grad():
                        fake = model.generate(styles, inject_index, noise=noise)[0]
                    real_augmented = augment(real, local)
                    real_logits = adversarial.critic(real_augmented)
                    fake_logits = adversarial.critic(augment(fake, local))
                    d_terms = {"d_adv": d_logistic_loss(real_logits.float(), fake_logits.float())}
                    step = Step(step_index, model, {"real": real, "index": index},
                                {"real_augmented": real_augmented, "fake": fake, "real_logits": real_logits, "fake_logits": fake_logits}, local)
                    d_total = d_terms["d_adv"]
                    for weight, loss_technique in losses:
                        if hasattr(loss_technique, "d_loss"):
                            d_total = add_terms(d_terms, d_total, weight, loss_technique.d_loss(step))
                check_finite(d_terms, step_index + 1, out)
                accelerator.backward(d_total / accumulation)
                augment.update(accelerator.gather(real_logits.detach().float()))
            _step(d_optim, d_params, config, accelerator)
            scores = {"real_score": float(real_logits.detach().float().mean()), "fake_score": float(fake_logits.detach().float().mean())}

            # Lazy R1 (every 16 D steps) on the critic this step uses, in full precision; a patch critic's map is averaged per image.
            if r1.due(step_index):
                critic = adversarial.critic
                d_optim.zero_grad(set_to_none=True)
                for real in d_reals:
                    r1_loss, d_terms["r1"] = r1(lambda x: critic(x).flatten(1).mean(1, keepdim=True), real, lambda x: augment(x, local))
                    accelerator.backward(r1_loss / accumulation)
                _step(d_optim, d_params, config, accelerator)

            # G step: L_G = E[softplus(-D(T(G(z))))] + Σ technique terms.
            g_optim.zero_grad(set_to_none=True)
            with _no_grad_for(d_params):
                for _ in range(accumulation):
                    real, styles, inject_index, noise, index = draw(adversarial)
                    with accelerator.autocast():
                        fake = model.generate(styles, inject_index, noise=noise)[0]
                        fake_logits = adversarial.critic(augment(fake, local))
                        g_terms = {"g_adv": g_nonsaturating_loss(fake_logits.float())}
                        step = Step(step_index, model, {"real": real, "index": index},
                                    {"fake": fake, "styles": styles, "inject_index": inject_index, "fake_logits": fake_logits}, local)
                        g_total = g_terms["g_adv"]
                        for weight, loss_technique in losses:
                            if hasattr(loss_technique, "loss"):
                                g_total = add_terms(g_terms, g_total, weight, loss_technique.loss(step))
                    check_finite(g_terms, step_index + 1, out)
                    accelerator.backward(g_total / accumulation)
                _step(g_optim, g_params, config, accelerator)
            _update_ema(model, EMA_DECAY)
            g_scheduler.step()
            d_scheduler.step()

            done = step_index + 1
            record = {"step": done, "adversarial": adversarial.name, "d_loss": float(d_total.detach()), "g_loss": float(g_total.detach()),
                      **{k: float(v.detach()) for k, v in {**d_terms, **g_terms}.items()}, **scores, **lrs}
            if hasattr(augment, "p"):
                record["augment_p"] = augment.p
            history.append(record)
            if main:
                append_log(out, record)
                reporter.log(done, record)
            bar.update(1)
            bar.set_postfix(d=f"{record['d_loss']:.3f}", g=f"{record['g_loss']:.3f}")
            end_of_step(done, model, config, accelerator, stop, validation, lambda: {"trainable": trainable_state(model), "ema": _ema_state(model)},
                        checkpoint, bar, out)
            if first_step_seconds is None:
                first_step_seconds = time.time() - started
            if main and grid_every and done % grid_every == 0 and done != config.steps:
                reporter.image(_save_samples(model, config, out, done), done)
        bar.close()
        if validation is not None and validation.best_state is not None:
            restore_best()
        train_seconds = time.time() - started
        if main:
            reporter.image(_save_samples(model, config, out, config.steps), config.steps)

    weights_digest = check_ranks_agree(model, accelerator)
    summary = {
        "family": "gan",
        "steps": config.steps,
        "train_seconds": train_seconds,
        "first_step_seconds": first_step_seconds,
        "device": str(device),
        "processes": processes,
        "weights_sha256": weights_digest,
        "trainable_parameters": sum(p.numel() for p in g_params + d_params),
        "trainable_generator_parameters": sum(p.numel() for p in g_params),
        "trainable_discriminator_parameters": sum(p.numel() for p in d_params),
        **({"validation": validation.summary(), "trained_steps": len(history)} if validation is not None else {}),
    }
    if main:
        artifacts = technique.save(model, out)
        summary["artifacts"] = [str(Path(a).relative_to(out)) for a in artifacts]
        summary["artifact_bytes"] = artifact_bytes(artifacts)
        write_json(out / "summary.json", summary)
    accelerator.wait_for_everyone()
    summary["model"] = model
    summary["history"] = history
    summary["optimizers"] = (g_optim, d_optim)
    return summary


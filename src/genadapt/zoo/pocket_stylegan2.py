"""pocket-stylegan2: a small StyleGAN2 (config F layout, rosinality state-dict keys) pretrained on
the OpenMoji source split at 32x32, the GAN source model for few-shot adaptation.

Training follows rosinality's ``train.py`` (itself StyleGAN2's recipe, Karras et al. 2020): logistic
non-saturating losses, R1 on reals every 16 D steps (lazy regularization, Adam lr/betas corrected),
style mixing 0.9, an EMA generator; plus DiffAugment (Zhao et al. 2020) on every image D sees, because
3,136 images is a small set. Path-length regularization is left out: it is G's other lazy term in
rosinality, costs a second generator pass, and matters for interpolation smoothness more than for
sample quality at 32 px (SG2-ADA's CIFAR config turns it off too, ``pl_weight=0``); G's Adam is
therefore uncorrected.

Checkpoints (``out/checkpoints/state.pt``, atomic) hold both networks, the EMA, both optimisers, the
augmentation state, torch's RNG state and the step; rerunning the same command after Ctrl-C or a kill
resumes from the last one and, with the same thread count, reproduces the uninterrupted run exactly.
Ctrl-C finishes the current step and checkpoints before exiting.

Sizing, measured on the 2-core development machine (torch 2.13 CPU) with the full training step
(D step, G step, R1 every 16 steps, DiffAugment), CPU seconds per step on one thread while
pocket-sd's pretraining used the other core (so a little pessimistic):

    channels {4,8,16,32}      batch   s/step (1 thread)   G+D params
    128, 128,  64, 32           32      1.8 - 2.0           1.65 M
    128, 128,  64, 32           16      0.80                1.65 M   <- default
     64,  64,  64, 32           32      1.9
    128, 128, 128, 64           32      3.8
    256, 256, 128, 64           32      7.7

Those timings used a FIR filter run as a 1-channel convolution over batch*channels maps; as a
depthwise convolution (now in ``stylegan2_nets.upfirdn2d``, identical outputs) the default step
takes 0.285 CPU-s at batch 16 and 0.61 at batch 32 (one thread). Batch 16 (rosinality's default)
gives twice the updates per second; the default 10,000 steps (160 kimg) take ~48 minutes.
The model folder (G_ema + G + D, fp32) is 9.7 MB.

R1 γ = 1: in 1,500-step pilots at batch 16 (24 kimg; run with a depthwise FIR filter that gives
identical outputs 3x faster) with γ = 0.01 (SG2-ADA's 32-px value) the R1 term grew 30x
and D dominated (mean logits ±2, G loss 2.4); with γ = 1 the logits stayed within ±1 (D loss ~1,
G loss ~1.2) and the sample grids showed more varied silhouettes.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from genadapt.runs import (
    append_jsonl,
    load_torch,
    module_states,
    progress,
    restore_states,
    save_torch,
    use_cpu,
    write_manifest,
    write_text,
    write_yaml,
)

MODEL_NAME = "pocket-stylegan2"


@dataclass
class PocketStyleGAN2Config:
    seed: int = 0
    data: str = "builtin:openmoji/source"
    size: int = 32
    # Networks (stylegan2_nets.Generator / Discriminator kwargs); same channel table for G and D.
    style_dim: int = 128
    n_mlp: int = 4  # SG2-ADA uses 2 mapping layers at CIFAR scale, config F 8
    lr_mlp: float = 0.01  # mapping-network lr multiplier, StyleGAN §C
    channels: dict = field(default_factory=lambda: {4: 128, 8: 128, 16: 64, 32: 32})
    # Optimisation: rosinality / StyleGAN2 defaults (batch 16, lr 0.002, Adam betas (0, 0.99)).
    batch: int = 16
    g_lr: float = 0.002
    d_lr: float = 0.002
    betas: tuple = (0.0, 0.99)
    r1_gamma: float = 1.0  # see the module docstring (SG2-ADA's 32-px config uses 0.01)
    r1_every: int = 16  # lazy regularization interval (Karras et al. 2020 §3.1)
    mixing: float = 0.9  # style-mixing probability (Karras et al. 2019 §3.1)
    augment: str = "diffaugment"  # genadapt.data.augment.make_augment spec
    # EMA of G: half-life in kimg (StyleGAN2 ema_kimg=10 at batch 32) with SG2-ADA's ramp-up (0: none).
    ema_kimg: float = 10.0
    ema_rampup: float = 0.05
    steps: int = 10000  # 160 kimg; ~48 min on one thread (0.285 s/step), see the module docstring
    checkpoint_every: int = 250
    sample_every: int = 500
    log_every: int = 10
    sample_count: int = 64
    threads: int = 1  # 2 OpenMP threads stall at every barrier when anything else runs on a 2-core box

    def __post_init__(self):
        # JSON / YAML overrides give string keys and lists; normalise so configs compare equal.
        self.channels = {int(k): int(v) for k, v in self.channels.items()}
        self.betas = tuple(float(b) for b in self.betas)

    def _channels(self) -> dict:
        return {int(k): int(v) for k, v in self.channels.items()}  # also after `--set channels=...`

    def generator_kwargs(self) -> dict:
        return {"size": self.size, "style_dim": self.style_dim, "n_mlp": self.n_mlp,
                "lr_mlp": self.lr_mlp, "channels": self._channels()}

    def discriminator_kwargs(self) -> dict:
        return {"size": self.size, "channels": self._channels()}


# ----------------------------------------------------------------------------- helpers




def _truncate_log(out: Path, step: int) -> None:
    """Drop records of steps after the checkpoint we resume from (they will be run again)."""
    path = out / "log.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))


@contextmanager
def _finish_step_on_interrupt():
    """First Ctrl-C sets ``flag["stop"]`` (the loop checkpoints and raises); a second one interrupts."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def build(config: PocketStyleGAN2Config):
    """(G, D, G_ema) at their seeded initialisation."""
    import torch

    from genadapt.families.stylegan2 import copy_for_ema
    from genadapt.families.stylegan2_nets import Discriminator, Generator

    torch.manual_seed(config.seed)
    generator = Generator(**config.generator_kwargs())
    discriminator = Discriminator(**config.discriminator_kwargs())
    return generator, discriminator, copy_for_ema(generator)


# ----------------------------------------------------------------------------- pretraining


def pretrain(out: Path, config: PocketStyleGAN2Config | None = None, stop_after: int | None = None) -> Path:
    """Train from scratch (or resume from ``out/checkpoints/state.pt``), then write ``out/model/``.

    Run folder: ``config.yaml``, ``manifest.json``, ``log.jsonl`` (a ``{"event": "start"}`` record per
    call, then losses, D's mean logits, R1, EMA decay every ``log_every`` steps), ``checkpoints/state.pt``,
    ``samples/step-NNNNNN.png`` (``sample_count`` EMA samples, fixed seed) and ``model/`` (see
    :func:`genadapt.families.stylegan2.save_stylegan2`). Returns ``out/model``.

    ``stop_after=k`` trains up to step k, checkpoints and returns the checkpoint path without
    exporting (what a kill at step k leaves behind, minus the lost steps); rerun to continue.
    A finished run (model folder present, ``steps`` reached) returns at once.
    """
    import torch

    from genadapt.data import load_dataset
    from genadapt.data.augment import make_augment
    from genadapt.families.stylegan2 import (
        LazyR1,
        accumulate,
        d_logistic_loss,
        ema_decay,
        g_nonsaturating_loss,
        lazy_adam_hyperparameters,
        mixing_noise,
        requires_grad,
        save_stylegan2,
    )
    from genadapt.grid import save_grid

    config = config or PocketStyleGAN2Config()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    use_cpu(config.threads)
    write_yaml(out / "config.yaml", {"model": MODEL_NAME, **asdict(config)})
    images = load_dataset(config.data, resolution=config.size)
    write_manifest(out, config.seed, {"train": images})
    reals = images.tensors()

    generator, discriminator, g_ema = build(config)
    g_lr, g_betas = lazy_adam_hyperparameters(config.g_lr, config.betas, None)  # no path-length reg
    d_lr, d_betas = lazy_adam_hyperparameters(config.d_lr, config.betas, config.r1_every)
    g_optim = torch.optim.Adam(generator.parameters(), lr=g_lr, betas=g_betas)
    d_optim = torch.optim.Adam(discriminator.parameters(), lr=d_lr, betas=d_betas)
    augment = make_augment(config.augment)
    r1 = LazyR1(config.r1_gamma, config.r1_every)
    trained = {
        "generator": generator, "discriminator": discriminator, "generator_ema": g_ema,
        "g_optim": g_optim, "d_optim": d_optim, "augment": augment,
    }

    step, state_path = 0, out / "checkpoints" / "state.pt"
    architecture = {"generator": config.generator_kwargs(), "discriminator": config.discriminator_kwargs()}
    if state_path.is_file():
        state = load_torch(state_path)
        if state["architecture"] != architecture:
            raise ValueError(
                f"{state_path} was trained with {state['architecture']}, not {architecture}; "
                "use a new output folder or the original network settings"
            )
        restore_states(state, trained)
        torch.set_rng_state(state["rng"])
        step = state["step"]
        _truncate_log(out, step)

    def checkpoint() -> Path:
        return save_torch(
            state_path,
            {
                "step": step,
                "architecture": architecture,
                **module_states(trained),
                "rng": torch.get_rng_state(),
            },
        )

    def save_samples() -> None:
        from genadapt.families.stylegan2 import sample

        grid = sample(g_ema, config.sample_count, seed=config.seed)
        save_grid(grid, out / "samples" / f"step-{step:06d}.png", columns=8, scale=2)

    end = config.steps if stop_after is None else min(stop_after, config.steps)
    model_dir = out / "model"
    if step >= config.steps and (model_dir / "config.json").is_file():
        return model_dir
    append_jsonl(out / "log.jsonl", {"event": "start", "step": step, "resumed": step > 0, "steps": config.steps})
    generator.train()
    discriminator.train()
    n_latent = generator.n_latent
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}

    def track(**values) -> None:
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + float(value)
            counts[key] = counts.get(key, 0) + 1

    bar = progress(config.steps, step, MODEL_NAME)
    started = time.time()
    with _finish_step_on_interrupt() as interrupt:
        while step < end:
            real = reals[torch.randint(len(reals), (config.batch,))]

            # D step: L_D on augmented reals and fakes (DiffAugment / ADA: T on both).
            requires_grad(generator, False)
            requires_grad(discriminator, True)
            with torch.no_grad():
                styles, inject = mixing_noise(config.batch, config.style_dim, n_latent, config.mixing)
                fake = generator(styles, inject_index=inject)[0]
            real_logits = discriminator(augment(real))
            fake_logits = discriminator(augment(fake))
            d_loss = d_logistic_loss(real_logits, fake_logits)
            d_optim.zero_grad(set_to_none=True)
            d_loss.backward()
            d_optim.step()
            augment.update(real_logits)
            track(d_loss=d_loss.item(), real_score=real_logits.mean().item(),
                  fake_score=fake_logits.mean().item())

            # Lazy R1 on reals, every r1_every D steps (rosinality: `i % d_reg_every == 0`).
            if r1.due(step):
                r1_loss, r1_value = r1(discriminator, real, augment)
                d_optim.zero_grad(set_to_none=True)
                r1_loss.backward()
                d_optim.step()
                track(r1=r1_value.item())

            # G step: non-saturating loss through the (augmented) discriminator.
            requires_grad(generator, True)
            requires_grad(discriminator, False)
            styles, inject = mixing_noise(config.batch, config.style_dim, n_latent, config.mixing)
            fake = generator(styles, inject_index=inject)[0]
            g_loss = g_nonsaturating_loss(discriminator(augment(fake)))
            g_optim.zero_grad(set_to_none=True)
            g_loss.backward()
            g_optim.step()
            track(g_loss=g_loss.item())

            step += 1
            decay = ema_decay(config.batch, config.ema_kimg, step * config.batch, config.ema_rampup or None)
            accumulate(g_ema, generator, decay)

            bar.update(1)
            if step % config.log_every == 0 or step == end:
                means = {key: sums[key] / counts[key] for key in sums}
                bar.set_postfix(d=f"{means['d_loss']:.3f}", g=f"{means['g_loss']:.3f}")
                extra = {"augment_p": augment.p} if hasattr(augment, "p") else {}
                append_jsonl(out / "log.jsonl", {"step": step, **means, **extra, "ema_decay": decay,
                           "seconds": round(time.time() - started, 2)})
                sums.clear()
                counts.clear()
            if step % config.checkpoint_every == 0 or step == end or interrupt["stop"]:
                checkpoint()
            if step % config.sample_every == 0 or step == config.steps:
                save_samples()
            if interrupt["stop"]:
                bar.close()
                raise KeyboardInterrupt(f"stopped at step {step}; rerun to resume from {state_path}")
    bar.close()
    requires_grad(generator, True)
    requires_grad(discriminator, True)
    if step < config.steps:
        return state_path

    return save_stylegan2(
        model_dir,
        g_ema,
        discriminator,
        config.generator_kwargs(),
        config.discriminator_kwargs(),
        generator=generator,
        extra={"name": MODEL_NAME, "resolution": config.size, "trained_on": config.data,
               "steps": step, "pretraining": asdict(config)},
    )


def load_pocket_stylegan2(folder: Path, device: str = "cpu"):
    """(g_ema, d, config dict) from a ``model/`` folder written by :func:`pretrain`."""
    from genadapt.families.stylegan2 import load_stylegan2

    return load_stylegan2(folder, device=device)

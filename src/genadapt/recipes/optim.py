"""What both loops optimise with: the optimiser, the learning-rate schedule, the EMA of the trained tensors, and
the checks that refuse, before any run folder exists, a combination of these settings a loop would not honour.

* ``--optimizer``: ``adamw``/``adam`` (torch), ``adamw8bit`` (bitsandbytes' AdamW8bit, CUDA only), ``prodigy``
  (prodigyopt's Prodigy, Mishchenko & Defazio 2023), ``adafactor`` (transformers' Adafactor with a fixed
  learning rate: ``relative_step=False, scale_parameter=False, warmup_init=False``, as kohya recommends it).
  The optional ones are ``pip install 'genadapt[optim]'``; a missing one is a one-line error naming that.
* ``--adam-beta1``, ``--adam-beta2``, ``--adam-weight-decay``, ``--adam-epsilon``: diffusers' example-script flags,
  for every Adam-family optimiser (Prodigy's β and ε too); unset, the loop's β and the technique's weight decay.
* ``--lr-scheduler``: diffusers' ``diffusers.optimization.get_scheduler``, stepped once per optimiser step (not
  through accelerate's wrapper, which steps it once per process) and checkpointed with the run.
* ``--use-ema``: diffusers' ``EMAModel`` over the tensors the optimiser trains (its decay schedule:
  ``min(--ema-decay, (1 + n) / (10 + n))`` at the n-th update after the first, which copies the weights).
"""

from __future__ import annotations

import importlib.util

import torch

from genadapt.errors import UserError

OPTIONAL = {  # --optimizer NAME: (module, pip package)
    "adamw8bit": ("bitsandbytes", "bitsandbytes"),
    "prodigy": ("prodigyopt", "prodigyopt"),
    "adafactor": ("transformers", "transformers"),
}
GAN_OPTIMIZERS = ("adam", "adamw")
# Schedules whose shape depends on --steps: a resumed run must keep the step count it started with.
STEP_DEPENDENT = ("linear", "cosine", "cosine_with_restarts", "polynomial")
WARMUP_SCHEDULES = ("constant_with_warmup", *STEP_DEPENDENT)
EMA_TECHNIQUES_REFUSED = {
    "embedding": "--train embedding (textual inversion) learns a few rows of the embedding table, where diffusers and kohya keep no EMA; "
                 "use --use-ema with --train full, freeze, lora, loha or lokr",
}


def missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def install_hint(package: str) -> str:
    return f"pip install 'genadapt[optim]' (or pip install {package})"


def check_settings(config, family: str) -> None:
    """Combinations of the training settings that no loop would honour, refused in one line before the run starts.
    Also fills what the settings resolve (Prodigy's learning rate of 1 when none is given)."""
    from genadapt.data.buckets import check_data_settings

    check_data_settings(config, family)
    name = config.optimizer
    if family == "gan" and name not in GAN_OPTIMIZERS:
        raise UserError(f"--optimizer {name}: GAN runs train with Adam (StyleGAN2's β = (0, 0.99), and the lazy-R1 correction of D's "
                        "learning rate and β is Adam's); use --optimizer adam (adamw is the same update: GAN techniques use no weight decay)")
    if name in OPTIONAL:
        module, package = OPTIONAL[name]
        if name == "adamw8bit" and (config.cpu or not torch.cuda.is_available()):
            raise UserError("--optimizer adamw8bit: bitsandbytes' 8-bit AdamW runs on CUDA GPUs only and this run is on the CPU; "
                            "use --optimizer adamw (or adafactor for less optimiser memory)")
        if missing(module):
            raise UserError(f"--optimizer {name} needs {package}, which is not installed: {install_hint(package)}")
    given = config.model_fields_set
    if name == "adafactor":
        for field in ("adam_beta1", "adam_beta2", "adam_epsilon"):
            if field in given:
                raise UserError(f"--{field.replace('_', '-')} applies to the Adam-family optimisers; --optimizer adafactor has its own moments (drop the flag or use --optimizer adamw)")
    if name == "adam" and config.adam_weight_decay:
        raise UserError("--adam-weight-decay is AdamW's decoupled decay; --optimizer adam has none (use --optimizer adamw)")
    if name == "prodigy" and config.learning_rate is None:
        config.learning_rate = 1.0  # Prodigy estimates the step size; its lr is a multiplier, 1 as its authors recommend
    if config.report_to == "tensorboard" and missing("tensorboard"):
        raise UserError("--report-to tensorboard needs tensorboard, which is not installed: pip install 'genadapt[tensorboard]' (or pip install tensorboard)")

    scheduler = config.lr_scheduler
    if config.lr_warmup_steps and scheduler not in WARMUP_SCHEDULES:
        raise UserError(f"--lr-warmup-steps applies to --lr-scheduler {', '.join(WARMUP_SCHEDULES)}; --lr-scheduler {scheduler} has no warmup (use constant_with_warmup)")
    if config.lr_num_cycles != 1 and scheduler != "cosine_with_restarts":
        raise UserError(f"--lr-num-cycles applies to --lr-scheduler cosine_with_restarts (this run: {scheduler})")
    if config.lr_power != 1.0 and scheduler != "polynomial":
        raise UserError(f"--lr-power applies to --lr-scheduler polynomial (this run: {scheduler})")
    if family == "diffusion":
        if config.use_ema and config.train in EMA_TECHNIQUES_REFUSED:
            raise UserError(f"--use-ema: {EMA_TECHNIQUES_REFUSED[config.train]}")
        if config.ema_decay != type(config).model_fields["ema_decay"].default and not config.use_ema:
            raise UserError("--ema-decay applies with --use-ema; add --use-ema or drop --ema-decay")


def adam_settings(config, weight_decay: float, betas: tuple[float, float]) -> tuple[float, tuple[float, float], float]:
    """(weight decay, β, ε) from --adam-weight-decay, --adam-beta1/2 and --adam-epsilon, each falling back to the
    technique's weight decay and the loop's β (diffusion: torch's 0.9, 0.999; GAN: StyleGAN2's 0, 0.99)."""
    beta1 = betas[0] if config.adam_beta1 is None else config.adam_beta1
    beta2 = betas[1] if config.adam_beta2 is None else config.adam_beta2
    decay = weight_decay if config.adam_weight_decay is None else config.adam_weight_decay
    return decay, (beta1, beta2), config.adam_epsilon


def make_optimizer(name: str, parameters, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Optimizer:
    """The optimiser `--optimizer NAME` names, over `parameters` (a list of tensors)."""
    parameters = list(parameters)
    beta = {"betas": betas, "eps": eps}
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, **beta)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, **beta)
    module, package = OPTIONAL[name]
    try:
        if name == "adamw8bit":
            import bitsandbytes

            return bitsandbytes.optim.AdamW8bit(parameters, lr=lr, weight_decay=weight_decay, **beta)
        if name == "prodigy":
            import contextlib
            import io

            from prodigyopt import Prodigy

            with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay"
                return Prodigy(parameters, lr=lr, weight_decay=weight_decay, **beta)
    except ImportError:
        raise UserError(f"--optimizer {name} needs {package}, which cannot be imported: {install_hint(package)}") from None
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(parameters, lr=lr, weight_decay=weight_decay, relative_step=False, scale_parameter=False, warmup_init=False)
    raise UserError(f"--optimizer {name}: unknown; choose adamw, adam, adamw8bit, prodigy or adafactor")


def make_scheduler(config, optimizer: torch.optim.Optimizer, total_steps: int):
    """diffusers' `get_scheduler` for `--lr-scheduler`, over `total_steps` optimiser steps."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.lr_scheduler, optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=total_steps,
        num_cycles=config.lr_num_cycles, power=config.lr_power,
    )


def check_schedule_steps(config, state: dict, total_steps: int, path) -> None:
    """A schedule whose shape depends on --steps only continues with the steps it was made for."""
    before = state.get("schedule_steps")
    if before is not None and before != total_steps and config.lr_scheduler in STEP_DEPENDENT:
        raise UserError(f"{path} was written by a run of a {config.lr_scheduler} schedule over {before} optimiser steps, which a different "
                        f"--steps would reshape; resume with the same --steps, or use a new --out")


def make_ema(config, parameters):
    """diffusers' EMAModel over the trained tensors (None without --use-ema)."""
    if not config.use_ema:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(list(parameters), decay=config.ema_decay)


def ema_state(ema) -> dict:
    state = ema.state_dict()
    state["shadow_params"] = [p.detach().cpu().clone() for p in state["shadow_params"]]
    return state


def load_ema_state(ema, state: dict, device, path) -> None:
    if len(state["shadow_params"]) != len(ema.shadow_params) or any(
        a.shape != b.shape for a, b in zip(state["shadow_params"], ema.shadow_params)
    ):
        raise UserError(f"{path} holds an EMA of other tensors than this run trains; use a new --out")
    ema.load_state_dict(state)
    ema.to(device)

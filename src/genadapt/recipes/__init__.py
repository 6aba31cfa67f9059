"""Recipes: the training loops (one per family), distillation and compare, plus what they share.

Shared here, once: the accelerator a run uses, the global-batch draw that makes a run of N processes
the run of one process at N times the batch, and the run-folder record (config.yaml, manifest.json,
run.json) that says what a run is.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from genadapt.errors import UserError


def make_accelerator(mixed_precision: str = "no", gradient_accumulation_steps: int = 1, cpu: bool = False):
    """An `accelerate.Accelerator` for one run: CUDA when present (unless `cpu`), the process group when launched
    by `accelerate launch`/`torchrun`. A second run in one process may ask for another precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        cpu = True  # accelerate forms a CPU (gloo) process group only when asked for the CPU
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision and PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps, cpu=cpu)
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"--mixed-precision {mixed_precision}: {str(exc).splitlines()[0]}") from None


def adapt(config):
    """One adapt run on the family its base belongs to, as the only writer of its folder; returns the loop's summary."""
    import contextlib
    import os

    from genadapt.runfolder import RunLock, prepare_out

    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        prepare_out(config.out, config.data)
    with RunLock(config.out) if main else contextlib.nullcontext():
        if config.family == "gan":
            from genadapt.recipes.train_gan import adapt_gan

            return adapt_gan(config)
        from genadapt.recipes.train import adapt_diffusion

        return adapt_diffusion(config)


def global_slice(draw, batch: int, accelerator):
    """`draw(batch · processes)` from the stream every process shares, then this process's slice: N processes
    at batch B see exactly the batch one process at N·B sees (each a different part of it)."""
    total = batch * accelerator.num_processes
    start = accelerator.process_index * batch
    value = draw(total)
    if isinstance(value, (list, tuple)):
        return type(value)(v[start:start + batch] for v in value)
    return value[start:start + batch]


def process_generators(seed: int, accelerator) -> tuple[torch.Generator, torch.Generator]:
    """(shared, local): `shared` draws the global batch (same on every process), `local` what each process
    draws on its own part (augmentation, loss techniques' extra samples)."""
    shared = torch.Generator().manual_seed(seed)
    local = torch.Generator().manual_seed(seed + 1_000_003 * (accelerator.process_index + 1))
    return shared, local


def gather_states(generator: torch.Generator, accelerator) -> list[torch.Tensor]:
    from accelerate.utils import gather_object

    return gather_object([generator.get_state()]) if accelerator.num_processes > 1 else [generator.get_state()]


def restore_generators(state: dict, shared: torch.Generator, local: torch.Generator, accelerator, path: Path) -> None:
    if len(state["local_generators"]) != accelerator.num_processes:
        raise UserError(f"{path} was written by {len(state['local_generators'])} process(es); resume with the same number")
    shared.set_state(state["shared_generator"])
    local.set_state(state["local_generators"][accelerator.process_index])


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().cpu().clone() for name, parameter in model.named_parameters() if parameter.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor], path: Path) -> None:
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            if name not in parameters or parameters[name].shape != value.shape:
                raise UserError(f"{path} holds {name} {tuple(value.shape)}, which this model does not have; use a new --out")
            parameters[name].copy_(value)


def write_run_record(out: Path, config, family: str, resolved: dict | None = None, **extra) -> None:
    """config.yaml (what the run used: `resolved`, else the config's own), run.json (what the run is); manifest.json
    is written by the loop."""
    from genadapt.runs import write_json, write_yaml

    write_yaml(out / "config.yaml", resolved or config.resolved())
    write_json(out / "run.json", {
        "kind": "adapt", "family": family, "train": config.train, "losses": [spec.name for spec in config.loss],
        "base": config.base, "allow_pickle": bool(getattr(config, "allow_pickle", False)), **extra,
    })


def append_log(out: Path, record: dict) -> None:
    """log.jsonl grows at every step, so a killed run keeps its history up to its last step."""
    from genadapt.runfolder import disk_full_error

    try:
        with (out / "log.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
    except OSError as exc:
        full = disk_full_error(exc, out / "log.jsonl")
        if full is not None:
            raise full from None
        raise


def rewrite_log(out: Path, history: list[dict]) -> None:
    from genadapt.runs import write_text

    write_text(out / "log.jsonl", "".join(json.dumps(record) + "\n" for record in history))


def check_finite(terms: dict[str, torch.Tensor], step: int, out: Path) -> None:
    """A non-finite loss term stops the run before it can reach the weights; the last checkpoint is kept."""
    for name, value in terms.items():
        if not torch.isfinite(value.detach()).all():
            raise UserError(f"step {step}: loss term {name} is {float(value.detach())}; the run diverged (lower --learning-rate or the term's weight). The last checkpoint in {out / 'checkpoints'} is kept")


def check_ranks_agree(model, accelerator) -> str:
    """A digest of the trained tensors, the same on every process or the run stops: data-parallel training
    that let the processes drift apart would save one process's weights as if they were the run's."""
    import hashlib

    from accelerate.utils import gather_object

    digest = hashlib.sha256()
    for name, value in sorted(trainable_state(model).items()):
        digest.update(name.encode() + value.float().numpy().tobytes())
    mine = digest.hexdigest()
    if accelerator.num_processes > 1:
        everyone = gather_object([mine])
        if len(set(everyone)) != 1:
            raise UserError(f"the {accelerator.num_processes} processes ended with different weights ({', '.join(d[:8] for d in everyone)}); this is a bug, please report it")
    return mine


class GracefulStop:
    """Ctrl-C (SIGINT) or SIGTERM while training: the current step finishes, the loop checkpoints and stops
    with a resume hint. A second Ctrl-C stops at once (the last checkpoint is still there)."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.flag = False
        self.previous = {}

    def _handle(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True

    def __enter__(self) -> "GracefulStop":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name)
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def requested(self, accelerator) -> bool:
        """Whether any process was asked to stop (every process stops at the same step)."""
        if accelerator.num_processes == 1:
            return self.flag
        flag = torch.tensor([1.0 if self.flag else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def stopped(step: int, out: Path):
    from genadapt.errors import Interrupted

    return Interrupted(f"interrupted after step {step}: checkpoint saved in {Path(out) / 'checkpoints'}; rerun the same command to resume")


def effective_lr(config, accelerator) -> float:
    """The learning rate the optimiser gets: --scale-lr multiplies it by the images each optimiser step sees, as
    diffusers' example scripts do."""
    if not getattr(config, "scale_lr", False):
        return config.lr
    return config.lr * config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes


def sample_interval(config, images: int) -> int:
    """Steps between sample grids: --sample-every, or --validation-epochs passes over the shots."""
    if getattr(config, "validation_epochs", None):
        import math

        return config.validation_epochs * max(1, math.ceil(images / config.batch_size))
    return config.sample_every


def add_terms(terms: dict, total: torch.Tensor, weight: float, produced: dict) -> torch.Tensor:
    """Log a loss technique's terms by name, unweighted, and add them, weighted, to the step's total."""
    for name, value in produced.items():
        terms[name] = value
        total = total + weight * value.to(total.device)
    return total


def end_of_step(done: int, model, config, accelerator, stop, validation, snapshot, checkpoint, bar, out: Path) -> None:
    """What both loops do after a step: a validation check when due, a checkpoint (periodic, the last step, an early
    stop, or before an interrupt) and, when asked to stop, the interrupt with its resume hint."""
    if validation is not None and validation.due(done):
        check = validation.check(done, model, snapshot)
        bar.write(f"step {done}: validation KID {check['kid']:.4f}, copies {check['copy_rate']:.0%}{' (best)' if check['best'] else ''}")
    stopping = stop.requested(accelerator)
    early = validation is not None and validation.stop
    if done % config.checkpointing_steps == 0 or done == config.steps or stopping or early:
        checkpoint(done)
    if stopping and done != config.steps:
        raise stopped(done, out)

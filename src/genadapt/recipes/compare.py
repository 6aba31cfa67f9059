"""`genadapt compare`: which technique fits my data budget? Every technique at every shot count, R times, scored
on paired statistics, decided by a declared rule.

The plan. A short timing probe per technique (or `--steps`) sets one step count for all runs; what the budget
allows decides the number of replicates R (up to `--replicates`) before the steps, and runs that still do not
fit are dropped and listed. Replicate r of a technique trains with seed + r: another draw of the k shots where
the pool allows, another initialisation, other noise.

The learning rate. Before the real runs, each technique trains `--lr-probe` short runs (default 3, at its
default rate and 3x either side; `--lr-probe-steps`, default a quarter of the run steps) on the largest shot
count; each is scored twice by validation KID on held-out pool images (never the reference), and the rate of the
best score under the copy ceiling trains every real run of that technique (`lr_probe.json`, shown in the report).
A short probe favours fast rates; the real runs' best-step validation stops one that overshoots later. It cannot see
a regulariser's late gain (docs/benchmarks.md: CDC's rate chosen on a 0.06 difference at 150 of 800 steps).

The evidence. Each run is an ordinary `adapt` run folder, evaluated against the reference with its shots as the
training set (`eval.json`), and the unadapted base is sampled once per replicate. Every run of one replicate is
sampled from the same seeds and prompts positions and scored on the same reference half-samples, so differences
between techniques are paired (`genadapt.eval.paired`): A beats B when the 95% interval of the paired KID
difference, pooled over replicates, lies below 0; each comparison states the smallest difference it could have
detected.

The rule, per shot count: a technique is disqualified when its mean copy rate exceeds `--copy-ceiling` or its
intra-cluster diversity falls below `--diversity-floor` times the lesser of the held-out target images' own (the same
measure on the reference, clustered around the same shots) and the unadapted base's; among the rest, the lowest mean KID
wins; the techniques it does not beat are tied with it, and among the tied that beat the unadapted base (all the
tied, if none does) the cheapest (artifact bytes, then CPU-minutes) is recommended. When even the recommended one
is worse than the base (its paired interval above 0), the verdict says to keep the base. A killed compare resumes: finished runs keep their `eval.json`, an interrupted run
resumes from its checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from genadapt.config import AdaptConfig, CompareConfig
from genadapt.errors import UserError
from genadapt.models import base_samples, run_samples
from genadapt.recipes import adapt
from genadapt.runs import write_json


@dataclass
class ComparePlan:
    techniques: list[str]
    shots: list[int]
    steps: int
    seconds_per_step: dict[str, float]
    seconds_per_sample: float
    runs: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    estimated_minutes: float = 0.0
    replicates: int = 1


def run_name(technique: str, shots: int, replicate: int = 0) -> str:
    return f"{technique}-{shots}shot-r{replicate}"


def reading(settings: CompareConfig) -> dict:
    """How compare reads --data and --reference: as its adapt runs read their shots (fit, background, caption files)."""
    return {"fit": settings.fit, "background": settings.background, "caption_extension": settings.caption_extension,
            "caption_column": settings.caption_column, "strict": settings.strict}


def parse_run_name(name: str) -> tuple[str, int, int]:
    technique, shots, replicate = name.rsplit("-", 2)
    return technique, int(shots.removesuffix("shot")), int(replicate.removeprefix("r"))


def adapt_config(settings: CompareConfig, technique: str, shots: int, steps: int, out: Path, replicate: int = 0,
                 learning_rate: float | None = None) -> AdaptConfig:
    """The adapt run `compare` makes of a technique: its compare preset (registered, or a --variant's) on the shared
    settings. Replicate r trains with seed + r: another draw of the k shots where the pool allows, another
    initialisation and other noise."""
    values = {**shared_settings(settings, shots, steps, out, replicate), **settings.preset(technique)}
    if learning_rate is not None:
        values["learning_rate"] = learning_rate
    return AdaptConfig(**values)


def shared_settings(settings: CompareConfig, shots: int, steps: int, out: Path, replicate: int = 0) -> dict:
    """What every run of a compare sets alike (a --variant may not set these: config.VARIANT_TRAINING)."""
    from genadapt.families import family_module

    family = settings.family
    return {
        "base": settings.base, "data": settings.data, "shots": shots, "seed": settings.seed + replicate, "steps": steps,
        "batch_size": settings.batch_size, "checkpointing_steps": max(10, steps // 4), "out": out,
        # Best step by validation on the pool images that are not this run's shots (never the final reference).
        # Four cheap checks a run (--validation-samples, 16 by default) find the best step at a fraction of the training's cost.
        "validate_every": max(1, steps // 4) if settings.validate_every is None else settings.validate_every,
        "validation_samples": settings.validation_samples, "patience": settings.patience, "copy_ceiling": settings.copy_ceiling,
        **reading(settings),  # a GAN's caption flags are their defaults here (CompareConfig refuses others)
        **({"caption": settings.caption} if family == "diffusion" else {}),
        **family_module(family).COMPARE,
    }


LR_PROBE_FACTOR = 3.0
PROBE_CHECKS, PROBE_VALIDATION_SAMPLES = 2, 32  # a probe run is validated at half way and at its end


def probe_rates(center: float, count: int) -> list[float]:
    """`count` learning rates 3x apart around `center`, the default first to be kept when the count is even."""
    exponents = sorted([0, -1, 1, -2, 2, -3, 3][:count])
    return [center * LR_PROBE_FACTOR ** e for e in exponents]


def lr_probe_names(settings: CompareConfig, technique: str | None = None) -> list[str]:
    """The probe's run names (of one technique, or of all); none with --lr-probe 1."""
    if settings.lr_probe < 2:
        return []
    chosen = settings.techniques if technique is None else [technique]
    return [f"{t}-{max(settings.shots)}shot-lr{i}" for t in chosen for i in range(settings.lr_probe)]


def lr_probe_steps(settings: CompareConfig, steps: int) -> int:
    """Even, so the probe's two checks fall at half way and on its last step."""
    chosen = settings.lr_probe_steps or min(steps, max(settings.min_steps, steps // 4))
    return chosen if chosen < 2 else chosen - chosen % 2


def probe_one(settings_values: dict, name: str, steps: int) -> dict:
    """One learning-rate probe run into OUT/lr_probe/NAME: `steps` steps at one rate, validated at half way and at the
    end on held-out pool images (32 samples). Its score is the best validation KID under the copy ceiling."""
    from genadapt.runs import use_cpu

    use_cpu()
    settings = CompareConfig.model_validate(settings_values)
    technique, shots, index = name.rsplit("-", 2)
    shots, index = int(shots.removesuffix("shot")), int(index.removeprefix("lr"))
    run = Path(settings.out) / "lr_probe" / name
    record_path = run / "probe.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    config = adapt_config(settings, technique, shots, steps, run)
    center = config.learning_rate
    rate = probe_rates(center, settings.lr_probe)[index]
    config = config.model_copy(update={"learning_rate": rate, "validate_every": max(1, steps // PROBE_CHECKS),
                                       "validation_samples": PROBE_VALIDATION_SAMPLES, "patience": 0,
                                       "checkpointing_steps": steps, "num_validation_images": 1})
    adapt(config)
    summary = json.loads((run / "summary.json").read_text())
    validation = summary.get("validation") or {}
    record = {"technique": technique, "shots": shots, "learning_rate": rate, "default": center, "steps": steps,
              "kid": validation.get("best_kid"), "best_step": validation.get("best_step"),
              "train_minutes": round(summary["train_seconds"] / 60, 2)}
    write_json(record_path, record)
    return record


def choose_rates(records: dict[str, dict], failed: dict[str, str], settings: CompareConfig, steps: int) -> dict:
    """Per technique, the probe's rates and scores and the chosen one: the lowest validation KID under the copy
    ceiling; the default rate when no probe run produced one."""
    chosen = {}
    for technique in settings.techniques:
        names = lr_probe_names(settings, technique)
        rows = [records[n] for n in names if n in records]
        scored = [r for r in rows if r["kid"] is not None]
        default = rows[0]["default"] if rows else None
        best = min(scored, key=lambda r: r["kid"]) if scored else None
        chosen[technique] = {
            "rates": [r["learning_rate"] for r in rows], "kid": [r["kid"] for r in rows], "best_step": [r["best_step"] for r in rows],
            "default": default, "chosen": best["learning_rate"] if best else default,
            "failed": [failed[n] for n in names if n in failed],
        }
    return {"steps": steps, "shots": max(settings.shots), "factor": LR_PROBE_FACTOR, "techniques": chosen}


def chosen_rate(settings: CompareConfig, technique: str) -> float | None:
    """The learning rate compare's probe chose for `technique` (None: no probe ran, the preset's rate)."""
    path = Path(settings.out) / "lr_probe.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())["techniques"].get(technique, {}).get("chosen")


def probe(settings: CompareConfig, scratch: Path) -> tuple[dict[str, float], float]:
    """Seconds per training step of each technique, and seconds per generated sample."""
    from genadapt.data import load_dataset

    # One-off costs (rendering a built-in set, first model load) must not count as per-run setup.
    load_dataset(settings.data, **reading(settings), resolution=32)
    load_dataset(settings.reference, **reading(settings), resolution=32)
    base_samples(settings.base, 1, ["probe"], steps=1)
    per_step = {}
    for technique in settings.techniques:
        config = adapt_config(settings, technique, min(settings.shots), settings.probe_steps, scratch / technique)
        config.num_validation_images = 1
        config.sample_steps = 1
        if config.validate_every:  # its set-up is timed; no check runs inside the timed steps (make_plan charges them)
            config.validate_every = settings.probe_steps + 1
        shutil.rmtree(scratch / technique, ignore_errors=True)  # an interrupted compare's probe would resume, timing fewer steps
        started = time.time()
        adapt(config)
        summary = json.loads((scratch / technique / "summary.json").read_text())
        # Setup (loading, encoding, Fisher, class images) and the first step's warm-up are paid once per run; the later
        # steps price a step. A GAN's first step also runs the lazy R1 (1.8x a later step on pocket-stylegan2), which
        # recurs every R1_INTERVAL steps: its excess is spread over them (warm-up included: an over-, not under-charge).
        train, later_steps = summary["train_seconds"], settings.probe_steps - 1
        once = summary["first_step_seconds"] if later_steps else 0.0
        per_step[technique] = (train - once) / (later_steps or 1)
        if later_steps and settings.family == "gan":
            from genadapt.families.stylegan2 import R1_INTERVAL

            per_step[technique] += max(0.0, once - per_step[technique]) / R1_INTERVAL
        per_step[technique + ":setup"] = time.time() - started - train + once
    started = time.time()
    base_samples(settings.base, 16, ["probe"], steps=settings.sample_steps)
    return per_step, (time.time() - started) / 16


def make_plan(settings: CompareConfig, per_step: dict[str, float], per_sample: float) -> ComparePlan:
    """The most replicates (up to --replicates) at which every run still gets --min-steps, then one step count for all
    runs that fits the budget; with one replicate too many, the most expensive runs are dropped first."""
    from genadapt.families import family_module

    budget = settings.budget_minutes * 60
    cap = settings.max_steps or (1000 if settings.family == "gan" else 400)

    probes = settings.lr_probe if settings.lr_probe > 1 else 0
    # The learning-rate probe: `probes` runs a technique, a quarter of the steps each (or --lr-probe-steps), each validated.
    probe_share = 0.0 if settings.lr_probe_steps else 0.25

    # Each run's validation: four checks by default, one every --validate-every steps when it is given, none at 0.
    # A check samples at the runs' sampler steps (diffusion: the family's COMPARE setting), not at --sample-steps.
    every = settings.validate_every
    check_share = family_module(settings.family).COMPARE.get("sample_steps", settings.sample_steps) / settings.sample_steps
    per_check = settings.validation_samples * per_sample * check_share

    def checks(steps):  # as the runs do: a check every validate_every steps, steps / 4 by default (more than 4 under 16 steps)
        return 0 if every == 0 or steps < 1 else steps // (every or max(1, steps // 4))

    def cost(selected, steps, replicates):
        eval_seconds = (len(selected) + replicates) * settings.samples * per_sample + len(selected) * checks(steps) * per_check
        probe_steps = settings.lr_probe_steps or steps * probe_share
        probe_seconds = probes * sum(per_step[t] * probe_steps + per_step[t + ":setup"] + PROBE_CHECKS * PROBE_VALIDATION_SAMPLES * per_sample * check_share
                                    for t in settings.techniques)
        return sum(per_step[t] * steps + per_step[t + ":setup"] for t, _, _ in selected) + eval_seconds + probe_seconds

    def fitting_steps(selected, replicates):
        per_planned_step = (sum(per_step[t] for t, _, _ in selected) + probes * probe_share * sum(per_step[t] for t in settings.techniques)
                            + (len(selected) * per_check / every if every else 0))
        fixed = cost(selected, 0, replicates) + (len(selected) * 4 * per_check if every is None else 0)
        steps = int((budget - fixed) / max(1e-9, per_planned_step))
        while steps > 0 and cost(selected, steps, replicates) > budget:  # under 16 steps a run checks more than 4 times
            steps -= 1
        return steps

    dropped = []
    for replicates in range(settings.replicates, 0, -1):
        runs = [(t, s, r) for r in range(replicates) for t in settings.techniques for s in settings.shots]
        if fitting_steps(runs, replicates) >= settings.min_steps:
            break
    while runs:
        steps = fitting_steps(runs, replicates)
        if steps >= settings.min_steps:
            steps = min(steps, cap)
            break
        worst = max(runs, key=lambda run: (per_step[run[0]], run[1]))
        runs.remove(worst)
        dropped.append(f"{run_name(*worst)} (at least {settings.min_steps} steps for every run did not fit {settings.budget_minutes:g} min)")
    else:
        probe = ", ".join(f"{k} {v:.2f}s" for k, v in per_step.items())
        raise UserError(f"--budget-minutes {settings.budget_minutes:g} fits no run (probe: {probe}, {per_sample:.2f}s per sample); raise the budget")
    return ComparePlan(
        techniques=settings.techniques,
        shots=settings.shots,
        steps=steps,
        seconds_per_step={k: round(v, 4) for k, v in per_step.items()},
        seconds_per_sample=round(per_sample, 4),
        runs=[run_name(t, s, r) for t, s, r in runs],
        dropped=dropped,
        estimated_minutes=round(cost(runs, steps, replicates) / 60, 2),
        replicates=replicates,
    )


def hold_out(settings: CompareConfig, out: Path) -> CompareConfig:
    """Without --reference: split the data once, by seed, into a shot pool and a held-out reference,
    written as folders (images + metadata.jsonl) so every run and the report can point at them."""
    import shutil

    import numpy as np
    from PIL import Image

    from genadapt.data import load_dataset

    pool_dir, reference_dir = out / "data" / "pool", out / "data" / "reference"
    if not (reference_dir / "metadata.jsonl").is_file():
        builtin = settings.data.startswith("builtin:")
        images = load_dataset(settings.data, **reading(settings), resolution=32 if builtin else 8, caption=settings.caption)
        count = max(2, int(round(len(images) * settings.reference_share)))
        if len(images) - count < max(settings.shots):
            raise UserError(
                f"--data {settings.data}: {len(images)} images cannot give {max(settings.shots)} shots and a held-out reference of {count}; pass --reference or fewer --shots"
            )
        order = np.random.default_rng(settings.seed).permutation(len(images))
        for folder, indices in ((reference_dir, order[:count]), (pool_dir, order[count:])):
            folder.mkdir(parents=True, exist_ok=True)
            rows = []
            for index in sorted(int(i) for i in indices):
                record = images.records[index]
                if builtin:
                    name = f"{index:05d}.png"
                    Image.fromarray(images.pixels[index]).save(folder / name)
                else:  # the user's own file, untouched: each model resizes it to its resolution
                    name = f"{index:05d}{Path(record.id).suffix}"
                    shutil.copy2(Path(settings.data) / record.id, folder / name)
                rows.append(json.dumps({"file_name": name, "text": images.records[index].caption}))
            (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    # The split folders carry each image's caption in metadata.jsonl's text column.
    return settings.model_copy(update={"data": str(pool_dir), "reference": str(reference_dir), "caption": None, "caption_column": "text"})


def compare(settings: CompareConfig) -> dict:
    """Plan, run, evaluate, decide, report, as the only writer of `settings.out`. Returns what results.json holds."""
    from genadapt.runfolder import RunLock, prepare_out

    prepare_out(settings.out, settings.data)
    with RunLock(settings.out):
        return _compare(settings)


def _features_of(images, path: Path):
    """The eval encoder's features of a sample set, kept beside its evaluation so a resumed compare reuses them."""
    from safetensors.torch import load_file

    from genadapt.eval.features import cached_features, get_extractor
    from genadapt.runs import save_safetensors

    if path.is_file():
        return load_file(path)["features"]
    features = cached_features(get_extractor("pocket"), images).float().cpu()
    save_safetensors(path, {"features": features})
    return features


def _check_resumed_variants(settings: CompareConfig, out: Path) -> None:
    """A resumed compare keeps its plan and its finished runs: each variant they hold must still be given, with the
    settings it had (or old runs pass for new settings), and a variant the plan never had would silently not run."""
    saved, plan_path = out / "settings.json", out / "plan.json"
    if not saved.is_file():
        return
    before = {}
    for spec in json.loads(saved.read_text()).get("variant") or []:
        name, technique, preset = settings.resolve_variant(spec)
        before[name] = (spec, (technique, preset))
    now = settings.variants()
    planned = set(json.loads(plan_path.read_text())["techniques"]) if plan_path.is_file() else None
    for name, (spec, meaning) in before.items():
        if name not in now and planned is not None and name in planned:
            raise UserError(f"--variant {name}: {out} holds runs of it; pass --variant {spec} again, or use a new --out")
        if name in now and now[name] != meaning:
            raise UserError(f"--variant {name}: {out} holds runs of {name} as {spec}; give the new settings another name or use a new --out")
    for name in now:
        if planned is not None and name not in planned:
            raise UserError(f"--variant {name}: {out} was planned without it (its plan.json); compare it in a new --out")


def _compare(settings: CompareConfig) -> dict:
    from tqdm.auto import tqdm

    from genadapt.data import load_dataset
    from genadapt.eval.evaluate import evaluate
    from genadapt.eval.report import write_compare_report

    out = Path(settings.out)
    if settings.reference is None:
        settings = hold_out(settings, out)
    _check_resumed_variants(settings, out)
    plan_path = out / "plan.json"
    if plan_path.is_file():
        plan = ComparePlan(**json.loads(plan_path.read_text()))  # resume: keep the plan the finished runs used
    elif settings.steps is not None:
        replicates = settings.replicates
        runs = [run_name(t, s, r) for r in range(replicates) for t in settings.techniques for s in settings.shots]
        plan = ComparePlan(settings.techniques, settings.shots, settings.steps, {}, 0.0, runs=runs, estimated_minutes=0.0, replicates=replicates)
        write_json(plan_path, asdict(plan))
    else:
        probe_started = time.time()
        per_step, per_sample = probe(settings, out / "probe")
        probe_minutes = (time.time() - probe_started) / 60
        remaining = settings.model_copy(update={"budget_minutes": settings.budget_minutes - probe_minutes})
        plan = make_plan(remaining, per_step, per_sample)
        write_json(plan_path, asdict(plan))
    write_json(out / "settings.json", settings.model_dump(mode="json"))

    reference = load_dataset(settings.reference, **reading(settings), resolution=32)
    results = {"settings": json.loads((out / "settings.json").read_text()), "plan": asdict(plan), "runs": {}}
    features = {"reference": _features_of(reference, out / "reference_features.safetensors")}
    started = time.time()
    bar = tqdm(total=len(plan.runs) + plan.replicates + len(lr_probe_names(settings)), desc="compare", unit="run")
    for replicate in range(plan.replicates):
        seed = settings.seed + replicate
        folder = out / ("base" if replicate == 0 else f"base-r{replicate}")
        samples = None
        for shots in settings.shots:
            name = f"base-{shots}shot-r{replicate}"
            path = folder / f"eval-{shots}shot.json"
            if not path.is_file():
                if samples is None:  # the base is sampled once per replicate, prompted with its largest shot set's captions
                    largest = load_dataset(settings.data, **reading(settings), resolution=32, shots=max(settings.shots), seed=seed, caption=settings.caption)
                    samples = base_samples(settings.base, settings.samples, largest.captions, seed, settings.sample_steps)
                train_shots = load_dataset(settings.data, **reading(settings), resolution=32, shots=shots, seed=seed)
                evaluation = evaluate(samples, reference, train_shots, out=folder if shots == max(settings.shots) else None)
                write_json(path, {"technique": "base", "shots": shots, "replicate": replicate, "evaluation": evaluation})
            results["runs"][name] = json.loads(path.read_text())
        features[f"base-r{replicate}"] = _features_of(samples, folder / "sample_features.safetensors")
        bar.update(1)
    results["runs"]["base"] = results["runs"][f"base-{max(settings.shots)}shot-r0"]
    results["lr_probe"] = learning_rate_probe(settings, plan, out, bar)
    todo = [name for name in plan.runs if not (out / "runs" / name / "eval.json").is_file()]
    for name in plan.runs:
        if name not in todo:
            bar.update(1)
    failed = {}
    for name, outcome in execute(settings, plan.steps, todo):
        if isinstance(outcome, BaseException):
            failed[name] = failure_text(outcome)
            tqdm.write(f"{name}: failed after retries ({failed[name]})")
        else:
            tqdm.write(f"{name}: KID {outcome['evaluation']['kid']['value']:.4f}, {outcome['cpu_minutes']} CPU-min")
        bar.update(1)
    for name in plan.runs:
        if name in failed:
            continue
        results["runs"][name] = json.loads((out / "runs" / name / "eval.json").read_text())
        features[name] = _features_of(None, out / "runs" / name / "eval" / "sample_features.safetensors")
    results["failed"] = failed
    bar.close()
    results["recommendation"] = recommend(results, plan, settings, features)
    results["wall_minutes_this_session"] = round((time.time() - started) / 60, 2)
    write_json(out / "results.json", results)
    write_compare_report(results, out)
    if failed and len(failed) == len(plan.runs):
        first, reason = next(iter(failed.items()))
        hint = ("; a script that calls compare with jobs > 1 must run it under `if __name__ == \"__main__\":` (each worker process imports the script)"
                if "BrokenProcessPool" in reason else "")
        raise UserError(f"compare: all {len(failed)} runs failed, so nothing can be recommended; the first, {first}: {reason}{hint} (each run's error: {out / 'results.json'})")
    return results


def learning_rate_probe(settings: CompareConfig, plan: ComparePlan, out: Path, bar) -> dict | None:
    """Run (or resume) the learning-rate probe and write lr_probe.json; None when --lr-probe is 1."""
    from tqdm.auto import tqdm

    names = lr_probe_names(settings)
    path = out / "lr_probe.json"
    if not names:
        return None
    if path.is_file():
        bar.update(len(names))
        return json.loads(path.read_text())
    from genadapt.data import load_dataset

    pool = len(load_dataset(settings.data.split("?", 1)[0], **reading(settings), resolution=32))
    if pool - max(settings.shots) < 4:
        raise UserError(f"--lr-probe {settings.lr_probe}: the probe validates on --data images that are not the {max(settings.shots)} shots, "
                        f"and {settings.data} holds {pool}; pass --lr-probe 1 (the default rates) or more images")
    steps = lr_probe_steps(settings, plan.steps)
    records, failed = {}, {}
    for name, outcome in execute(settings, steps, names, worker=probe_one):
        if isinstance(outcome, BaseException):
            failed[name] = failure_text(outcome)
            tqdm.write(f"{name}: probe failed ({failed[name]})")
        else:
            records[name] = outcome
            kid = "no check under the copy ceiling" if outcome["kid"] is None else f"validation KID {outcome['kid']:.4f}"
            tqdm.write(f"{name}: learning rate {outcome['learning_rate']:.2g}, {kid}")
        bar.update(1)
    probe = choose_rates(records, failed, settings, steps)
    write_json(path, probe)
    return probe


def run_one(settings_values: dict, name: str, steps: int) -> dict:
    """Adapt, sample and evaluate one run of a compare into OUT/runs/NAME/eval.json (resumable: a finished run is
    read back, an interrupted one resumes from its checkpoint). A plain function of plain values, so a process
    pool or a Ray worker can run it where the paths are visible."""
    from genadapt.data import load_dataset
    from genadapt.eval.evaluate import evaluate
    from genadapt.runs import use_cpu

    use_cpu()
    settings = CompareConfig.model_validate(settings_values)
    technique, shots, replicate = parse_run_name(name)
    run = Path(settings.out) / "runs" / name
    eval_path = run / "eval.json"
    if eval_path.is_file():
        return json.loads(eval_path.read_text())
    cpu_started = time.process_time()
    config = adapt_config(settings, technique, shots, steps, run, replicate, learning_rate=chosen_rate(settings, technique))
    adapt(config)
    reference = load_dataset(settings.reference, **reading(settings), resolution=32)
    train_shots = load_dataset(settings.data, **reading(settings), resolution=32, shots=shots, seed=settings.seed + replicate)
    samples = run_samples(run, settings.samples, settings.seed + replicate, steps=settings.sample_steps)
    _features_of(samples, run / "eval" / "sample_features.safetensors")
    evaluation = evaluate(samples, reference, train_shots, out=run / "eval")
    summary = json.loads((run / "summary.json").read_text())
    record = {
        "technique": technique, "shots": shots, "replicate": replicate, "steps": steps, "learning_rate": config.learning_rate,
        "trainable_parameters": summary["trainable_parameters"], "artifact_bytes": summary["artifact_bytes"],
        "cpu_minutes": round((time.process_time() - cpu_started) / 60, 2), "train_minutes": round(summary["train_seconds"] / 60, 2),
        "best_step": (summary.get("validation") or {}).get("best_step"), "trained_steps": summary.get("trained_steps", steps),
        "evaluation": evaluation,
    }
    write_json(eval_path, record)
    return record


def execute(settings: CompareConfig, steps: int, names: list[str], worker=None):
    """Yield (name, what `worker` returned or the exception it failed with) as runs finish, on the chosen executor.
    `worker(settings_values, name, steps)`: `run_one` (a real run) or `probe_one` (a learning-rate probe run)."""
    worker = worker or run_one
    values = settings.model_dump(mode="json")
    if settings.executor == "ray":
        from genadapt.recipes.ray_executor import run_on_ray

        yield from run_on_ray(settings, values, steps, names, worker)
        return
    if settings.jobs <= 1:
        for name in names:
            yield name, worker(values, name, steps)  # in-process: errors are the user's to see at once
        return
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # One thread per job: N jobs on N cores never stall each other at OpenMP barriers.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(max_workers=settings.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(worker, values, name, steps): name for name in names}
        for future in as_completed(futures):
            try:
                yield futures[future], future.result()
            except Exception as exc:  # noqa: BLE001 - reported as a failed run, never dropped
                yield futures[future], exc


def failure_text(exc: BaseException) -> str:
    """A failed run's error in one line, for the report."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _usable(value) -> float | None:
    """A diversity that can be a yardstick: a finite positive number (NaN when no cluster had two members)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else None


def recommend(results: dict, plan: ComparePlan, settings: CompareConfig, features: dict) -> list[dict]:
    """Per shot count, the declared rule of the module docstring, with its evidence."""
    from genadapt.eval.paired import PairedKID, pooled_difference

    runs = results["runs"]
    reference = features["reference"]
    scorers = {r: PairedKID(reference, settings.samples, seed=settings.seed + r) for r in range(plan.replicates)}
    advice = []
    for shots in plan.shots:
        by_technique: dict[str, list[int]] = {}
        for name in plan.runs:
            technique, s, r = parse_run_name(name)
            if s == shots and name in runs:
                by_technique.setdefault(technique, []).append(r)
        if not by_technique:
            continue
        scores = {t: {r: scorers[r].scores(features[run_name(t, shots, r)]) for r in reps} for t, reps in by_technique.items()}
        base_scores = {r: scorers[r].scores(features[f"base-r{r}"]) for r in range(plan.replicates)}
        base_runs = [runs[f"base-{shots}shot-r{r}"] for r in range(plan.replicates)]
        base_diversity = _mean([b["evaluation"].get("intra_cluster_diversity", {}).get("value", 0.0) for b in base_runs])
        # The floor's yardstick is the lesser of the target's own diversity and the base's. A base trained on another domain
        # can be more diverse than the target can be (the pocket GAN's emoji: 0.40 against real flags' 0.13-0.16), and half
        # of it would disqualify a perfect generator of the target; a base less diverse than the target (blurrier, smaller)
        # bounds what any of its adaptations can reach.
        # A base eval.json from before reference_diversity existed (a resumed compare) has none: the base's is used, and said.
        real = [_usable((b["evaluation"].get("reference_diversity") or {}).get("value")) for b in base_runs]
        real = [v for v in real if v is not None]
        target_diversity = _mean(real) if real else None
        usable_base = _usable(base_diversity)
        use_target = target_diversity is not None and (usable_base is None or target_diversity <= usable_base)
        yardstick = (target_diversity, "the held-out target images'") if use_target else (usable_base or 0.0, "the base's")

        def paired(a: str, b: str | None) -> dict:
            reps = sorted(set(scores[a]) & (set(scores[b]) if b else set(base_scores)))
            other = scores[b] if b else base_scores
            return pooled_difference([scores[a][r] for r in reps], [other[r] for r in reps])

        table = {}
        for technique, reps in by_technique.items():
            evaluations = [runs[run_name(technique, shots, r)] for r in reps]
            kids = [scores[technique][r][0] for r in reps]
            copy_rate = _mean([e["evaluation"].get("memorisation", {}).get("copy_rate", 0.0) for e in evaluations])
            diversity = _mean([e["evaluation"].get("intra_cluster_diversity", {}).get("value", 0.0) for e in evaluations])
            reasons = []
            if copy_rate > settings.copy_ceiling:
                reasons.append(f"copies {copy_rate:.0%} of its samples (ceiling {settings.copy_ceiling:.0%})")
            if yardstick[0] > 0 and diversity < settings.diversity_floor * yardstick[0]:
                reasons.append(f"diversity {diversity:.3f} is below {settings.diversity_floor:g}x {yardstick[1]} {yardstick[0]:.3f}")
            table[technique] = {
                "technique": technique, "replicates": len(reps), "kid": _mean(kids), "kid_per_replicate": kids,
                "kid_spread": (max(kids) - min(kids)) if len(kids) > 1 else 0.0, "copy_rate": copy_rate, "diversity": diversity,
                "trainable_parameters": evaluations[0]["trainable_parameters"], "artifact_bytes": _mean([e["artifact_bytes"] for e in evaluations]),
                "cpu_minutes": _mean([e["cpu_minutes"] for e in evaluations]), "vs_base": paired(technique, None),
                "disqualified": reasons,
            }
        qualified = sorted((t for t in table if not table[t]["disqualified"]), key=lambda t: table[t]["kid"])
        entry = {"shots": shots, "techniques": table, "base_kid": _mean([base_scores[r][0] for r in base_scores]),
                 "base_diversity": base_diversity, "target_diversity": target_diversity,
                 "rule": {"copy_ceiling": settings.copy_ceiling, "diversity_floor": settings.diversity_floor,
                          "diversity_yardstick": "target" if use_target else "base",
                          "tie_break": "among the tied that beat the base (all of them if none does): smallest artifact, then fewest CPU-minutes"}}
        if not qualified:
            entry.update({"technique": None, "tied_with": [], "comparisons": {}})
            advice.append(entry)
            continue
        winner = qualified[0]
        comparisons = {other: paired(winner, other) for other in qualified[1:]}
        tied = [other for other, result in comparisons.items() if result["ci_high"] >= 0]
        # The tie-break may not trade a technique shown to beat the base for one that is not.
        beating = [t for t in [winner, *tied] if table[t]["vs_base"]["ci_high"] < 0]
        pick = min(beating or [winner, *tied], key=lambda t: (table[t]["artifact_bytes"], table[t]["cpu_minutes"]))
        entry.update({
            "fidelity_winner": winner, "technique": pick, "tied_with": tied, "comparisons": comparisons,
            "kid": table[pick]["kid"], "copy_rate": table[pick]["copy_rate"],
            "beats_base": table[pick]["vs_base"]["ci_high"] < 0,
            "worse_than_base": table[pick]["vs_base"]["ci_low"] > 0,  # then the advice is to keep the base
            "detectable": max([c["detectable"] for c in comparisons.values()] or [table[pick]["vs_base"]["detectable"]]),
            "settings": _used_settings(settings, pick, runs[run_name(pick, shots, by_technique[pick][0])]),
        })
        advice.append(entry)
    return advice


def _used_settings(settings: CompareConfig, technique: str, run: dict) -> dict:
    """The settings to repeat the recommended run: its compare preset, with the learning rate it trained at (a
    variant's technique first)."""
    variants = settings.variants()
    used = {"technique": variants[technique][0]} if technique in variants else {}
    used |= {k: v for k, v in settings.preset(technique).items() if k != "train"}
    if run.get("learning_rate") is not None:
        used["learning_rate"] = run["learning_rate"]
    return used



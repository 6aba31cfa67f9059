"""`genadapt compare`: every technique at every shot count on the user's data, evaluated, reported.

The plan: a short timing probe per technique sets one step count for all runs that fits the
budget (equal steps keep the comparison fair); runs that cannot fit are dropped and listed.
Each run is an ordinary `adapt` run folder, evaluated against the reference with the shots as
training set; the unadapted base is the baseline. A killed compare resumes: finished runs keep
their `eval.json`, an interrupted run resumes from its checkpoint.
"""

from __future__ import annotations

import json
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


def run_name(technique: str, shots: int) -> str:
    return f"{technique}-{shots}shot"


def adapt_config(settings: CompareConfig, technique: str, shots: int, steps: int, out: Path) -> AdaptConfig:
    """The adapt run `compare` makes of a technique: its registered compare preset on the shared settings."""
    from genadapt import techniques
    from genadapt.families import family_module

    family = settings.family
    values = {
        "base": settings.base, "data": settings.data, "shots": shots, "seed": settings.seed, "steps": steps,
        "batch_size": settings.batch_size, "checkpointing_steps": max(10, steps // 4), "out": out,
        **({"caption": settings.caption} if family == "diffusion" else {}),
        **family_module(family).COMPARE,
        **techniques.compare_presets(family)[technique],
    }
    return AdaptConfig(**values)


def probe(settings: CompareConfig, scratch: Path) -> tuple[dict[str, float], float]:
    """Seconds per training step of each technique, and seconds per generated sample."""
    from genadapt.data import load_dataset

    # One-off costs (rendering a built-in set, first model load) must not count as per-run setup.
    load_dataset(settings.data, resolution=32)
    load_dataset(settings.reference, resolution=32)
    base_samples(settings.base, 1, ["probe"], steps=1)
    per_step = {}
    for technique in settings.techniques:
        config = adapt_config(settings, technique, min(settings.shots), settings.probe_steps, scratch / technique)
        config.num_validation_images = 1
        config.sample_steps = 1
        started = time.time()
        adapt(config)
        summary = json.loads((scratch / technique / "summary.json").read_text())
        # Setup (loading, encoding, Fisher, class images) is paid once per run: spread it over the probe's steps.
        per_step[technique] = summary["train_seconds"] / settings.probe_steps
        per_step[technique + ":setup"] = time.time() - started - summary["train_seconds"]
    started = time.time()
    base_samples(settings.base, 16, ["probe"], steps=settings.sample_steps)
    return per_step, (time.time() - started) / 16


def make_plan(settings: CompareConfig, per_step: dict[str, float], per_sample: float) -> ComparePlan:
    """One step count for every run that fits the budget; the most expensive runs are dropped first."""
    runs = [(t, s) for t in settings.techniques for s in settings.shots]
    budget = settings.budget_minutes * 60

    def cost(selected, steps):
        eval_seconds = (len(selected) + 1) * settings.samples * per_sample
        return sum(per_step[t] * steps + per_step[t + ":setup"] for t, _ in selected) + eval_seconds

    dropped = []
    while runs:
        fixed = cost(runs, 0)
        steps = int((budget - fixed) / max(1e-9, sum(per_step[t] for t, _ in runs)))
        if steps >= settings.min_steps:
            steps = min(steps, settings.max_steps or (1000 if settings.family == "gan" else 400))
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
        runs=[run_name(t, s) for t, s in runs],
        dropped=dropped,
        estimated_minutes=round(cost(runs, steps) / 60, 2),
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
        images = load_dataset(settings.data, resolution=32 if builtin else 8, caption=settings.caption)
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
    return settings.model_copy(update={"data": str(pool_dir), "reference": str(reference_dir), "caption": None})


def compare(settings: CompareConfig) -> dict:
    """Plan, run, evaluate, report, as the only writer of `settings.out`. Returns the results dict written to results.json."""
    from genadapt.runfolder import RunLock, prepare_out

    prepare_out(settings.out, settings.data)
    with RunLock(settings.out):
        return _compare(settings)


def _compare(settings: CompareConfig) -> dict:
    from tqdm.auto import tqdm

    from genadapt.data import load_dataset
    from genadapt.eval.evaluate import evaluate
    from genadapt.eval.report import write_compare_report

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    if settings.reference is None:
        settings = hold_out(settings, out)
    plan_path = out / "plan.json"
    if plan_path.is_file():
        plan = ComparePlan(**json.loads(plan_path.read_text()))  # resume: keep the plan the finished runs used
    elif settings.steps is not None:
        runs = [run_name(t, s) for t in settings.techniques for s in settings.shots]
        plan = ComparePlan(settings.techniques, settings.shots, settings.steps, {}, 0.0, runs=runs, estimated_minutes=0.0)
        write_json(plan_path, asdict(plan))
    else:
        probe_started = time.time()
        per_step, per_sample = probe(settings, out / "probe")
        probe_minutes = (time.time() - probe_started) / 60
        remaining = settings.model_copy(update={"budget_minutes": settings.budget_minutes - probe_minutes})
        plan = make_plan(remaining, per_step, per_sample)
        write_json(plan_path, asdict(plan))
    write_json(out / "settings.json", settings.model_dump(mode="json"))

    reference = load_dataset(settings.reference, resolution=32)
    results = {"settings": json.loads((out / "settings.json").read_text()), "plan": asdict(plan), "runs": {}}
    started = time.time()
    bar = tqdm(total=len(plan.runs) + 1, desc="compare", unit="run")
    baseline_path = out / "base" / "eval.json"
    if not baseline_path.is_file():
        shots = load_dataset(settings.data, resolution=32, shots=max(settings.shots), seed=settings.seed, caption=settings.caption)
        samples = base_samples(settings.base, settings.samples, shots.captions, settings.seed, settings.sample_steps)
        evaluation = evaluate(samples, reference, shots, out=out / "base")
        write_json(baseline_path, {"technique": "base", "shots": max(settings.shots), "evaluation": evaluation})
    results["runs"]["base"] = json.loads(baseline_path.read_text())
    bar.update(1)
    for name in plan.runs:
        technique, shots = name.rsplit("-", 1)[0], int(name.rsplit("-", 1)[1].replace("shot", ""))
        run = out / "runs" / name
        eval_path = run / "eval.json"
        if not eval_path.is_file():
            run_started = time.time()
            config = adapt_config(settings, technique, shots, plan.steps, run)
            adapt(config)
            train_shots = load_dataset(settings.data, resolution=32, shots=shots, seed=settings.seed)
            samples = run_samples(run, settings.samples, settings.seed, steps=settings.sample_steps)
            evaluation = evaluate(samples, reference, train_shots, out=run / "eval")
            summary = json.loads((run / "summary.json").read_text())
            write_json(
                eval_path,
                {
                    "technique": technique,
                    "shots": shots,
                    "steps": plan.steps,
                    "trainable_parameters": summary["trainable_parameters"],
                    "artifact_bytes": summary["artifact_bytes"],
                    "cpu_minutes": round((time.time() - run_started) / 60, 2),
                    "train_minutes": round(summary["train_seconds"] / 60, 2),
                    "evaluation": evaluation,
                },
            )
        results["runs"][name] = json.loads(eval_path.read_text())
        bar.update(1)
    bar.close()
    results["recommendation"] = recommend(results, plan)
    results["wall_minutes_this_session"] = round((time.time() - started) / 60, 2)
    write_json(out / "results.json", results)
    write_compare_report(results, out)
    return results


def recommend(results: dict, plan: ComparePlan) -> list[dict]:
    """Per shot count: the lowest KID, unless its CI overlaps the runner-up's (too close to call)."""
    advice = []
    for shots in plan.shots:
        candidates = [
            (name, r) for name, r in results["runs"].items() if name != "base" and r["shots"] == shots
        ]
        if not candidates:
            continue
        ranked = sorted(candidates, key=lambda item: item[1]["evaluation"]["kid"]["value"])
        best_name, best = ranked[0]
        kid = best["evaluation"]["kid"]
        entry = {
            "shots": shots,
            "technique": best["technique"],
            "kid": kid,
            "copy_rate": best["evaluation"].get("memorisation", {}).get("copy_rate"),
            "too_close_to_call_with": [],
        }
        for name, other in ranked[1:]:
            other_kid = other["evaluation"]["kid"]
            if other_kid["ci_low"] <= kid["ci_high"]:
                entry["too_close_to_call_with"].append(other["technique"])
        base_kid = results["runs"]["base"]["evaluation"]["kid"]
        entry["beats_base"] = kid["ci_high"] < base_kid["ci_low"]
        advice.append(entry)
    return advice

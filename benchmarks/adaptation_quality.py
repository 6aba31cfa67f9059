"""Adaptation quality (issue #18): every technique at its best step, per family and target domain, over 3 replicates.

    .venv/bin/python benchmarks/adaptation_quality.py run      # the four compares (~90 min on 2 cores, resumable)
    .venv/bin/python benchmarks/adaptation_quality.py extra    # controls: TI variants, CDC at 2e-3, a 2,000-step TGAN/CDC (~25 min)
    .venv/bin/python benchmarks/adaptation_quality.py score    # style-aware scores, tables, grids (~10 min)
    .venv/bin/python benchmarks/adaptation_quality.py tables   # the tables again from the results file
    .venv/bin/python benchmarks/adaptation_quality.py ti       # textual inversion: --token-position, --max-norm, --embedding-weight (~35 min)

`run` runs `genadapt compare` on 10 shots of both OpenMoji target domains (flags: far, dark-skin: near) for pocket-sd
(its five default techniques, 400 steps) and pocket-stylegan2 (TGAN, FreezeD, the MineGAN miner, EWC and CDC: the
CDC paper's Table 1 set, 800 steps, twice the demo's, validated every 100 steps and never stopped early, so each
curve passes its best step), each with 3 replicates and a learning-rate probe of 3 rates per technique. The folders
are `runs/quality/<base>-<domain>`; rerunning resumes.

`score` adds to each run what compare does not compute: its KID in the style-aware space (`--features style`,
docs/style-aware-evaluation.md) on the same 64 samples (resampled from the compare's seeds), and the copy rate along
its validation curve; prints one markdown table per family and domain, and writes
benchmarks/results/adaptation_quality.json and the first replicate's grids to docs/quality/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "quality"
DOMAINS = ("flags", "dark-skin")
PLANS = {
    "pocket-sd": dict(techniques=["lora", "embedding", "freeze", "full", "ewc"], steps=400, sample_steps=25),
    "pocket-stylegan2": dict(techniques=["full", "freeze", "embedding", "ewc", "cdc"], steps=800, validate_every=100,
                             patience=0, lr_probe_steps=150),
}
ORDER = [("pocket-stylegan2", "flags"), ("pocket-sd", "dark-skin"), ("pocket-stylegan2", "dark-skin"), ("pocket-sd", "flags")]


def folder(base: str, domain: str) -> Path:
    return OUT / f"{base}-{domain}"


def run(jobs: int) -> None:
    from genadapt.api import compare
    from genadapt.config import CompareConfig

    for base, domain in ORDER:
        started = time.time()
        settings = CompareConfig(base=base, data=f"builtin:openmoji/{domain}", reference=f"builtin:openmoji/{domain}/reference",
                                 out=folder(base, domain), shots=[10], samples=64, replicates=3, lr_probe=3, jobs=jobs,
                                 min_steps=50, probe_steps=2, **PLANS[base])
        compare(settings)
        print(f"{base} {domain}: {(time.time() - started) / 60:.1f} min", flush=True)


INIT_WORDS = {"flags": "rectangle", "dark-skin": "dark"}  # single tokens of pocket-sd's vocabulary ("flag" is two)


def variant_folder(domain: str, seed: int) -> Path:
    return OUT / "ti-variants" / f"{domain}-v4-{INIT_WORDS[domain]}-s{seed}"


LONG_STEPS = 2000


def _ti_command(domain: str, seed: int, out: Path, flags: list[str]) -> list[str]:
    """`genadapt adapt` of a 400-step textual inversion on 10 shots of `domain` drawn with `seed`."""
    import sys

    return [sys.executable, "-m", "genadapt", "adapt", "--base", "pocket-sd", "--data", f"builtin:openmoji/{domain}?shots=10&seed={seed}",
            "--seed", str(seed), "--train", "embedding", "--token", "<target>", "--steps", "400", *flags, "--out", str(out)]


def _run_all(commands: list[list[str]], jobs: int) -> None:
    """Each command in its own process, `jobs` at a time; the first failure stops the benchmark and the runs
    beside it (left running, they would hold their folders' locks against the rerun)."""
    import subprocess

    running = []

    def finish(process) -> None:
        if process.wait() != 0:
            raise SystemExit(f"failed ({process.returncode}): {' '.join(process.args)}")

    try:
        for command in commands:
            running.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))
            if len(running) == jobs:
                finish(running.pop(0))
        while running:
            finish(running.pop(0))
    finally:  # Ctrl-C or any other exit: no run is left holding its folder's lock
        for other in running:
            other.terminate()
            other.wait()


def extra(jobs: int) -> None:
    """Three controls, most telling first: on both domains, textual inversion with 4 vectors from an initialiser word
    instead of 2 from the vocabulary's centroid (the compare's chosen rate, shots and seeds; last step, no validation);
    on flags, CDC at the registered rate (2e-3, EWC's) instead of the probe's, so its rate and its loss are not
    confounded, and TGAN and CDC at 2e-3 for LONG_STEPS steps (1 replicate, validated every 250 steps), where
    memorisation should show. The CDC controls of 2026-12-01 ran with patch block 1, the default then, and were rerun
    with block 2 on 2026-12-02; `score` labels each with the block its config.yaml records."""

    from genadapt.api import compare
    from genadapt.config import CompareConfig

    commands = []
    for domain in DOMAINS:
        rate = json.loads((folder("pocket-sd", domain) / "lr_probe.json").read_text())["techniques"]["embedding"]["chosen"]
        for seed in range(3):
            if not (variant_folder(domain, seed) / "summary.json").is_file():
                commands.append(_ti_command(domain, seed, variant_folder(domain, seed), ["--vectors", "4", "--init-token", INIT_WORDS[domain],
                                                                                        "--learning-rate", str(rate)]))
    _run_all(commands, jobs)
    print("textual inversion variants done", flush=True)

    gan = {k: v for k, v in PLANS["pocket-stylegan2"].items() if k not in ("techniques", "lr_probe_steps")}
    controls = [("flags", OUT / "pocket-stylegan2-flags-cdc-at-2e-3", dict(techniques=["cdc"], replicates=3, **gan)),
                ("flags", OUT / "pocket-stylegan2-flags-long", dict(techniques=["full", "cdc"], replicates=1, steps=LONG_STEPS,
                                                                     validate_every=250, patience=0))]
    for domain, out, plan in controls:
        started = time.time()
        compare(CompareConfig(base="pocket-stylegan2", data=f"builtin:openmoji/{domain}", reference=f"builtin:openmoji/{domain}/reference",
                              out=out, shots=[10], samples=64, lr_probe=1, jobs=jobs, min_steps=50, probe_steps=2, **plan))
        print(f"{out.name}: {(time.time() - started) / 60:.1f} min", flush=True)


TI_TRAININGS = {  # --token-position and --max-norm (2 vectors, the centroid start, last step)
    "start (as compare), lr 5e-3": ["--learning-rate", "5e-3"],
    "end, lr 5e-3": ["--token-position", "end", "--learning-rate", "5e-3"],
    "end, lr 1e-3": ["--token-position", "end", "--learning-rate", "1e-3"],
    "end, lr 3e-4": ["--token-position", "end", "--learning-rate", "3e-4"],
    "end, --max-norm 0.5, lr 5e-3": ["--token-position", "end", "--learning-rate", "5e-3", "--max-norm", "0.5"],
}
# Each table row: a training above, sampled with the trigger at full weight or at `genadapt sample --embedding-weight`.
TI_VARIANTS = {**{name: (name, None) for name in TI_TRAININGS},
               **{f"end, lr {rate}, --embedding-weight {weight}": (f"end, lr {rate}", weight) for rate in ("5e-3", "1e-3") for weight in (0.5, 0.25, 0.1)}}


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", name).strip("-")


def ti_position(jobs: int) -> None:
    """Where the placeholder joins the caption, how long its vectors may grow, and how strongly the trigger acts at
    sampling: each TI_TRAININGS entry on both domains, 3 seeds (10 shots, 400 steps; ~6 min of training), each
    TI_VARIANTS row scored by `unseen_content` (~70 s a row; the base's samples are drawn once). Prints the table of docs/benchmarks.md and the
    learned vectors' norms; writes benchmarks/results/ti_position.json and the first seed's samples to
    docs/quality/pocket-sd-<domain>-ti-<variant>.png."""
    from safetensors.torch import load_file

    from genadapt.grid import save_grid
    from genadapt.models import load_base

    words = load_base("pocket-sd").text_encoder.get_input_embeddings().weight.detach().norm(dim=1)
    print(f"vocabulary word norms: mean {words.mean():.3f}, largest {words.max():.3f}")
    runs = {(domain, name): [OUT / "ti-position" / f"{domain}-{_slug(name)}-s{seed}" for seed in range(3)] for domain in DOMAINS for name in TI_TRAININGS}
    _run_all([_ti_command(domain, seed, run, ["--vectors", "2", *TI_TRAININGS[name]])
              for (domain, name), folders in runs.items() for seed, run in enumerate(folders) if not (run / "summary.json").is_file()], jobs)
    results = {}
    print("| domain | placeholder, lr, weight | style-block KID | Δ vs base [95% CI] | nearest of the prompt's group: Δ vs base [95% CI] | "
          "prompt's emoji in top 5: Δ vs base [95% CI] | vector norms |")
    print("|---|---|---|---|---|---|---|")
    for domain in DOMAINS:
        settings = {"base": "pocket-sd", "data": f"builtin:openmoji/{domain}", "reference": f"builtin:openmoji/{domain}/reference",
                    "seed": 0, "sample_steps": 25}
        for name, (training, weight) in TI_VARIANTS.items():
            u, grids = unseen_content(runs[domain, training], settings, embedding_weight=weight)
            u["embedding_weight"] = weight
            results[f"{domain}: {name}"] = u
            save_grid(grids["embedding"][:32], ROOT / "docs" / "quality" / f"pocket-sd-{domain}-ti-{_slug(name)}.png", columns=8, scale=2)
            norms = [float(v.norm(dim=-1).mean()) for run in runs[domain, training] for v in load_file(run / "learned_embeds.safetensors").values()]
            content = " | ".join(f"{u['embedding'][key]:.0%} (base {u['base'][key]:.0%}): {_points(u[key + '_vs_base'])}" for key in ("group", "own_in_top5"))
            print(f"| {domain} | {name} | {u['embedding']['style_kid']:.3f} (base {u['base']['style_kid']:.3f}) | {_ci(u['style_vs_base'])} | "
                  f"{content} | {min(norms):.2f}-{max(norms):.2f} |", flush=True)
            (ROOT / "benchmarks" / "results" / "ti_position.json").write_text(json.dumps(results, indent=1))  # row by row: a crash keeps the rows done


def _points(d: dict) -> str:
    """A rate difference in percentage points with its interval."""
    return f"{100 * d['difference']:+.0f} pp [{100 * d['ci_low']:+.0f}, {100 * d['ci_high']:+.0f}]"


def _style_scores(path: Path, results: dict, extractor, reference_features) -> dict:
    """Every technique's style-space KID (mean over replicates) and its paired difference to the base [95% CI]."""
    from genadapt.eval.features import cached_features
    from genadapt.eval.paired import PairedKID, pooled_difference
    from genadapt.models import base_samples, run_samples
    from genadapt.data import load_dataset
    from genadapt.recipes.compare import run_name

    settings, plan = results["settings"], results["plan"]
    shots, n = max(settings["shots"]), settings["samples"]
    scored = {name: [] for name in ["base", *plan["techniques"]]}
    for r in range(plan["replicates"]):
        seed = settings["seed"] + r
        scorer = PairedKID(reference_features, n, seed=seed)
        captions = load_dataset(settings["data"], resolution=32, shots=shots, seed=seed, caption=settings.get("caption")).captions
        samples = {"base": base_samples(settings["base"], n, captions, seed, settings.get("sample_steps"))}
        for technique in plan["techniques"]:
            samples[technique] = run_samples(path / "runs" / run_name(technique, shots, r), n, seed, steps=settings.get("sample_steps"))
        for name, images in samples.items():
            scored[name].append(scorer.scores(cached_features(extractor, images, progress=False).float()))
    out = {}
    for name, values in scored.items():
        out[name] = {"style_kid": float(sum(v for v, _ in values) / len(values))}
        if name != "base":
            out[name]["vs_base"] = pooled_difference(values, scored["base"])
    return out


def _curves(path: Path, results: dict) -> dict:
    """Per technique: each replicate's validation curve (step, KID, copy rate)."""
    from genadapt.recipes.compare import run_name

    plan, shots = results["plan"], max(results["settings"]["shots"])
    curves = {}
    for technique in plan["techniques"]:
        curves[technique] = []
        for r in range(plan["replicates"]):
            lines = (path / "runs" / run_name(technique, shots, r) / "validation.jsonl").read_text().splitlines()
            curves[technique].append([json.loads(line) for line in lines if line.strip()])
    return curves


def _curve_svg(curves: dict) -> str:
    """Validation KID against step, the replicates' mean per technique."""
    from genadapt.eval.report import _svg_lines

    series = {}
    for technique, replicates in curves.items():
        steps = sorted({c["step"] for c in replicates[0]})
        series[technique] = [(s, sum(next(c["kid"] for c in rep if c["step"] == s) for rep in replicates) / len(replicates))
                             for s in steps if all(any(c["step"] == s for c in rep) for rep in replicates)]
    return _svg_lines(series, width=520, height=240, x_label="step", y_label="validation KID (mean of replicates)")


def _rows(path: Path, style, label=lambda technique: technique) -> tuple[list[dict], dict, dict]:
    """Every technique of a compare folder at its best step, with its style score and validation curves."""
    from genadapt.data import load_dataset
    from genadapt.eval.features import cached_features
    from genadapt.recipes.compare import run_name

    results = json.loads((path / "results.json").read_text())
    advice, plan, settings = results["recommendation"][-1], results["plan"], results["settings"]
    shots = max(settings["shots"])
    reference = cached_features(style, load_dataset(settings["reference"], resolution=32), progress=False).float()
    styled = _style_scores(path, results, style, reference)
    curves = _curves(path, results)
    rows = []
    for technique in plan["techniques"]:
        row = advice["techniques"][technique]
        evals = [json.loads((path / "runs" / run_name(technique, shots, r) / "eval.json").read_text()) for r in range(plan["replicates"])]
        rows.append({
            "technique": label(technique), "kid": row["kid"], "kid_per_replicate": row["kid_per_replicate"], "vs_base": row["vs_base"],
            "style_kid": styled[technique]["style_kid"], "style_vs_base": styled[technique]["vs_base"],
            "diversity": row["diversity"], "copy_rate": row["copy_rate"], "disqualified": row["disqualified"],
            "best_steps": [e["best_step"] for e in evals], "learning_rate": evals[0]["learning_rate"],
            "last_check_copy_rate": sum(c[-1]["copy_rate"] for c in curves[technique]) / len(curves[technique]),
            "max_check_copy_rate": max(max(x["copy_rate"] for x in c) for c in curves[technique]),
            "curves": curves[technique],
            "samples_png": str(path / "runs" / run_name(technique, shots, 0) / "eval" / "samples.png"),
        })
    base_row = {"kid": advice["base_kid"], "diversity": advice["base_diversity"], "style_kid": styled["base"]["style_kid"]}
    return rows, base_row, results


def patch_block_of(run: Path) -> int:
    """The CDC patch block a run used: its config.yaml's, or 1 for runs from before --cdc-patch-block (the only block then)."""
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text()).get("cdc_patch_block", 1)


def cdc_direction(rows: list[dict]) -> dict:
    """The CDC paper's Tables 1-2 direction at 10 shots: CDC and EWC at least as diverse as TGAN, TGAN copying more."""
    by = {row["technique"]: row for row in rows}
    out = {}
    controls = [row["technique"] for row in rows if row["technique"].startswith("cdc-block")]
    for name in ("cdc", *controls, "ewc"):
        if name in by:
            out[f"diversity {name} >= full"] = by[name]["diversity"] >= by["full"]["diversity"]
    for name in ("cdc", *controls):
        if name in by:
            out[f"last-check copy rate full > {name}"] = by["full"]["last_check_copy_rate"] > by[name]["last_check_copy_rate"]
    return out


def long_schedule(path: Path) -> dict:
    """TGAN and CDC at 2e-3 for LONG_STEPS steps: each one's validation curve (KID and copy rate of 16 samples per
    check) and its best step's final scores."""
    results = json.loads((path / "results.json").read_text())
    advice = results["recommendation"][-1]
    curves = _curves(path, results)
    out = {}
    for technique in results["plan"]["techniques"]:
        row = advice["techniques"][technique]
        evaluation = json.loads((path / "runs" / f"{technique}-10shot-r0" / "eval.json").read_text())
        out[technique] = {"kid": row["kid"], "diversity": row["diversity"], "copy_rate": row["copy_rate"], "best_step": evaluation["best_step"],
                          "curve": curves[technique][0]}
        if technique == "cdc":
            out[technique]["patch_block"] = patch_block_of(path / "runs" / f"{technique}-10shot-r0")
    return out


def long_markdown(long: dict) -> str:
    lines = [f"TGAN and CDC (patch block {long['cdc']['patch_block']}) at 2e-3 for {LONG_STEPS} steps (flags, 1 replicate; validation every 250 steps on 16 samples):", "",
             "| technique | best step | KID at best | diversity at best | copy rate at best (64 samples) | validation copy rate by step |", "|---|---|---|---|---|---|"]
    for technique, row in long.items():
        by_step = ", ".join(f"{c['step']}: {c['copy_rate']:.0%}" for c in row["curve"])
        lines.append(f"| {technique} | {row['best_step']} | {row['kid']:.3f} | {row['diversity']:.3f} | {row['copy_rate']:.0%} | {by_step} |")
    return "\n".join(lines) + "\n"


def score() -> None:
    import shutil

    from genadapt.eval.features import get_extractor
    from genadapt.eval.report import _svg_lines, worse_than_base
    from genadapt.grid import save_grid
    from genadapt.recipes.compare import run_name
    from genadapt.runs import use_cpu

    use_cpu()
    style = get_extractor("style")
    docs = ROOT / "docs" / "quality"
    docs.mkdir(exist_ok=True)
    everything = {"date": time.strftime("%Y-%m-%d"), "tables": {}}
    for base, domain in ORDER:
        path = folder(base, domain)
        if not (path / "results.json").is_file():
            print(f"{path}: not run yet (adaptation_quality.py run)")
            continue
        rows, base_row, results = _rows(path, style)
        plan, settings = results["plan"], results["settings"]
        control = OUT / f"pocket-stylegan2-{domain}-cdc-at-2e-3"
        if base == "pocket-stylegan2" and (control / "results.json").is_file():
            block = patch_block_of(control / "runs" / "cdc-10shot-r0")
            rows += _rows(control, style, label=lambda technique: f"{technique}-block{block} @ 2e-3")[0]
        rows.sort(key=lambda row: row["kid"])
        table = {"base": base, "domain": domain, "steps": plan["steps"], "replicates": plan["replicates"], "shots": max(settings["shots"]),
                 "recommended": results["recommendation"][-1]["technique"], "worse_than_base": worse_than_base(results["recommendation"][-1]),
                 "rows": rows, "unadapted": base_row}
        if base == "pocket-stylegan2":
            table["cdc_direction"] = cdc_direction(rows)
            long = OUT / f"pocket-stylegan2-{domain}-long"
            if (long / "results.json").is_file():
                table["long"] = long_schedule(long)
                series = {}
                for technique, row in table["long"].items():
                    series[f"{technique} KID"] = [(c["step"], c["kid"]) for c in row["curve"]]
                    series[f"{technique} copies"] = [(c["step"], c["copy_rate"]) for c in row["curve"]]
                (docs / f"{base}-{domain}-long.svg").write_text(_svg_lines(series, width=520, height=240, x_label="step", y_label="validation KID / copy rate"))
                for technique in table["long"]:
                    shutil.copyfile(long / "runs" / f"{technique}-10shot-r0" / "eval" / "samples.png", docs / f"{base}-{domain}-long-{technique}.png")
        everything["tables"][f"{base}-{domain}"] = table
        (docs / f"{base}-{domain}-curves.svg").write_text(_curve_svg({row["technique"]: row["curves"] for row in rows}))
        shutil.copyfile(path / f"shots-{table['shots']}.png", docs / f"{base}-{domain}-shots.png")
        shutil.copyfile(path / "base" / "samples.png", docs / f"{base}-{domain}-base.png")
        for row in rows:
            shutil.copyfile(row["samples_png"], docs / f"{base}-{domain}-{row['technique'].replace(' @ ', '-at-')}.png")
        print(markdown(table))
        if "long" in table:
            print(long_markdown(table["long"]))
        if base == "pocket-sd":
            embedding_runs = [path / "runs" / run_name("embedding", table["shots"], r) for r in range(plan["replicates"])]
            table["unseen_content"], grids = unseen_content(embedding_runs, settings)
            variants = [variant_folder(domain, seed) for seed in range(3)]
            if all((v / "summary.json").is_file() for v in variants):
                table["unseen_content_variant"], variant_grids = unseen_content(variants, settings)
                grids["variant"] = variant_grids["embedding"]
            for side, images in grids.items():
                save_grid(images[:32], docs / f"{base}-{domain}-unseen-{side}.png", columns=8, scale=2)
            print(unseen_markdown(table))
    out = ROOT / "benchmarks" / "results" / "adaptation_quality.json"
    out.write_text(json.dumps(everything, indent=1))
    print(out)


UNSEEN_PROMPTS = 64
_BASE_SAMPLES: dict = {}  # (base, seed, sampler steps) -> the unadapted base's samples of the unseen prompts


def _placeholder(run: Path) -> tuple[str, str]:
    """The words a textual-inversion run puts before and after each caption (its prompts.json against its
    manifest's captions)."""
    prompts = json.loads((run / "prompts.json").read_text())
    captions = [item["caption"] for item in json.loads((run / "manifest.json").read_text())["data"]["train"]["items"]]
    at = prompts[0].find(captions[0])
    if at < 0:
        raise SystemExit(f"{run}: its prompts do not contain its captions (trained on templates?); the content test needs caption-keeping runs")
    return prompts[0][:at], prompts[0][at + len(captions[0]):]


def unseen_content(runs: list[Path], settings: dict, embedding_weight: float | None = None) -> tuple[dict, dict]:
    """Textual inversion on prompts of content it never trained on: 64 captions of held-out *source* images
    (`source/reference`: smileys, animals, objects, light-skinned people), with and without each run's placeholder;
    run i is sampled from seed + i, as compare samples replicate i.

    Style: KID to the target's reference in the style blocks of the style space only (its content half dropped),
    paired with the unadapted base on the same prompts and seeds, pooled over the runs. Content, in the eval
    encoder's space against the 313 held-out source images the prompts came from plus every image of the target
    (its train and reference splits): how often a sample's nearest image is of the prompt's own group (OpenMoji's
    folders, the people ones merged across skin tones), and how often the prompt's own emoji, in any skin tone, is
    among its 5 nearest (31 of the 64 prompts have their dark-skin variant in the dark-skin target: the
    prompt-matched reference of a person redrawn in the target's tone).
    """
    import numpy as np
    import torch

    from genadapt.data import load_dataset
    from genadapt.eval.features import cached_features, get_extractor
    from genadapt.eval.paired import PairedKID, pooled_difference
    from genadapt.models import load_base, load_run, sample

    source = load_dataset("builtin:openmoji/source/reference", resolution=32)
    chosen = np.random.default_rng(0).permutation(len(source))[:UNSEEN_PROMPTS]
    captions = [source.records[i].caption for i in chosen]
    target = [load_dataset(settings["data"].split("?")[0] + split, resolution=32) for split in ("", "/reference")]
    records = [record for dataset in (source, *target) for record in dataset.records]
    # The people folders are split by skin tone (people-light, ..., people-dark): one group here, or a person
    # redrawn in the target's tone would count as a change of content.
    groups = np.array([re.sub(r"^people-.*", "people", record.label.split("/")[-1]) for record in records])
    untoned = re.compile(r"\s*\b(light|medium-light|medium|medium-dark|dark) skin tone\b")
    emoji = np.array([" ".join(untoned.sub("", record.caption).split()) for record in records])
    pocket, style = get_extractor("pocket"), get_extractor("style")
    style_only = torch.cat([torch.arange(s.start, s.stop) for name, s in style.block_slices.items() if name != "content"])
    pool_features = torch.nn.functional.normalize(torch.cat([cached_features(pocket, d, progress=False).float() for d in (source, *target)]), dim=1)
    reference = cached_features(style, load_dataset(settings["reference"], resolution=32), progress=False).float()[:, style_only]

    def content(images: torch.Tensor) -> dict:  # per sample: 1 where its content is the prompt's
        features = torch.nn.functional.normalize(cached_features(pocket, images, progress=False).float(), dim=1)
        order = (features @ pool_features.T).argsort(dim=1, descending=True).numpy()
        return {"group": (groups[order[:, 0]] == groups[chosen]).astype(float),
                "own_in_top5": np.array([emoji[chosen[i]] in emoji[order[i, :5]] for i in range(len(chosen))], dtype=float)}

    base_model = load_base(settings["base"])
    sides = {side: {"style": [], "group": [], "own_in_top5": []} for side in ("base", "embedding")}
    grids = {}
    for index, run in enumerate(runs):
        seed = settings["seed"] + index
        prefix, suffix = _placeholder(run)
        scorer = PairedKID(reference, UNSEEN_PROMPTS, seed=seed)
        for side, model, prompts in (("base", base_model, captions), ("embedding", load_run(run), [prefix + c + suffix for c in captions])):
            cached = (settings["base"], seed, settings.get("sample_steps"))  # the base's samples are the same for every row of a table
            if side == "base" and cached in _BASE_SAMPLES:
                images = _BASE_SAMPLES[cached]
            else:
                weight = embedding_weight if side == "embedding" else None
                images = sample(model, UNSEEN_PROMPTS, seed, prompts, steps=settings.get("sample_steps"), progress=True, embedding_weight=weight)
                if side == "base":
                    _BASE_SAMPLES[cached] = images
            scores = scorer.scores(cached_features(style, images, progress=False).float()[:, style_only])
            sides[side]["style"].append(scores)
            for key, value in content(images).items():
                sides[side][key].append(value)
            grids.setdefault(side, images)
    out = {"prompts": captions, "prefix_example": prefix, "suffix_example": suffix, "runs": [str(run) for run in runs]}
    for side, values in sides.items():
        out[side] = {"style_kid": float(np.mean([full for full, _ in values["style"]])),
                     **{key: float(np.mean(values[key])) for key in ("group", "own_in_top5")}}
    out["style_vs_base"] = pooled_difference(sides["embedding"]["style"], sides["base"]["style"])
    for key in ("group", "own_in_top5"):
        out[f"{key}_vs_base"] = paired_rate_difference(sides["embedding"][key], sides["base"][key])
    return out, grids


def paired_rate_difference(a: list, b: list, resamples: int = 4000) -> dict:
    """A − B of a per-sample 0/1 rate, paired (run i, prompt j on both sides), with a 95% bootstrap interval that
    resamples the prompts (the same ones in every run: a prompt's samples share its content)."""
    import numpy as np

    deltas = np.stack(a) - np.stack(b)  # [runs, prompts]
    picks = np.random.default_rng(0).integers(0, deltas.shape[1], size=(resamples, deltas.shape[1]))
    means = deltas[:, picks].mean(axis=(0, 2))
    return {"difference": float(deltas.mean()), "ci_low": float(np.quantile(means, 0.025)), "ci_high": float(np.quantile(means, 0.975))}


def _ci(d: dict) -> str:
    return f"{d['difference']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def markdown(table: dict) -> str:
    lines = [f"#### {table['base']}, {table['domain']} ({table['shots']} shots, {table['steps']} steps, {table['replicates']} replicates; "
             f"{'best, worse than the base' if table['worse_than_base'] else 'recommended'}: {table['recommended']})", "",
             "| technique | KID [replicates' range] | Δ KID vs base [95% CI] | style KID | Δ style KID vs base [95% CI] | diversity | "
             "copy rate (best step / last check / worst check) | best step per replicate | learning rate |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in table["rows"]:
        name = row["technique"] + (" (disqualified)" if row["disqualified"] else "") + ((" **(best, worse than the base)**" if table["worse_than_base"] else " **(recommended)**") if row["technique"] == table["recommended"] else "")
        lines.append(f"| {name} | {row['kid']:.3f} [{min(row['kid_per_replicate']):.3f}, {max(row['kid_per_replicate']):.3f}] | {_ci(row['vs_base'])} | "
                     f"{row['style_kid']:.3f} | {_ci(row['style_vs_base'])} | {row['diversity']:.3f} | "
                     f"{row['copy_rate']:.0%} / {row['last_check_copy_rate']:.0%} / {row['max_check_copy_rate']:.0%} | "
                     f"{', '.join('none' if s is None else str(s) for s in row['best_steps'])} | {row['learning_rate']:.2g} |")
    base = table["unadapted"]
    checks = "".join(f"\n- {check}: {'yes' if held else 'no'}" for check, held in table.get("cdc_direction", {}).items())
    full = next((row for row in table["rows"] if row["technique"] == "full"), None)
    if full is not None and table["base"] == "pocket-sd":
        best = min((row for row in table["rows"] if row["copy_rate"] <= 0.10), key=lambda row: row["kid"])
        checks += f"\n- lowest KID with copy rate <= 10%: {best['technique']}, {best['kid'] / full['kid']:.2f}x full fine-tuning's (target <= 0.6x)"
    lines.append(f"| base (unadapted) | {base['kid']:.3f} | | {base['style_kid']:.3f} | | {base['diversity']:.3f} | | | |")
    return "\n".join(lines) + "\n" + checks + "\n"


def unseen_markdown(table: dict) -> str:
    u = table["unseen_content"]
    return (f"Textual inversion ({table['domain']}) on {UNSEEN_PROMPTS} held-out source prompts, e.g. `{u['prefix_example']}{u['prompts'][0]}{u.get('suffix_example', '')}`:\n\n"
            "| prompts | style-block KID to the target | Δ vs base [95% CI] | nearest image of the prompt's group | prompt's own image in top 5 |\n|---|---|---|---|---|\n"
            f"| base, caption only | {u['base']['style_kid']:.3f} | | {u['base']['group']:.0%} | {u['base']['own_in_top5']:.0%} |\n"
            f"| textual inversion, placeholder + caption | {u['embedding']['style_kid']:.3f} | {_ci(u['style_vs_base'])} | "
            f"{u['embedding']['group']:.0%} | {u['embedding']['own_in_top5']:.0%} |\n"
            + (f"| textual inversion, 4 vectors from `{INIT_WORDS[table['domain']]}` | {v['embedding']['style_kid']:.3f} | {_ci(v['style_vs_base'])} | "
               f"{v['embedding']['group']:.0%} | {v['embedding']['own_in_top5']:.0%} |\n" if (v := table.get("unseen_content_variant")) else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["run", "extra", "score", "tables", "ti"])
    parser.add_argument("--jobs", type=int, default=None, help="run, extra, ti: runs at a time  [default: 2]")
    args = parser.parse_args()
    if args.jobs is not None and args.phase not in ("run", "extra", "ti"):
        parser.error(f"--jobs applies to run, extra and ti, not {args.phase}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.phase == "run":
        run(args.jobs or 2)
    elif args.phase == "extra":
        extra(args.jobs or 2)
    elif args.phase == "ti":
        ti_position(args.jobs or 2)
    elif args.phase == "tables":  # the markdown again from adaptation_quality.json, without rescoring
        for table in json.loads((ROOT / "benchmarks" / "results" / "adaptation_quality.json").read_text())["tables"].values():
            print(markdown(table) + (long_markdown(table["long"]) if "long" in table else "") + (unseen_markdown(table) if "unseen_content" in table else ""))
    else:
        score()


if __name__ == "__main__":
    main()

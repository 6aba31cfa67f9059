"""compare: a complete results.json and report, and a killed compare resumes without redoing runs."""

import json

import pytest
import yaml

from diffusion_fixtures import build_tiny_pipeline
from genadapt.config import CompareConfig as CompareSettings
from genadapt.errors import UserError
from genadapt.families.diffusion import COMPARE
from genadapt.recipes.compare import ComparePlan, compare, make_plan


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd")))


def _settings(base, out):
    return CompareSettings(
        base=base, data="builtin:digits/3", reference="builtin:digits/3", out=out, shots=[2, 4],
        techniques=["lora", "embedding"], budget_minutes=30, min_steps=2, max_steps=3, samples=8, probe_steps=1, batch_size=2, replicates=1,
    )


def test_compare_writes_complete_results_and_resumes(base, tmp_path):
    results = compare(_settings(base, tmp_path))
    assert set(results["runs"]) == {"base", "base-2shot-r0", "base-4shot-r0", "lora-2shot-r0", "lora-4shot-r0", "embedding-2shot-r0", "embedding-4shot-r0"}
    for run in results["runs"].values():
        evaluation = run["evaluation"]
        assert {"kid", "fid", "precision_recall", "memorisation", "intra_cluster_diversity"} <= set(evaluation)
    assert [advice["shots"] for advice in results["recommendation"]] == [2, 4]
    report = (tmp_path / "report.html").read_text()
    assert "Which technique fits this data?" in report and "shots-2.png" in report and "Paired evidence" in report
    for name in ("lora-2shot-r0", "embedding-4shot-r0"):
        assert (tmp_path / "runs" / name / "validation.jsonl").read_text().strip()  # every run has its validation curve
        assert results["runs"][name]["best_step"] is not None
        assert (tmp_path / "runs" / name / "eval" / "samples.png").is_file()
    # The learning-rate probe: 3 rates 3x apart around each technique's default, the lowest validation KID trains the runs.
    probe = json.loads((tmp_path / "lr_probe.json").read_text())
    assert probe == results["lr_probe"] and probe["shots"] == 4 and probe["steps"] == 2
    for technique, sweep in probe["techniques"].items():
        default = sweep["default"]
        assert sweep["rates"] == pytest.approx([default / 3, default, default * 3])
        scored = [(kid, rate) for kid, rate in zip(sweep["kid"], sweep["rates"]) if kid is not None]
        assert scored and sweep["chosen"] == min(scored)[1]
        for shots in (2, 4):
            run = tmp_path / "runs" / f"{technique}-{shots}shot-r0"
            assert yaml.safe_load((run / "config.yaml").read_text())["learning_rate"] == pytest.approx(sweep["chosen"])
            assert results["runs"][run.name]["learning_rate"] == pytest.approx(sweep["chosen"])
        assert len((tmp_path / "lr_probe" / f"{technique}-4shot-lr0" / "validation.jsonl").read_text().splitlines()) == 2
    assert "Learning rate" in report and "rate: validation KID" in report
    pick = results["recommendation"][1]["technique"]
    assert f"learning-rate {probe['techniques'][pick]['chosen']:.3g}" in (tmp_path / "report.html").read_text()
    probe_stamp = (tmp_path / "lr_probe.json").stat().st_mtime_ns

    finished = tmp_path / "runs" / "lora-2shot-r0" / "eval.json"
    stamp = finished.stat().st_mtime_ns
    (tmp_path / "runs" / "embedding-4shot-r0" / "eval.json").unlink()  # as if killed during that run
    again = compare(_settings(base, tmp_path))
    assert finished.stat().st_mtime_ns == stamp
    assert (tmp_path / "runs" / "embedding-4shot-r0" / "eval.json").is_file()
    assert json.loads((tmp_path / "results.json").read_text())["plan"] == again["plan"]
    assert (tmp_path / "lr_probe.json").stat().st_mtime_ns == probe_stamp  # the probe is not rerun on resume


def test_plan_drops_the_most_expensive_runs_first(tmp_path):
    settings = CompareSettings(base="x", data="x", reference="x", out=tmp_path, shots=[1, 10], techniques=["lora", "full"], budget_minutes=1, min_steps=50, samples=4,
                               lr_probe=1)
    per_step = {"lora": 0.1, "lora:setup": 1.0, "full": 1.0, "full:setup": 1.0}
    plan = make_plan(settings, per_step, per_sample=0.0)
    assert isinstance(plan, ComparePlan) and plan.steps >= 50
    assert plan.dropped and all(name.startswith("full") for name in (d.split()[0] for d in plan.dropped))
    assert all(run.startswith("lora") for run in plan.runs)


def test_compare_runs_gan_techniques_too(tmp_path):
    from genadapt.families.stylegan2 import save_stylegan2
    from genadapt.zoo.pocket_stylegan2 import PocketStyleGAN2Config, build

    tiny = PocketStyleGAN2Config(size=32, style_dim=16, n_mlp=2, channels={4: 16, 8: 16, 16: 8, 32: 8})
    _, discriminator, g_ema = build(tiny)
    save_stylegan2(tmp_path / "gan", g_ema, discriminator, tiny.generator_kwargs(), tiny.discriminator_kwargs(), extra={"pretraining": {"r1_gamma": 1.0}})
    settings = CompareSettings(
        base=str(tmp_path / "gan"), data="builtin:digits/3", reference="builtin:digits/3", out=tmp_path / "cmp", shots=[4],
        techniques=["freeze", "cdc"], budget_minutes=30, min_steps=2, max_steps=3, samples=8, probe_steps=1, batch_size=4, replicates=2,
    )
    results = compare(settings)
    assert {"freeze-4shot-r0", "freeze-4shot-r1", "cdc-4shot-r0", "cdc-4shot-r1", "base-4shot-r1"} <= set(results["runs"])
    assert results["runs"]["cdc-4shot-r1"]["evaluation"]["memorisation"]["copy_rate"] >= 0
    advice = results["recommendation"][0]
    assert advice["techniques"]["cdc"]["replicates"] == 2 and len(advice["techniques"]["cdc"]["kid_per_replicate"]) == 2


def test_without_reference_a_share_of_the_data_is_held_out(tmp_path):
    from genadapt.recipes.compare import hold_out
    from genadapt.data import load_dataset

    settings = CompareSettings(base="x", data="builtin:digits/3", reference=None, out=tmp_path, shots=[5], techniques=["lora"])
    split = hold_out(settings, tmp_path)
    pool, reference = load_dataset(split.data, resolution=32), load_dataset(split.reference, resolution=32)
    total = len(load_dataset("builtin:digits/3", resolution=32))
    assert len(pool) + len(reference) == total and abs(len(reference) - 0.3 * total) <= 1
    assert not {r.sha256 for r in pool.records} & {r.sha256 for r in reference.records}
    assert pool.captions[0] == "a handwritten digit three"


def test_compare_reads_the_data_as_its_runs_do(tmp_path):
    """--fit, --background, --caption-extension, --caption-column and --strict reach the split, the shots compare scores, and every
    adapt run it makes (before, compare had none of them: a folder of kohya .caption files trained uncaptioned)."""
    import numpy as np
    from PIL import Image

    from genadapt.data import load_dataset
    from genadapt.errors import UserError
    from genadapt.recipes.compare import adapt_config, hold_out, reading

    folder = tmp_path / "wide"
    folder.mkdir()
    for i in range(8):  # opaque red, twice as wide as tall: --fit pad leaves background above and below
        rgba = np.zeros((10, 20, 4), np.uint8)
        rgba[..., 0], rgba[..., 3] = 255, 255
        Image.fromarray(rgba, "RGBA").save(folder / f"{i}.png")
        (folder / f"{i}.caption").write_text(f"a red banner number {i}")
    settings = CompareSettings(base="x", data=str(folder), reference=None, out=tmp_path / "c", shots=[2], techniques=["lora"],
                               caption_extension=".caption", fit="pad", background="black")
    split = hold_out(settings, tmp_path / "c")
    pool = load_dataset(split.data, **reading(split), resolution=8)
    assert set(pool.captions) <= {f"a red banner number {i}" for i in range(8)} and len(pool) == 6
    shots = load_dataset(split.data, **reading(split), resolution=8, shots=2, seed=0)
    assert (shots.pixels[:, 0, 4] == 0).all() and (shots.pixels[:, 4, 4] == [255, 0, 0]).all()  # black padding, red image
    run = adapt_config(split, "lora", 2, 10, tmp_path / "run")
    assert (run.fit, run.background, run.caption_extension, run.caption_column) == ("pad", "black", split.caption_extension, "text")
    (folder / "broken.png").write_bytes(b"")  # --strict: an unusable file stops compare, as it stops adapt
    strict = CompareSettings(base="x", data=str(folder), reference=str(folder), out=tmp_path / "s", shots=[2], techniques=["lora"], strict=True)
    with pytest.raises(UserError, match="broken.png"):
        load_dataset(strict.data, **reading(strict), resolution=8)
    assert adapt_config(strict, "lora", 2, 10, tmp_path / "run2").strict
    with pytest.raises(UserError, match="--caption-extension applies to diffusion"):
        CompareSettings(base="pocket-stylegan2", data=str(folder), out=tmp_path / "g", caption_extension=".caption")


def test_validation_reads_captions_in_the_users_column(tmp_path):
    """A folder whose metadata.jsonl names its captions `prompt`: the validation pool of every compare run reads it with
    --caption-column prompt (it read only `text` before, and stopped at the first check)."""
    import numpy as np
    from PIL import Image

    from genadapt.data import load_dataset
    from genadapt.recipes.compare import adapt_config, reading
    from genadapt.recipes.validation import validation_images

    folder = tmp_path / "prompted"
    folder.mkdir()
    rows = []
    for i in range(10):
        Image.fromarray(np.full((16, 16, 3), 20 * i, np.uint8)).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "prompt": f"a grey square {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    settings = CompareSettings(base="x", data=str(folder), reference=str(folder), out=tmp_path / "c", shots=[2], techniques=["lora"], caption_column="prompt")
    run = adapt_config(settings, "lora", 2, 8, tmp_path / "run")
    shots = load_dataset(settings.data, **reading(settings), resolution=8, shots=2, seed=0)
    assert len(validation_images(run, shots, resolution=8)) == 8


def test_fixed_steps_skip_the_probe(base, tmp_path):
    settings = _settings(base, tmp_path)
    settings.shots, settings.techniques, settings.steps, settings.lr_probe = [2], ["embedding"], 2, 1
    results = compare(settings)
    assert results["plan"]["steps"] == 2 and results["plan"]["seconds_per_step"] == {}
    assert not (tmp_path / "probe").exists()
    assert json.loads((tmp_path / "runs" / "embedding-2shot-r0" / "summary.json").read_text())["steps"] == 2


def test_a_compare_whose_every_run_failed_is_an_error_not_a_silent_success(base, tmp_path, monkeypatch):
    """When no run finishes there is nothing to recommend: one error naming the first failure (here the one a
    script without a __main__ guard meets), with results.json still written."""
    from concurrent.futures.process import BrokenProcessPool

    from genadapt.errors import UserError
    from genadapt.recipes import compare as compare_module

    def every_run_breaks(settings, steps, names, **worker):
        for name in names:
            yield name, BrokenProcessPool("A process in the process pool was terminated abruptly")

    monkeypatch.setattr(compare_module, "execute", every_run_breaks)
    settings = _settings(base, tmp_path)
    settings.shots, settings.techniques, settings.steps, settings.lr_probe = [2], ["lora", "embedding"], 2, 1
    with pytest.raises(UserError, match=r"all 2 runs failed.*the first, lora-2shot-r0: BrokenProcessPool.*if __name__ == \"__main__\""):
        compare(settings)
    assert set(json.loads((tmp_path / "results.json").read_text())["failed"]) == {"lora-2shot-r0", "embedding-2shot-r0"}


@pytest.mark.parametrize("pocket, technique", [("pocket-sd", "lora"), ("pocket-stylegan2", "freeze")])
def test_the_default_shot_counts_finish_on_both_pocket_models(pocket, technique, tmp_path):
    """1 shot included: metrics that need two shots (authenticity) are left out, not fatal."""
    from genadapt.config import CompareConfig

    extra = {"sample_steps": 1} if pocket == "pocket-sd" else {}
    settings = CompareConfig(base=pocket, data="builtin:openmoji/flags", reference="builtin:openmoji/flags/reference",
                             techniques=[technique], steps=2, samples=4, replicates=1, validate_every=0, lr_probe=1, out=tmp_path, **extra)
    assert settings.shots == [1, 5, 10]
    results = compare(settings)
    assert [advice["shots"] for advice in results["recommendation"]] == [1, 5, 10]
    assert "authenticity" not in results["runs"][f"{technique}-1shot-r0"]["evaluation"]


def test_a_killed_compare_resumes_without_redoing_finished_runs(base, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    args = [sys.executable, "-m", "genadapt", "compare", "--base", base, "--data", "builtin:digits/3", "--reference", "builtin:digits/3",
            "--shots", "2", "--techniques", "lora,embedding", "--steps", "2", "--samples", "4", "--sample-steps", "1", "--batch-size", "2", "--replicates", "1", "--validate-every", "0", "--lr-probe", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(args + ["--out", str(tmp_path / "straight")], env=env, check=True, capture_output=True, timeout=600)
    out = tmp_path / "killed"
    process = subprocess.Popen(args + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "runs" / "lora-2shot-r0" / "eval.json"
    deadline = time.time() + 300
    while not first.is_file():
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # between runs: the first is evaluated, the second not finished
    process.wait()
    stamp = first.stat().st_mtime_ns
    subprocess.run(args + ["--out", str(out)], env=env, check=True, capture_output=True, timeout=600)
    assert first.stat().st_mtime_ns == stamp  # not redone
    straight, resumed = (json.loads((tmp_path / run / "results.json").read_text()) for run in ("straight", "killed"))
    for name in straight["runs"]:
        a, b = (dict(r["runs"][name]["evaluation"]) for r in (straight, resumed))
        a.pop("samples"), b.pop("samples")  # their names say which folder they came from
        assert a == b, name


def test_the_budget_decides_replicates_before_it_drops_runs(tmp_path):
    per_step = {"lora": 0.1, "lora:setup": 1.0}
    settings = CompareSettings(base="x", data="x", reference="x", out=tmp_path, shots=[5], techniques=["lora"], budget_minutes=0.25,
                               min_steps=50, samples=4, replicates=3, lr_probe=1)
    plan = make_plan(settings, per_step, per_sample=0.0)  # 15 s: 2 runs of 50 steps (2 x 6 s) fit, 3 (18 s) do not
    assert plan.replicates == 2 and plan.runs == ["lora-5shot-r0", "lora-5shot-r1"] and not plan.dropped


def test_the_plan_pays_for_the_learning_rate_probe(tmp_path):
    per_step = {"lora": 0.1, "lora:setup": 1.0}
    settings = CompareSettings(base="x", data="x", reference="x", out=tmp_path, shots=[5], techniques=["lora"], budget_minutes=0.25,
                               min_steps=50, samples=4, replicates=3, lr_probe=3)
    plan = make_plan(settings, per_step, per_sample=0.0)
    # 3 probe runs of a quarter of the steps each, with their setup: 2 replicates no longer fit 15 s, one run of 62 steps does.
    assert plan.replicates == 1 and plan.steps == 62
    assert plan.estimated_minutes == pytest.approx((0.1 * 62 + 1.0 + 3 * (0.1 * 62 / 4 + 1.0)) / 60, abs=0.005)  # rounded to 0.01 min


def test_validation_samples_reach_every_run_and_the_plan_pays_for_their_checks(tmp_path):
    """--validation-samples is what each run's checks draw; the budget pays for the checks: four a run by default,
    steps / --validate-every when it is given, none at 0."""
    from genadapt.recipes.compare import adapt_config

    per_step = {"lora": 0.1, "lora:setup": 1.0}
    common = dict(base="x", data="x", reference="x", out=tmp_path, shots=[5], techniques=["lora"], budget_minutes=0.5, min_steps=10,
                  samples=4, replicates=1, lr_probe=1)

    def plan(**values):
        return make_plan(CompareSettings(**common, **values), per_step, per_sample=0.01)

    # 30 s - 1 s setup - 8 samples (0.08 s) - checks, at 0.1 s a step; a check samples at the runs' sampler steps
    # (COMPARE's 10), where the probe's 0.01 s a sample was timed at --sample-steps 25
    check = 64 * 0.01 * COMPARE["sample_steps"] / 25
    assert plan(validate_every=0).steps == int((30 - 1 - 0.08) / 0.1)
    assert plan(validation_samples=64).steps == int((30 - 1 - 0.08 - 4 * check) / 0.1)
    assert plan(validation_samples=64, validate_every=10).steps == int((30 - 1 - 0.08) / (0.1 + check / 10))
    assert plan(validation_samples=64).steps < plan().steps < plan(validate_every=0).steps
    run = adapt_config(CompareSettings(**common, validation_samples=48), "lora", 5, plan().steps, tmp_path / "run")
    assert run.validation_samples == 48 and plan().steps // run.validate_every == 4  # the four checks the plan charges
    assert adapt_config(CompareSettings(**common), "lora", 5, 20, tmp_path / "run").validation_samples == 16
    with pytest.raises(UserError, match="--validation-samples applies when runs are validated"):
        CompareSettings(**common, validation_samples=48, validate_every=0)


def test_under_16_steps_the_plan_pays_for_every_check_the_runs_make(tmp_path):
    """A run of s steps checks every max(1, s // 4) steps: 5 to 7 times under 16 steps, not the 4 charged above."""
    per_step = {"lora": 0.1, "lora:setup": 1.0}
    settings = CompareSettings(base="x", data="x", reference="x", out=tmp_path, shots=[5], techniques=["lora"], budget_minutes=0.048,
                               min_steps=2, samples=4, replicates=1, lr_probe=1, validation_samples=64)
    per_sample = 0.01
    check = 64 * per_sample * COMPARE["sample_steps"] / 25

    def seconds(steps):
        return 1 + 8 * per_sample + steps * 0.1 + steps // max(1, steps // 4) * check

    fitting = max(s for s in range(1, 40) if seconds(s) <= 0.048 * 60)
    assert fitting < 16 and fitting // max(1, fitting // 4) > 4  # the case this is about
    assert make_plan(settings, per_step, per_sample).steps == fitting


def test_the_timing_probe_runs_no_validation_check(base, tmp_path):
    """The plan charges each run's checks itself: checks inside the probe's timed steps would be charged again in
    every step's price."""
    from genadapt.recipes.compare import adapt_config, probe

    settings = _settings(base, tmp_path)
    settings.techniques, settings.shots, settings.probe_steps = ["lora"], [2], 3
    assert adapt_config(settings, "lora", 2, settings.probe_steps, tmp_path / "x").validate_every == 1  # a run this short checks every step
    per_step, _ = probe(settings, tmp_path / "probe")
    log = tmp_path / "probe" / "lora" / "validation.jsonl"
    assert not log.is_file() or not log.read_text().strip()
    # The first step's warm-up (a GAN's also runs R1) is paid once per run: it goes to the run's set-up, and only the
    # later steps price a step (charged per step, a 2-step GAN probe priced pocket-stylegan2's steps at 1.7x a run's).
    summary = json.loads((tmp_path / "probe" / "lora" / "summary.json").read_text())
    assert 0 < summary["first_step_seconds"] < summary["train_seconds"]
    later = (summary["train_seconds"] - summary["first_step_seconds"]) / (settings.probe_steps - 1)
    assert per_step["lora"] == pytest.approx(later) and per_step["lora:setup"] >= summary["first_step_seconds"]
    # An interrupted compare probes again from scratch: a resumed probe would time none of its steps.
    probe(settings, tmp_path / "probe")
    assert len((tmp_path / "probe" / "lora" / "log.jsonl").read_text().splitlines()) == settings.probe_steps


def test_a_gan_probe_spreads_its_first_steps_r1_over_the_r1_interval(tmp_path):
    """A GAN's first step runs the lazy R1, which recurs every R1_INTERVAL steps: the later steps alone would
    price a step without it."""
    from genadapt.families.stylegan2 import R1_INTERVAL, save_stylegan2
    from genadapt.recipes.compare import probe
    from genadapt.zoo.pocket_stylegan2 import PocketStyleGAN2Config, build

    tiny = PocketStyleGAN2Config(size=32, style_dim=16, n_mlp=2, channels={4: 16, 8: 16, 16: 8, 32: 8})
    _, discriminator, g_ema = build(tiny)
    save_stylegan2(tmp_path / "gan", g_ema, discriminator, tiny.generator_kwargs(), tiny.discriminator_kwargs(), extra={"pretraining": {"r1_gamma": 1.0}})
    settings = CompareSettings(base=str(tmp_path / "gan"), data="builtin:digits/3", reference="builtin:digits/3", out=tmp_path / "cmp", shots=[4],
                               techniques=["full"], budget_minutes=30, min_steps=2, samples=8, probe_steps=3, batch_size=4, replicates=1)
    per_step, _ = probe(settings, tmp_path / "probe")
    summary = json.loads((tmp_path / "probe" / "full" / "summary.json").read_text())
    first = summary["first_step_seconds"]
    later = (summary["train_seconds"] - first) / (settings.probe_steps - 1)
    assert "r1" in json.loads((tmp_path / "probe" / "full" / "log.jsonl").read_text().splitlines()[0])  # the first step ran R1
    assert per_step["full"] == pytest.approx(later + max(0.0, first - later) / R1_INTERVAL)


def test_a_recommendation_worse_than_the_base_says_to_keep_the_base():
    from genadapt.eval.report import verdict_text

    def advice(ci_low, ci_high):
        vs_base = {"difference": (ci_low + ci_high) / 2, "ci_low": ci_low, "ci_high": ci_high}
        row = {"kid": 0.5, "copy_rate": 0.0, "replicates": 3, "artifact_bytes": 2700, "disqualified": [], "vs_base": vs_base}
        return {"settings": {"samples": 64}, "recommendation": [{
            "shots": 10, "techniques": {"embedding": row}, "technique": "embedding", "fidelity_winner": "embedding", "tied_with": [],
            "comparisons": {}, "base_kid": 0.17, "beats_base": ci_high < 0, "worse_than_base": ci_low > 0, "detectable": 0.3, "settings": {}}]}

    worse = verdict_text(advice(0.04, 0.74))[0]
    assert worse.startswith("With 10 shot(s) keep the unadapted base") and "use embedding" not in worse
    assert verdict_text(advice(-0.2, 0.3))[0].startswith("With 10 shot(s) use embedding")  # a tie with the base still names the technique


def test_the_tie_break_keeps_a_technique_that_beats_the_base_over_a_cheaper_one_that_does_not(tmp_path):
    import torch

    from genadapt.recipes.compare import recommend

    torch.manual_seed(0)
    n, dim = 48, 16
    reference = torch.randn(200, dim)
    near, far = (lambda: torch.randn(n, dim)), (lambda: torch.randn(n, dim) + 2.0)
    # lora is near the reference in both replicates; embedding in one only, so its interval against the base is wide.
    features = {"reference": reference, "base-r0": far(), "base-r1": far(), "lora-10shot-r0": near(), "lora-10shot-r1": near(),
                "embedding-10shot-r0": near(), "embedding-10shot-r1": far()}
    evaluation = {"memorisation": {"copy_rate": 0.0}, "intra_cluster_diversity": {"value": 1.0}}
    runs = {name: {"evaluation": evaluation, "trainable_parameters": 1, "cpu_minutes": 1.0, "learning_rate": 1e-4,
                   "artifact_bytes": 600_000 if name.startswith("lora") else 2_700}
            for name in features if "shot" in name}
    runs |= {f"base-10shot-r{r}": {"evaluation": evaluation} for r in range(2)}
    names = [n for n in features if "shot" in n]
    plan = ComparePlan(["lora", "embedding"], [10], 1, {}, 0.0, runs=names, replicates=2)
    settings = CompareSettings(base="pocket-sd", data="builtin:openmoji/flags", out=tmp_path, shots=[10], techniques=["lora", "embedding"],
                             steps=1, samples=n, replicates=2, lr_probe=1)
    advice = recommend({"runs": runs}, plan, settings, features)[0]
    assert advice["techniques"]["embedding"]["vs_base"]["ci_high"] >= 0 > advice["techniques"]["lora"]["vs_base"]["ci_high"]
    assert "embedding" in advice["tied_with"] or advice["fidelity_winner"] == "embedding"
    assert advice["technique"] == "lora" and advice["beats_base"]


def _diversity_advice(tmp_path, target_diversity, base_diversity=0.40, drop_reference=False):
    """The rule on fixed evaluations: the base generates a diverse other domain (0.40), the real target is less diverse."""
    import torch

    from genadapt.recipes.compare import recommend

    torch.manual_seed(0)
    n, dim = 48, 16
    features = {"reference": torch.randn(200, dim), "base-r0": torch.randn(n, dim) + 2.0}
    diversity = {"full": 0.15, "freeze": 0.05}
    for name in diversity:
        features[f"{name}-10shot-r0"] = torch.randn(n, dim)
    runs = {f"{name}-10shot-r0": {"evaluation": {"memorisation": {"copy_rate": 0.0}, "intra_cluster_diversity": {"value": value}},
                                  "trainable_parameters": 1, "cpu_minutes": 1.0, "learning_rate": 1e-3, "artifact_bytes": 1000}
            for name, value in diversity.items()}
    base_evaluation = {"memorisation": {"copy_rate": 0.0}, "intra_cluster_diversity": {"value": base_diversity},
                       "reference_diversity": {"value": target_diversity}}
    if drop_reference:  # an eval.json written before reference_diversity existed
        del base_evaluation["reference_diversity"]
    runs["base-10shot-r0"] = {"evaluation": base_evaluation}
    plan = ComparePlan(["full", "freeze"], [10], 1, {}, 0.0, runs=list(runs)[:2], replicates=1)
    settings = CompareSettings(base="pocket-stylegan2", data="builtin:openmoji/flags", out=tmp_path, shots=[10], techniques=["full", "freeze"],
                               steps=1, samples=n, replicates=1, lr_probe=1)
    return recommend({"runs": runs}, plan, settings, features)[0]


def test_the_diversity_floor_is_measured_against_the_target_not_the_base(tmp_path):
    # Half the base's 0.40 would disqualify full (0.15), as diverse as the real target (0.14): the floor is 0.5 x 0.14.
    advice = _diversity_advice(tmp_path, 0.14)
    assert advice["target_diversity"] == 0.14 and advice["rule"]["diversity_yardstick"] == "target"
    assert advice["techniques"]["full"]["disqualified"] == []
    assert advice["techniques"]["freeze"]["disqualified"] == ["diversity 0.050 is below 0.5x the held-out target images' 0.140"]
    assert advice["technique"] == "full"


def test_the_diversity_floor_falls_back_to_the_base_when_the_reference_forms_no_cluster(tmp_path):
    advice = _diversity_advice(tmp_path, float("nan"))
    assert advice["target_diversity"] is None and advice["rule"]["diversity_yardstick"] == "base"
    assert advice["techniques"]["full"]["disqualified"] == ["diversity 0.150 is below 0.5x the base's 0.400"]


def test_a_base_less_diverse_than_the_target_sets_the_floor(tmp_path):
    # A blurry base (0.12) cannot reach the real target's 0.40: half the base's, not the target's, is the floor.
    advice = _diversity_advice(tmp_path, 0.40, base_diversity=0.12)
    assert advice["rule"]["diversity_yardstick"] == "base"
    assert advice["techniques"]["full"]["disqualified"] == []
    assert advice["techniques"]["freeze"]["disqualified"] == ["diversity 0.050 is below 0.5x the base's 0.120"]


def test_the_floor_holds_when_one_yardstick_is_missing(tmp_path):
    # The base formed no cluster (NaN): the target's diversity still sets the floor, and the reverse.
    advice = _diversity_advice(tmp_path, 0.14, base_diversity=float("nan"))
    assert advice["rule"]["diversity_yardstick"] == "target"
    assert advice["techniques"]["freeze"]["disqualified"] == ["diversity 0.050 is below 0.5x the held-out target images' 0.140"]
    resumed = _diversity_advice(tmp_path, 0.14, drop_reference=True)
    assert resumed["target_diversity"] is None and resumed["rule"]["diversity_yardstick"] == "base"
    assert resumed["techniques"]["full"]["disqualified"] == ["diversity 0.150 is below 0.5x the base's 0.400"]


def test_when_the_pick_is_not_the_lowest_kid_the_verdict_credits_the_winners_margins_to_the_winner():
    """comparisons hold winner − technique: with the cheapest tied technique picked, 'it beats X' would hand the
    winner's margin to the pick. Each Δ names its pair."""
    from genadapt.eval.report import verdict_text

    def row(kid, size):
        return {"kid": kid, "copy_rate": 0.0, "replicates": 3, "artifact_bytes": size, "disqualified": [],
                "vs_base": {"difference": kid - 1.0, "ci_low": kid - 1.1, "ci_high": kid - 0.9}}

    def delta(d, low, high):
        return {"difference": d, "ci_low": low, "ci_high": high}

    results = {"settings": {"samples": 64}, "recommendation": [{
        "shots": 10, "techniques": {"full": row(0.2, 9e6), "lora": row(0.3, 2e5), "embedding": row(0.6, 3e3)}, "technique": "lora",
        "fidelity_winner": "full", "tied_with": ["lora"], "comparisons": {"lora": delta(-0.1, -0.25, 0.05), "embedding": delta(-0.4, -0.5, -0.3)},
        "base_kid": 1.0, "beats_base": True, "worse_than_base": False, "detectable": 0.2, "settings": {}}]}
    [line] = verdict_text(results)
    assert line.startswith("With 10 shot(s) use lora: KID 0.3000 (base 1.0000), copies 0%; it beats the unadapted base by 0.7000")
    assert "it beats embedding" not in line and "the lowest KID is full's, which beats embedding by 0.4000 KID [0.3000, 0.5000]" in line
    assert "tied with full (lowest KID) (Δ full − lora -0.1000 [-0.2500, +0.0500]); lora is the cheapest of the tied" in line

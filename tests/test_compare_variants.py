"""compare --variant: a technique with other settings runs beside the registered ones under its own name, with
exactly those settings, and is refused in one line when it is malformed, sets what compare sets for every run,
or is redefined under a name a resumed compare already holds runs of."""

import json

import pytest
import yaml
from click.testing import CliRunner
from safetensors import safe_open

from diffusion_fixtures import build_tiny_pipeline
from genadapt.config import VARIANT_TRAINING, AdaptConfig, CompareConfig
from genadapt.errors import UserError
from genadapt.recipes.compare import adapt_config, compare, shared_settings


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd")))


def _settings(base, out, **values):
    return CompareConfig(**{
        "base": base, "data": "builtin:digits/3", "reference": "builtin:digits/3", "out": out, "shots": [2], "techniques": ["lora"],
        "steps": 2, "samples": 4, "sample_steps": 1, "batch_size": 2, "replicates": 1, "lr_probe": 1, **values,
    })


def _lora_ranks(run) -> set[int]:
    """The ranks of the adapter a LoRA run saved: the rows of its kohya file's down (A) matrices."""
    with safe_open(str(run / "pytorch_lora_weights_kohya.safetensors"), "pt") as f:
        return {f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith("lora_down.weight")}


def test_a_variant_runs_beside_its_technique_with_its_own_settings(base, tmp_path):
    results = compare(_settings(base, tmp_path, variant=["lora_r8=lora,rank=8,lora_targets=to_q,to_v"]))
    assert {"lora-2shot-r0", "lora_r8-2shot-r0"} <= set(results["runs"])
    assert set(results["recommendation"][0]["techniques"]) == {"lora", "lora_r8"}
    runs = tmp_path / "runs"
    variant = yaml.safe_load((runs / "lora_r8-2shot-r0" / "config.yaml").read_text())
    plain = yaml.safe_load((runs / "lora-2shot-r0" / "config.yaml").read_text())
    assert (variant["rank"], variant["lora_targets"], plain["rank"]) == (8, ["to_q", "to_v"], 4)
    assert _lora_ranks(runs / "lora_r8-2shot-r0") == {8} and _lora_ranks(runs / "lora-2shot-r0") == {4}
    assert results["runs"]["lora_r8-2shot-r0"]["technique"] == "lora_r8"


def test_the_verdict_names_the_variants_technique_and_settings(base, tmp_path):
    from genadapt.eval.report import verdict_text
    from genadapt.recipes.compare import _used_settings

    settings = _settings(base, tmp_path, techniques=["ewc"], variant=["strong=ewc,loss=ewc:5000,learning_rate=3e-4"])
    used = _used_settings(settings, "strong", {"learning_rate": 2e-4})
    assert used == {"technique": "ewc", "loss": ["ewc:5000"], "ewc_samples": 16, "learning_rate": 2e-4}  # typed, the rate it trained at
    row = {"kid": 0.5, "copy_rate": 0.0, "replicates": 1, "artifact_bytes": 1, "disqualified": [], "vs_base": {"difference": -0.2, "ci_low": -0.3, "ci_high": -0.1}}
    results = {"settings": {}, "recommendation": [{
        "shots": 2, "techniques": {"strong": row}, "technique": "strong", "fidelity_winner": "strong", "tied_with": [], "comparisons": {},
        "base_kid": 0.7, "beats_base": True, "worse_than_base": False, "detectable": 0.1, "settings": used}]}
    assert "use strong (technique ewc, loss ewc:5000, ewc-samples 16, learning-rate 0.0002)" in verdict_text(results)[0]


def test_a_variant_sets_its_learning_rate_and_losses(base, tmp_path):
    settings = _settings(base, tmp_path, techniques=["ewc"], variant=["strong=ewc,loss=ewc:5000,learning_rate=3e-4"])
    config = adapt_config(settings, "strong", 2, 4, tmp_path / "run")
    assert config.learning_rate == 3e-4 and [(spec.name, spec.weight) for spec in config.loss] == [("ewc", 5000.0)]
    assert adapt_config(settings, "ewc", 2, 4, tmp_path / "run").learning_rate == 1e-4


def test_a_variant_changes_only_its_techniques_settings_and_the_training_recipe(base, tmp_path):
    """Everything compare sets alike for every run, and every other adapt setting (validation images, accumulation,
    resolution, ...), is refused; the training-recipe keys and the technique's own settings are taken, typed."""
    shared = set(shared_settings(_settings(base, tmp_path), 2, 4, tmp_path / "run"))
    assert not shared & set(VARIANT_TRAINING)
    for key in set(AdaptConfig.model_fields) - set(VARIANT_TRAINING) - {"technique_values", "train"}:
        with pytest.raises(UserError, match=f"--variant x: {key} is compare's to set alike for every run"):
            _settings(base, tmp_path, variant=[f"x=lora,{key}=1"])
    with pytest.raises(UserError, match="--variant x: the technique is the one after NAME="):
        _settings(base, tmp_path, variant=["x=lora,train=full"])
    technique, preset = _settings(base, tmp_path, variant=["x=lora,rank=16,lr_scheduler=cosine,learning_rate=1e-3"]).variants()["x"]
    assert (technique, preset["rank"], preset["lr_scheduler"], preset["learning_rate"]) == ("lora", 16, "cosine", 1e-3)


@pytest.mark.parametrize(("spec", "message"), [
    ("lora", "write NAME=TECHNIQUE,KEY=VALUE"),
    ("lora=lora,rank=8", "lora names a technique already"),
    ("cdc=lora", "cdc names a technique already"),  # a GAN technique's name: one name, one meaning in every compare
    ("base=lora", "base names the unadapted base already"),
    ("Big=lora", "must be lower-case letters"),
    ("x=nope", "nope is not a compare technique for diffusion bases"),
    ("x=lora,rank=many", "--variant x: --rank: Input should be a valid integer"),
    ("x=full,rank=8", "--variant x: rank is not read by this variant's technique"),
    ("x=lora,bogus=1", "bogus is not a setting of genadapt adapt"),
    ("x=lora,rank=4,8", "rank takes one value"),
    ("x=lora,validation=builtin:digits/5", "validation is compare's to set alike"),
    ("x=lora,8", "'8' is not KEY=VALUE"),
])
def test_a_malformed_variant_is_one_line_naming_it(base, tmp_path, spec, message):
    from genadapt.cli import app

    result = CliRunner().invoke(app, ["compare", "--base", base, "--data", "builtin:digits/3", "--variant", spec, "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_variants_repeat_on_the_command_line_and_join_the_techniques(base, tmp_path, monkeypatch):
    import genadapt.api as api
    from genadapt.cli import app

    seen = {}
    monkeypatch.setattr(api, "compare", lambda settings: seen.setdefault("settings", settings) and {"recommendation": []})
    result = CliRunner().invoke(app, ["compare", "--base", base, "--data", "builtin:digits/3", "--techniques", "lora", "--variant", "a=lora,rank=2",
                                      "--variant", "b=lora,lora_targets=to_q,to_k", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    settings = seen["settings"]
    assert settings.techniques == ["lora", "a", "b"] and settings.preset("b")["lora_targets"] == ["to_q", "to_k"]


def test_a_resumed_compare_keeps_each_variant_what_it_was(base, tmp_path):
    def run(*variants, techniques=("embedding",)):
        return compare(_settings(base, tmp_path, techniques=list(techniques), variant=list(variants)))

    run("v=embedding,vectors=1")
    with pytest.raises(UserError, match=r"--variant v: .* holds runs of v as v=embedding,vectors=1; give the new settings another name"):
        run("v=embedding,vectors=3")
    with pytest.raises(UserError, match=r"--variant v: .* holds runs of it; pass --variant v=embedding,vectors=1 again"):
        run()
    with pytest.raises(UserError, match=r"--variant w: .* was planned without it"):
        run("v=embedding,vectors=1", "w=embedding,vectors=2")
    again = run(" v = embedding, vectors=1.0 ".replace("1.0", "1"))  # the same settings, spelt otherwise: it resumes
    assert json.loads((tmp_path / "runs" / "v-2shot-r0" / "eval.json").read_text())["technique"] == "v"
    assert "v-2shot-r0" in again["runs"]


def test_a_variants_learning_rate_centres_its_probe(base, tmp_path):
    settings = _settings(base, tmp_path, techniques=["embedding"], variant=["slow=embedding,learning_rate=1e-3"], lr_probe=2, lr_probe_steps=2)
    compare(settings)
    probe = json.loads((tmp_path / "lr_probe.json").read_text())["techniques"]
    assert probe["slow"]["default"] == 1e-3 and probe["embedding"]["default"] == 5e-3
    assert sorted(probe["slow"]["rates"]) == pytest.approx([1e-3 / 3, 1e-3])

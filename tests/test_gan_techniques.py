"""Each GAN technique's defining property, on a tiny random StyleGAN2 (32 px) and builtin:digits shots."""

from __future__ import annotations

import argparse
import copy
import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from genadapt.config import AdaptConfig
from genadapt.errors import UserError
from genadapt.families import gan
from genadapt.families.stylegan2 import save_stylegan2
from genadapt.recipes.train_gan import adapt_gan
from genadapt.techniques import Step
from genadapt.models import load_run
from genadapt.techniques.cdc import CDC
from genadapt.techniques.ewc import GANEWC, GANEWCSettings
from genadapt.techniques.full import GANFullFineTuning
from genadapt.techniques.lora import has_lora, lora_state, merge_lora
from genadapt.zoo.pocket_stylegan2 import PocketStyleGAN2Config, build

DATA = "builtin:digits/3?shots=5"
TINY = PocketStyleGAN2Config(size=32, style_dim=16, n_mlp=2, channels={4: 16, 8: 16, 16: 8, 32: 8})


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    _, discriminator, g_ema = build(TINY)
    folder = tmp_path_factory.mktemp("tiny-stylegan2") / "model"
    save_stylegan2(folder, g_ema, discriminator, TINY.generator_kwargs(), TINY.discriminator_kwargs(),
                   extra={"pretraining": {"r1_gamma": 1.0}})
    return str(folder)


def _run(base, out, **values) -> dict:
    settings = dict(base=base, data=DATA, steps=3, batch_size=4, checkpointing_steps=2, num_validation_images=4, out=out)
    settings.update(values)
    if "ewc" in settings.get("loss", []):
        settings["ewc_samples"] = 8
    return adapt_gan(AdaptConfig(**settings))


def _parameters(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _base_weight(name: str, adapted: dict) -> torch.Tensor:
    """A base weight of a LoRA-adapted generator (parametrized weights live under `.original`)."""
    if name in adapted:
        return adapted[name]
    module, attribute = name.rsplit(".", 1)
    return adapted[f"{module}.parametrizations.{attribute}.original"]


def _images(generator, seed=0):
    z = torch.randn((3, generator.style_dim), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return generator([z], randomize_noise=False)[0]


def test_family_defaults_fill_gan_and_keep_diffusion(base, tmp_path):
    gan_config = AdaptConfig(base=base, data=DATA, out=tmp_path)
    assert (gan_config.family, gan_config.train, gan_config.augment, gan_config.steps, gan_config.lr) == ("gan", "freeze", "diffaugment", 1000, 0.002)
    diffusion_config = AdaptConfig(base="pocket-sd", data=DATA, loss=["ewc"], out=tmp_path)
    assert (diffusion_config.train, diffusion_config.augment, diffusion_config.steps, diffusion_config.section("ewc").ewc_samples) == ("lora", "none", 200, 32)
    assert AdaptConfig(base=base, data=DATA, loss=["ewc"], out=tmp_path).section("ewc").ewc_samples == 1024
    with pytest.raises(UserError, match="freeze-d"):
        AdaptConfig(base="pocket-sd", data=DATA, freeze_d=2, out=tmp_path)


def test_freezed_keeps_first_blocks_bitwise_and_trains_the_rest(base, tmp_path):
    _run(base, tmp_path / "freezed", train="freeze")  # FreezeD's default: all but the last two ResBlocks frozen
    assert yaml.safe_load((tmp_path / "freezed" / "config.yaml").read_text())["freeze_d"] == 2
    source = gan.load(base)
    before = _parameters(source.discriminator)
    after = load_file(tmp_path / "freezed" / "model" / "discriminator.safetensors")
    for name, value in before.items():
        if name.startswith(("convs.0.", "convs.1.")):
            assert torch.equal(after[name], value), f"{name} is in a frozen block"
        else:
            assert not torch.equal(after[name], value), f"{name} should train"
    generator = load_file(tmp_path / "freezed" / "model" / "generator.safetensors")
    g_before = _parameters(source.generator)
    assert sum(not torch.equal(generator[k], v) for k, v in g_before.items()) > 0.9 * len(g_before)


def test_full_changes_generator_and_discriminator(base, tmp_path):
    _run(base, tmp_path / "full", train="full", steps=2)
    source = gan.load(base)
    for module, file in ((source.generator, "generator"), (source.discriminator, "discriminator")):
        before, after = _parameters(module), load_file(tmp_path / "full" / "model" / f"{file}.safetensors")
        assert sum(not torch.equal(after[k], v) for k, v in before.items()) > 0.9 * len(before), file
    ema = load_file(tmp_path / "full" / "model" / "generator_ema.safetensors")
    assert any(not torch.equal(ema[k], v) for k, v in _parameters(source.g_ema).items())


def test_adam_flags_set_g_and_d_optimisers_with_ds_lazy_r1_correction(base, tmp_path):
    """Unset: StyleGAN2's β = (0, 0.99) for G, D's with the lazy-R1 correction β^c, c = 16/17; given: the flags' β."""
    def groups(run, **values):
        _run(base, tmp_path / run, train="full", steps=2, **values)
        state = torch.load(tmp_path / run / "checkpoints" / "state.pt", weights_only=True)
        return state["g_optim"]["param_groups"][0], state["d_optim"]["param_groups"][0]

    c = 16 / 17
    g, d = groups("default")
    assert tuple(g["betas"]) == (0.0, 0.99) and d["betas"][1] == pytest.approx(0.99 ** c) and g["eps"] == 1e-8
    g, d = groups("given", adam_beta1=0.5, adam_beta2=0.9, adam_epsilon=1e-6, adam_weight_decay=1e-3)
    assert tuple(g["betas"]) == (0.5, 0.9) and tuple(d["betas"]) == pytest.approx((0.5 ** c, 0.9 ** c))
    assert g["eps"] == d["eps"] == 1e-6 and g["weight_decay"] == d["weight_decay"] == 1e-3


def test_lora_leaves_base_bitwise_and_merges_exactly(base, tmp_path):
    summary = _run(base, tmp_path / "lora", train="lora", rank=2)
    model, source = summary["model"], gan.load(base)
    for network in (model.generator, model.g_ema):
        adapted = _parameters(network)
        for name, value in _parameters(source.generator).items():
            assert torch.equal(_base_weight(name, adapted), value), name
    assert any(v.abs().sum() > 0 for k, v in lora_state(model.g_ema).items() if k.endswith("lora_B"))
    unmerged = _images(model.g_ema)
    merged_generator = merge_lora(copy.deepcopy(model.g_ema))
    assert not has_lora(merged_generator) and set(merged_generator.state_dict()) == set(source.g_ema.state_dict())
    torch.testing.assert_close(_images(merged_generator), unmerged, atol=1e-5, rtol=0)
    assert (unmerged - _images(source.g_ema)).abs().max() > 1e-6  # the adapter does something
    reloaded = load_run(tmp_path / "lora")  # the base + lora.safetensors
    torch.testing.assert_close(gan.sample(reloaded, 3, seed=0), gan.sample(model, 3, seed=0), atol=1e-6, rtol=0)


def test_miner_trains_and_generator_stays_bitwise(base, tmp_path):
    summary = _run(base, tmp_path / "miner", train="embedding", steps=2)
    model, source = summary["model"], gan.load(base)
    for network in (model.generator, model.g_ema):
        after = _parameters(network)
        assert all(torch.equal(after[k], v) for k, v in _parameters(source.generator).items())
    miner = load_file(tmp_path / "miner" / "miner.safetensors")
    assert miner["net.2.weight"].abs().sum() > 0  # starts at zero: the miner moved
    assert summary["trainable_generator_parameters"] == sum(p.numel() for p in model.latent_map.parameters())
    assert torch.equal(gan.sample(load_run(tmp_path / "miner"), 3, seed=0), gan.sample(model, 3, seed=0))


def test_ewc_fisher_and_penalty(base):
    model = gan.load(base)
    GANFullFineTuning().prepare(model)
    ewc = GANEWC(GANEWCSettings(ewc_samples=8))
    ewc.prepare(model, images=None, config=SimpleNamespace(seed=0))
    assert ewc.penalty(model) == 0
    assert all((f >= 0).all() for f in ewc.fisher.values())
    assert sum(float(f.sum()) for f in ewc.fisher.values()) > 0
    parameters = dict(model.named_parameters())
    direction = {n: torch.randn_like(a) * 0.01 for n, a in ewc.anchor.items()}
    penalties = []
    for scale in (1.0, 2.0):
        with torch.no_grad():
            for name, anchor in ewc.anchor.items():
                parameters[name].copy_(anchor + scale * direction[name])
        penalties.append(float(ewc.penalty(model).detach()))
    assert 0 < penalties[0] < penalties[1]
    assert penalties[1] == pytest.approx(4 * penalties[0], rel=1e-4)  # quadratic in the drift


def test_cdc_is_zero_for_the_source_and_positive_after_drift(base):
    model = gan.load(base)
    GANFullFineTuning().prepare(model)
    cdc = CDC()
    cdc.prepare(model, images=[None] * 5, config=SimpleNamespace(seed=0))
    assert cdc.anchors.shape == (5, model.style_dim) and "cdc_patch" in model.d_heads

    def loss() -> float:
        return float(cdc.loss(Step(0, model, {}, {}, torch.Generator().manual_seed(1)))["cdc"].detach())

    assert abs(loss()) < 1e-9
    with torch.no_grad():
        for name, parameter in model.generator.named_parameters():
            if name.startswith("convs."):
                parameter.add_(torch.randn_like(parameter) * 0.5)
    assert loss() > 0
    logits = cdc.patch_logits(model, torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 1, 8, 8)  # convs.2.conv2, the measured default at 32 px: 30 px patches


def test_cdc_patch_critic_sees_the_papers_share_of_the_image_where_unmeasured():
    from genadapt.techniques.cdc import patch_block, patch_receptive_field

    # The official --highp 1 critic at 256 px (convs.3.conv2 + its 3x3 head) sees 66 px.
    assert patch_receptive_field(3) == 66 and patch_block(256, 6) == 3
    assert patch_receptive_field(1) == 12 and patch_block(64, 4) == 1  # 12/64 is the nearest share to 66/256
    assert patch_block(32, 3) == 2 and patch_receptive_field(2) == 30  # measured at 32 px (benchmarks/cdc_patch.py)
    assert patch_block(32, 1) == 1  # a discriminator without the measured block falls back to the share rule


def test_cdc_patch_block_chooses_the_critics_layer_and_is_recorded(base, tmp_path):
    from genadapt.techniques.cdc import CDCSettings

    model = gan.load(base)
    GANFullFineTuning().prepare(model)
    cdc = CDC(CDCSettings(cdc_patch_block=3))
    cdc.prepare(model, images=[None] * 5, config=SimpleNamespace(seed=0))
    assert cdc.patch_logits(model, torch.zeros(2, 3, 32, 32)).shape == (2, 1, 4, 4)  # convs.3.conv2: 4x4 at 32 px
    with pytest.raises(UserError, match="--cdc-patch-block 4: this 32 px discriminator has ResBlocks 1 to 3"):
        CDC(CDCSettings(cdc_patch_block=4)).prepare(gan.load(base), images=[None] * 5, config=SimpleNamespace(seed=0))
    _run(base, tmp_path / "default", train="full", loss=["cdc"], steps=1)
    _run(base, tmp_path / "block1", train="full", loss=["cdc"], cdc_patch_block=1, steps=1)
    assert yaml.safe_load((tmp_path / "default" / "config.yaml").read_text())["cdc_patch_block"] == 2
    assert yaml.safe_load((tmp_path / "block1" / "config.yaml").read_text())["cdc_patch_block"] == 1


@pytest.mark.parametrize("train, losses", [("full", ["cdc", "ewc"]), ("lora", []), ("embedding", ["cdc"])])
def test_resume_matches_uninterrupted_run(base, tmp_path, train, losses):
    settings = dict(train=train, loss=losses, checkpointing_steps=2)
    _run(base, tmp_path / "straight", steps=4, **settings)
    _run(base, tmp_path / "resumed", steps=2, **settings)
    _run(base, tmp_path / "resumed", steps=4, **settings)
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()] for run in ("straight", "resumed")]
    assert logs[0] == logs[1] and len(logs[0]) == 4
    assert {*losses, "d_adv", "g_adv", "r1"} <= set(logs[0][0])
    if "cdc" in losses:
        assert [r["adversarial"] for r in logs[0]] == ["anchor", "patch", "patch", "patch"]
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["artifact_bytes"] > 0 and summary["trainable_parameters"] > 0
    for artifact in summary["artifacts"]:
        for file in sorted((tmp_path / "straight" / artifact).rglob("*.safetensors")) or [tmp_path / "straight" / artifact]:
            a, b = load_file(file), load_file(tmp_path / "resumed" / file.relative_to(tmp_path / "straight"))
            assert all(torch.equal(a[k], b[k]) for k in a), file


def test_anchoring_losses_and_ada_are_logged_by_name(base, tmp_path):
    _run(base, tmp_path / "anchored", train="freeze", freeze_d=1, preset="synthesis", loss=["l2sp", "feature"], augment="ada", steps=2)
    records = [json.loads(line) for line in (tmp_path / "anchored" / "log.jsonl").read_text().splitlines()]
    assert {"l2sp_g", "l2sp_d", "feature", "augment_p"} <= set(records[-1])
    assert records[0]["l2sp_g"] == 0 and records[-1]["l2sp_g"] > 0  # anchored to the source, then drifting
    g_after = load_file(tmp_path / "anchored" / "model" / "generator.safetensors")
    mapping = {k: v for k, v in _parameters(gan.load(base).generator).items() if k.startswith("style.")}
    assert mapping and all(torch.equal(g_after[k], v) for k, v in mapping.items())  # preset synthesis: mapping frozen


def test_rosinality_checkpoint_needs_opt_in(base, tmp_path):
    model = gan.load(base)
    path = tmp_path / "rosinality.pt"
    torch.save({"g_ema": model.g_ema.state_dict(), "d": model.discriminator.state_dict(), "args": argparse.Namespace(size=32)}, path)
    with pytest.raises(UserError, match="allow-pickle"):
        gan.load(str(path))
    loaded = gan.load(str(path), allow_pickle=True)
    assert torch.equal(gan.sample(loaded, 2, seed=0), gan.sample(model, 2, seed=0))
    assert torch.equal(loaded.discriminator(torch.zeros(4, 3, 32, 32)), model.discriminator(torch.zeros(4, 3, 32, 32)))


def test_gan_loop_runs_on_the_accelerators_device(base, tmp_path):
    from genadapt.recipes import make_accelerator

    accelerator = make_accelerator("no", 1, cpu=True)
    seen = []
    original = gan.GANModel.generate

    def recording(self, styles, *args, **kwargs):
        seen.extend(s.device for s in styles)
        seen.extend(n.device for n in kwargs.get("noise") or [])
        return original(self, styles, *args, **kwargs)

    gan.GANModel.generate = recording
    try:
        summary = adapt_gan(AdaptConfig(base=base, data=DATA, train="full", steps=2, batch_size=4, num_validation_images=2, out=tmp_path / "r"), accelerator)
    finally:
        gan.GANModel.generate = original
    device = accelerator.device
    assert summary["device"] == str(device) and json.loads((tmp_path / "r" / "run.json").read_text())["device"] == str(device)
    model = summary["model"]
    assert all(p.device == device for _, p in model.named_parameters()) and all(p.device == device for p in model.g_ema.parameters())
    for optimizer in summary["optimizers"]:
        states = [v for state in optimizer.state_dict()["state"].values() for v in state.values() if torch.is_tensor(v) and v.ndim]
        assert states and all(v.device == device for v in states)
    assert seen and all(d == device for d in seen)


def test_two_runs_in_one_process_may_use_different_precisions(base, tmp_path):
    first = _run(base, tmp_path / "bf16", train="lora", rank=2, steps=1, mixed_precision="bf16")
    second = _run(base, tmp_path / "fp32", train="lora", rank=2, steps=1)
    assert first["steps"] == second["steps"] == 1
    assert yaml.safe_load((tmp_path / "bf16" / "config.yaml").read_text())["mixed_precision"] == "bf16"

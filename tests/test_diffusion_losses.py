"""Loss techniques: EWC and the relational KL are 0 at the source and grow with drift."""

import pytest
import torch

from diffusion_fixtures import build_tiny_pipeline
from genadapt.config import AdaptConfig
from genadapt.data import load_dataset
from genadapt.families import diffusion
from genadapt.techniques import Step
from genadapt.techniques.ewc import DiffusionEWC, EWCSettings
from genadapt.techniques.lora import LoRA, LoRASettings
from genadapt.techniques.relational import Relational, pairwise_kl


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd")))


def _config(tmp_path, **values):
    return AdaptConfig(base="x", data="builtin:digits/3", out=tmp_path, sample_steps=2, **values)


def test_ewc_zero_at_start_fisher_positive_and_growing_with_drift(base, tmp_path):
    model = diffusion.load(base)
    model.unet.requires_grad_(True)
    images = load_dataset("builtin:digits/3?shots=2", resolution=32)
    ewc = DiffusionEWC(EWCSettings(ewc_samples=4))
    ewc.prepare(model, images, _config(tmp_path))
    assert float(ewc.penalty(model)) == 0.0
    assert all((f >= 0).all() for f in ewc.fisher.values()) and sum(f.sum() for f in ewc.fisher.values()) > 0
    penalties = []
    for scale in (1e-3, 1e-2):
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in ewc.anchor:
                    parameter.copy_(ewc.anchor[name] + scale)
        penalties.append(float(ewc.penalty(model)))
    assert 0 < penalties[0] < penalties[1]


def test_pairwise_kl_zero_for_identical_and_positive_for_different():
    x = torch.randn(4, 3, 8, 8)
    assert float(pairwise_kl(x, x)) == pytest.approx(0.0, abs=1e-7)
    assert float(pairwise_kl(x, torch.randn(4, 3, 8, 8))) > 1e-4


def test_relational_zero_before_adaptation_with_lora(base, tmp_path):
    model = diffusion.load(base)
    LoRA(LoRASettings(rank=2)).prepare(model)  # B = 0: the adapted model equals the source
    relational = Relational()
    relational.prepare(model, None, _config(tmp_path))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=generator)
    noisy, noise, timesteps = diffusion.add_noise(model, latents, generator)
    text = diffusion.encode_text(model, diffusion.tokenize(model, ["a", "b", "c"]))
    prediction = diffusion.predict(model, model.unet, noisy, timesteps, text)
    step = Step(0, model, {"text": text}, {"noisy": noisy, "timesteps": timesteps, "prediction": prediction})
    assert float(relational.loss(step)["relational"]) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for name, parameter in model.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    drifted = diffusion.predict(model, model.unet, noisy, timesteps, text)
    step = Step(0, model, {"text": text}, {"noisy": noisy, "timesteps": timesteps, "prediction": drifted})
    assert float(relational.loss(step)["relational"]) > 1e-6

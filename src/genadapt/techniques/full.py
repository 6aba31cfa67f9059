"""Full fine-tuning: every weight of the generator trains (TGAN, Wang et al. 2018; DreamBooth without prior)."""

from __future__ import annotations

from pathlib import Path

from genadapt.techniques import trainable


class FullFineTuning:
    name = "full"
    weight_decay = 1e-2

    def __init__(self, train_text_encoder: bool = False):
        self.trains_text_encoder = train_text_encoder

    def prepare(self, model) -> None:
        model.unet.requires_grad_(True)
        if self.trains_text_encoder:
            for _, encoder in model.text_encoders:
                encoder.requires_grad_(True)

    def parameters(self, model):
        return trainable(model)

    def save(self, model, out: Path) -> list[Path]:
        from genadapt.families.diffusion import save_pipeline

        return [save_pipeline(model, Path(out) / "pipeline")]

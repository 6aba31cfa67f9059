"""LoRA (Hu et al. 2021): W' = W + (alpha / r) · B A with A ∈ R^{r×k}, B ∈ R^{d×r}, B initialised to 0.

Through peft: DoRA (Liu et al. 2024) adds a learned magnitude, rsLoRA (Kalajdzievski 2023) scales
by alpha / sqrt(r). The base weights never change; the artifact is the adapter alone.
"""

from __future__ import annotations

from pathlib import Path

from genadapt.techniques import trainable

ADAPTER = "genadapt"
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # as diffusers' DreamBooth LoRA


class LoRA:
    name = "lora"
    weight_decay = 1e-2

    def __init__(self, rank=4, alpha=None, dropout=0.0, use_dora=False, use_rslora=False, targets=None, text_encoder=False):
        self.rank = rank
        self.alpha = float(alpha if alpha is not None else rank)
        self.dropout = dropout
        self.use_dora = use_dora
        self.use_rslora = use_rslora
        self.targets = list(targets or ["to_q", "to_k", "to_v", "to_out.0"])
        self.trains_text_encoder = text_encoder

    @classmethod
    def from_config(cls, config) -> "LoRA":
        return cls(config.rank, config.lora_alpha, config.lora_dropout, config.use_dora, config.use_rslora, config.lora_targets, config.lora_text_encoder)

    def peft_config(self, targets):
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
            use_dora=self.use_dora,
            use_rslora=self.use_rslora,
            init_lora_weights="gaussian",  # A ~ N(0, 1/r), B = 0: the adapted model starts equal to the base
        )

    @property
    def scale(self) -> float:
        """The factor on B·A that peft applies; what kohya's `alpha / r` must reproduce."""
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)

    def prepare(self, model) -> None:
        from genadapt.errors import UserError

        try:
            model.unet.add_adapter(self.peft_config(self.targets), adapter_name=ADAPTER)
        except ValueError as exc:
            raise UserError(f"--lora-targets {','.join(self.targets)}: {str(exc).splitlines()[0]}") from None
        if self.trains_text_encoder:
            from peft import inject_adapter_in_model

            # transformers' own add_adapter demands a newer peft than PyPI has; peft injects the same layers.
            for _, encoder in model.text_encoders:
                inject_adapter_in_model(self.peft_config(TEXT_ENCODER_TARGETS), encoder, adapter_name=ADAPTER)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("lora_" in name)

    def parameters(self, model):
        return trainable(model)

    def save(self, model, out: Path) -> list[Path]:
        from genadapt.export.lora import save_lora

        return save_lora(model, self, Path(out), model.extras.get("training_metadata", {}))

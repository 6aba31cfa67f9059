"""Layer freezing / selective fine-tuning: only parameters that match the user's patterns train.

Patterns are shell-style (`fnmatch`) over parameter names, either in full (`unet.up_blocks.*`,
`text_encoder.*`) or relative to the main module (`up_blocks.*` for the UNet). FreezeD (Mo et al.
2020) is the GAN case of the same rule: the discriminator's first blocks from the input stay frozen.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path

from genadapt.errors import UserError
from genadapt.techniques import trainable

PRESETS = {
    "attention": ["*attentions.*"],  # transformer blocks: self- and cross-attention, their norms and projections
    "cross-attention": ["*attn2.*"],
    "decoder": ["up_blocks.*", "conv_norm_out.*", "conv_out.*"],
    "encoder": ["conv_in.*", "down_blocks.*"],
    "norms": ["*norm*"],
}


def _matches(full_name: str, patterns: list[str]) -> bool:
    relative = full_name.split(".", 1)[1]
    return any(fnmatchcase(full_name, pattern) or fnmatchcase(relative, pattern) for pattern in patterns)


class SelectiveFineTuning:
    name = "freeze"
    weight_decay = 1e-2

    def __init__(self, trainable: list[str] | None = None, frozen: list[str] | None = None, preset: str | None = None):
        if preset is not None:
            if preset not in PRESETS:
                raise UserError(f"--preset {preset}: unknown; choose one of {', '.join(PRESETS)}")
            trainable = list(trainable or []) + PRESETS[preset]
        if not trainable and not frozen:
            raise UserError("--train freeze needs --trainable PATTERN, --freeze PATTERN or --preset NAME (e.g. --trainable 'up_blocks.*')")
        self.trainable_patterns = list(trainable or [])
        self.frozen_patterns = list(frozen or [])
        self.trains_text_encoder = any(p.startswith("text_encoder") for p in self.trainable_patterns)

    def selected(self, model) -> list[str]:
        chosen = []
        for name, _ in model.named_parameters():
            in_scope = name.startswith("unet.") or self.trains_text_encoder
            if self.trainable_patterns:
                wanted = _matches(name, self.trainable_patterns)
            else:
                wanted = in_scope
            if wanted and not _matches(name, self.frozen_patterns):
                chosen.append(name)
        return chosen

    def prepare(self, model) -> None:
        chosen = set(self.selected(model))
        if not chosen:
            examples = ", ".join(name for name, _ in list(model.named_parameters())[:3])
            raise UserError(f"no parameter matches the freeze/trainable patterns; names look like {examples}")
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name in chosen)

    def parameters(self, model):
        return trainable(model)

    def save(self, model, out: Path) -> list[Path]:
        from genadapt.families.diffusion import save_pipeline

        return [save_pipeline(model, Path(out) / "pipeline")]

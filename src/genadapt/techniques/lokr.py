"""LoKr (KronA, Edalati et al. 2022; LyCORIS, Yeh et al. 2024): ΔW = (alpha / r) · W1 ⊗ W2.

Each dimension is split in two (out = a·b, in = c·d, LyCORIS's `factorization`, `--factor`): W1 is a small
[a, c] block, W2 the [b, d] block it scales, itself factored as W2a W2b at rank r when r is below half its larger
side (and W1 too with `--decompose-both`). Diffusion: through peft's LoKr on the UNet (`peft.LoKrConfig`, a copy
of LyCORIS's `lycoris/modules/lokr.py`), initialised as LyCORIS does (`init_weights="lycoris"`: W2, or W2b, = 0,
so the adapted UNet starts equal to the base). Where neither half is factored ("full dimension", e.g. a large
`--rank`) LyCORIS, ComfyUI and A1111 ignore alpha (scale 1); peft would scale by alpha / r, so those modules are
pinned to alpha = r. The base weights never change; the run writes a LyCORIS file (`lokr.safetensors`) and the
peft folder it reloads from.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import field_validator

from genadapt.config import setting
from genadapt.techniques import Implementation, Technique, register, trainable
from genadapt.techniques.lora import ADAPTER, ATTENTION_TARGETS, RankSettings, inject_peft


class LoKrSettings(RankSettings):
    # Defaults are LyCORIS's (`LokrModule.__init__`: factor -1, decompose_both/use_tucker False, dropouts 0),
    # which peft's LoKrConfig shares (decompose_factor -1).
    lora_targets: list[str] = setting(lambda: list(ATTENTION_TARGETS), "UNet modules the adapter wraps (peft names; repeatable).  [default: to_q to_k to_v to_out.0]")
    factor: int = setting(-1, "--train lokr: split each dimension into factor × dim/factor (-1: the most balanced split).", ge=-1, aliases=("--decompose-factor",))
    decompose_both: bool = setting(False, "--train lokr: also factor the small Kronecker half W1 at rank r (LyCORIS decompose_both).")
    rank_dropout: float = setting(0.0, "--train loha, lokr: LyCORIS rank dropout, drop rows of ΔW while training.", ge=0, lt=1)
    module_dropout: float = setting(0.0, "--train loha, lokr: LyCORIS module dropout, skip a module's ΔW for a whole step while training.", ge=0, lt=1)
    use_tucker: bool = setting(False, "--train loha, lokr: Tucker/CP factors for k×k convs (FedPara Prop. 3; peft's use_effective_conv2d).", aliases=("--use-effective-conv2d",))

    @field_validator("factor")
    @classmethod
    def _balanced_or_positive(cls, value: int) -> int:
        # peft's factorization treats only -1 as "balanced"; 0 would divide by zero.
        if value == 0:
            raise ValueError("must be -1 (the most balanced split) or a positive integer, e.g. --factor 8")
        return value


class LoKr:
    """Trains the UNet's LoKr factors only (text encoders and base weights stay frozen)."""

    name = "lokr"
    weight_decay = 1e-2  # as LoRA (torch AdamW's default, which sd-scripts' LyCORIS training also uses)

    def __init__(self, settings: LoKrSettings):
        self.settings = settings
        self.rank = settings.rank
        self.alpha = settings.resolved_alpha
        self.targets = list(settings.lora_targets)

    def peft_config(self):
        from peft import LoKrConfig

        return LoKrConfig(
            r=self.rank, alpha=self.alpha, target_modules=self.targets, rank_dropout=self.settings.rank_dropout,
            module_dropout=self.settings.module_dropout, use_effective_conv2d=self.settings.use_tucker,
            decompose_both=self.settings.decompose_both, decompose_factor=self.settings.factor, init_weights="lycoris",
        )

    @property
    def network_args(self) -> dict:
        """The same network as LyCORIS's `--network_args` (what the file's `ss_network_args` records)."""
        s = self.settings
        return {"algo": "lokr", "factor": s.factor, "decompose_both": s.decompose_both, "use_tucker": s.use_tucker,
                "rank_dropout": s.rank_dropout, "module_dropout": s.module_dropout}

    def prepare(self, model) -> None:
        inject_peft(model, self.peft_config(), self.targets)
        pin_full_dimension_scale(model.unet)

    def parameters(self, model):
        return trainable(model)

    def save(self, model, out: Path) -> list[Path]:
        from genadapt.export.lycoris import save_lycoris

        return save_lycoris(model, self, Path(out), model.extras.get("training_metadata", {}))


def pin_full_dimension_scale(unet) -> list[str]:
    """Scale 1 on every LoKr module whose halves are both full matrices, as LyCORIS trains them (`LokrModule`:
    `if self.use_w2 and self.use_w1: alpha = lora_dim`) and ComfyUI/A1111 apply them (no factored half, no dim).

    Recorded as `alpha_pattern` entries (alpha = r) in the adapter's config, so the saved config rebuilds the same
    scales in peft. Returns the pinned module paths."""
    from peft.tuners.lokr import LoKrLayer

    config = unet.peft_config[ADAPTER]
    pinned = []
    for name, layer in unet.named_modules():
        if isinstance(layer, LoKrLayer) and ADAPTER in layer.lokr_w1 and ADAPTER in layer.lokr_w2 and layer.scaling[ADAPTER] != 1.0:
            rank = layer.r[ADAPTER]
            layer.alpha[ADAPTER], layer.scaling[ADAPTER] = rank, 1.0  # what peft's update_layer sets for alpha = r
            config.alpha_pattern[re.escape(name)] = rank  # peft matches pattern keys as regexes
            pinned.append(name)
    return pinned


def load_diffusion_lokr(load_base, run: Path):
    """The base with the run's peft LoKr folder injected into its UNet (its config carries the pinned scales)."""
    from peft import LoKrConfig

    from genadapt.export.lycoris import PEFT_FOLDER, load_peft_folder

    model = load_base()
    load_peft_folder(model, Path(run) / PEFT_FOLDER, LoKrConfig)
    return model


register(Technique(
    name="lokr",
    kind="parameter",
    summary="Kronecker-product adapters (LyCORIS LoKr); the base never changes",
    families={
        "diffusion": Implementation(
            build=LoKr, settings=LoKrSettings,
            # LyCORIS trains LoRA, LoHa and LoKr at one learning rate (example_configs/training_configs/kohya/
            # {lora,loha,lokr}_config.toml: 2e-4 each); genadapt's LoRA default is 1e-4, so LoKr takes it too.
            learning_rate=1e-4,
            compare={"train": "lokr", "rank": 4, "learning_rate": 1e-4}, load=load_diffusion_lokr,
        ),
    },
))

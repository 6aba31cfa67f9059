"""LoHa (Hyeon-Woo et al. 2022, FedPara; LyCORIS, Yeh et al. 2024): ΔW = (alpha / r) · (W1a W1b) ⊙ (W2a W2b).

The Hadamard product of two rank-r products can reach rank r² (FedPara's rank bound) with the parameters of a rank-2r LoRA. Diffusion:
through peft's LoHa on the UNet (`peft.LoHaConfig`; peft's layer is a copy of LyCORIS's `lycoris/modules/loha.py`);
conv kernels are factored as [out, in·k·k] matrices, or with `--use-tucker` as FedPara's Proposition 3 (a
[r, r, k, k] core per product). peft initialises W1a, W1b, W2a by Kaiming and W2b = 0, so the adapted UNet
starts equal to the base (LyCORIS zeroes W2a instead; either makes ΔW = 0). The base weights never change;
the run writes a LyCORIS file (`loha.safetensors`, for A1111/ComfyUI) and the peft folder it reloads from.
"""

from __future__ import annotations

from pathlib import Path

from genadapt.config import setting
from genadapt.techniques import Implementation, Technique, register, trainable
from genadapt.techniques.lora import ATTENTION_TARGETS, RankSettings, inject_peft


class LoHaSettings(RankSettings):
    # Defaults are LyCORIS's (`LohaModule.__init__`: dropouts 0, use_tucker False), which peft's LoHaConfig shares.
    lora_targets: list[str] = setting(lambda: list(ATTENTION_TARGETS), "UNet modules the adapter wraps (peft names; repeatable).  [default: to_q to_k to_v to_out.0]")
    rank_dropout: float = setting(0.0, "--train loha, lokr: LyCORIS rank dropout, drop rows of ΔW while training.", ge=0, lt=1)
    module_dropout: float = setting(0.0, "--train loha, lokr: LyCORIS module dropout, skip a module's ΔW for a whole step while training.", ge=0, lt=1)
    use_tucker: bool = setting(False, "--train loha, lokr: Tucker/CP factors for k×k convs (FedPara Prop. 3; peft's use_effective_conv2d).", aliases=("--use-effective-conv2d",))


class LoHa:
    """Trains the UNet's LoHa factors only (text encoders and base weights stay frozen)."""

    name = "loha"
    weight_decay = 1e-2  # as LoRA (torch AdamW's default, which sd-scripts' LyCORIS training also uses)

    def __init__(self, settings: LoHaSettings):
        self.settings = settings
        self.rank = settings.rank
        self.alpha = settings.resolved_alpha
        self.targets = list(settings.lora_targets)

    def peft_config(self):
        from peft import LoHaConfig

        return LoHaConfig(
            r=self.rank, alpha=self.alpha, target_modules=self.targets, rank_dropout=self.settings.rank_dropout,
            module_dropout=self.settings.module_dropout, use_effective_conv2d=self.settings.use_tucker,
        )

    @property
    def network_args(self) -> dict:
        """The same network as LyCORIS's `--network_args` (what the file's `ss_network_args` records)."""
        return {"algo": "loha", "use_tucker": self.settings.use_tucker, "rank_dropout": self.settings.rank_dropout,
                "module_dropout": self.settings.module_dropout}

    def prepare(self, model) -> None:
        inject_peft(model, self.peft_config(), self.targets)

    def parameters(self, model):
        return trainable(model)

    def save(self, model, out: Path) -> list[Path]:
        from genadapt.export.lycoris import save_lycoris

        return save_lycoris(model, self, Path(out), model.extras.get("training_metadata", {}))


def load_diffusion_loha(load_base, run: Path):
    """The base with the run's peft LoHa folder injected into its UNet."""
    from peft import LoHaConfig

    from genadapt.export.lycoris import PEFT_FOLDER, load_peft_folder

    model = load_base()
    load_peft_folder(model, Path(run) / PEFT_FOLDER, LoHaConfig)
    return model


register(Technique(
    name="loha",
    kind="parameter",
    summary="Hadamard-product low-rank adapters (LyCORIS LoHa); the base never changes",
    families={
        "diffusion": Implementation(
            build=LoHa, settings=LoHaSettings,
            # LyCORIS trains LoRA, LoHa and LoKr at one learning rate (example_configs/training_configs/kohya/
            # {lora,loha,lokr}_config.toml: 2e-4 each); genadapt's LoRA default is 1e-4, so LoHa takes it too.
            learning_rate=1e-4,
            compare={"train": "loha", "rank": 4, "learning_rate": 1e-4}, load=load_diffusion_loha,
        ),
    },
))

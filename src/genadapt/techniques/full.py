"""Full fine-tuning: every weight of the generator trains (TGAN, Wang et al. 2018; DreamBooth without prior)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from genadapt.config import setting
from genadapt.techniques import Implementation, NoSettings, Technique, register, set_trainable, trainable

# Learning rates the diffusers/kohya recipes start from (diffusion_anchors.md §1); StyleGAN2 / CDC / FreezeD
# use Adam at 0.002 for every GAN technique (gan_anchors.md §7).
GAN_LR = 0.002


SINGLE_FILE_HELP = "--train full/freeze: also write <output-name>.safetensors, one file in the original SD 1.x layout (what A1111 lists)."


class DiffusionFullSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train_text_encoder: bool = setting(False, "--train full: also train the text encoder(s).")
    save_single_file: bool = setting(False, SINGLE_FILE_HELP)


def save_pipeline_run(model, out: Path, single_file: bool) -> list[Path]:
    """The adapted pipeline folder, and with --save-single-file its one-file twin `<output name>.safetensors`."""
    from genadapt.families import diffusion

    out = Path(out)
    files = [diffusion.save(model, out / "pipeline")]
    if single_file:
        from genadapt.export.checkpoint import save_single_file
        from genadapt.export.embeddings import file_stem

        name = file_stem(str(model.extras.get("training_metadata", {}).get("ss_output_name") or out.name))
        files.append(save_single_file(model, out / f"{name}.safetensors", name))
    return files


class DiffusionFullFineTuning:
    name = "full"
    saves_pipeline = True  # the artifact is the whole pipeline, as large as the base
    weight_decay = 1e-2

    def __init__(self, settings: DiffusionFullSettings):
        self.trains_text_encoder = settings.train_text_encoder
        self.single_file = settings.save_single_file

    def prepare(self, model) -> None:
        if self.single_file:
            from genadapt.export.checkpoint import check_single_file

            check_single_file(model)  # before training, not after it
        model.unet.requires_grad_(True)
        if self.trains_text_encoder:
            for _, encoder in model.text_encoders:
                encoder.requires_grad_(True)

    def parameters(self, model):
        return trainable(model)

    def save(self, model, out: Path) -> list[Path]:
        return save_pipeline_run(model, out, self.single_file)


def load_diffusion_pipeline_run(load_base, run: Path):
    """full and freeze runs keep the whole adapted pipeline: load it, not the base."""
    from genadapt.families import diffusion

    return diffusion.load(str(Path(run) / "pipeline"))


class GANFullFineTuning:
    """TGAN (Wang et al. 2018, "Transferring GANs"): every weight of G and D trains from the source."""

    name = "full"
    weight_decay = 0.0

    def __init__(self, settings=None):
        self.resolved: dict = {"freeze_d": 0}

    def prepare(self, model) -> None:
        set_trainable(model, lambda name: name.startswith(("generator.", "discriminator.")))

    def parameters(self, model):
        return trainable(model)

    def save(self, model, out: Path) -> list[Path]:
        return save_gan_model(model, out, self.name)


def save_gan_model(model, out: Path, technique: str) -> list[Path]:
    from genadapt.families import gan

    return [gan.save(model, Path(out) / "model", extra={"technique": technique})]


def load_gan_model_run(load_base, run: Path):
    from genadapt.families import gan

    return gan.load(str(Path(run) / "model"))


register(Technique(
    name="full",
    kind="parameter",
    summary="every weight trains (TGAN for GANs)",
    families={
        "diffusion": Implementation(
            build=DiffusionFullFineTuning, settings=DiffusionFullSettings, learning_rate=1e-5,
            # A few hundred CPU steps, not the thousands of the GPU recipes: 1e-4 (docs/benchmarks.md).
            compare={"train": "full", "learning_rate": 1e-4}, load=load_diffusion_pipeline_run,
        ),
        "gan": Implementation(build=GANFullFineTuning, settings=NoSettings, learning_rate=GAN_LR, compare={"train": "full"}, load=load_gan_model_run),
    },
))

"""Embedding optimisation: the generator stays frozen, only a small input-side representation learns.

Diffusion: textual inversion (Gal et al. 2022, eq. 2): v* = argmin_v E ||ε − ε_θ(z_t, t, c_θ(y(v)))||². The
generator and the text encoder stay frozen; only the new placeholder rows of the token embedding learn (for
SDXL, in both text encoders, as diffusers' SDXL textual-inversion example). The rows are a parameter of their own
beside the frozen table (`PlaceholderRows`): diffusers' example trains the whole table and restores the old rows
after each step, so its backward, optimiser and checkpoints carry the vocabulary (49,408 x 768 on SD 1.5); here
they carry vectors x width numbers, and the old rows cannot move.

GAN: MineGAN's latent miner (Wang et al. CVPR 2020): learn where to sample the frozen G's latent space.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from genadapt.config import setting
from genadapt.errors import UserError
from genadapt.techniques import Implementation, Technique, register, trainable
from genadapt.techniques.freeze import FreezeDSettings, train_discriminator_except_frozen
from genadapt.techniques.full import GAN_LR


# Textual inversion's prompt templates (Gal et al. 2022's code, as diffusers' textual_inversion.py uses them):
# the placeholder stands in a short sentence, so the embedding learns the concept, not the caption's words.
OBJECT_TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}", "a photo of a clean {}",
    "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}", "a photo of the cool {}", "a close-up photo of a {}",
    "a bright photo of the {}", "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
]  # fmt: skip
STYLE_TEMPLATES = [
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}", "a good painting in the style of {}",
    "a rendition in the style of {}", "a nice painting in the style of {}", "a small painting in the style of {}",
    "a weird painting in the style of {}", "a large painting in the style of {}",
]  # fmt: skip


class EmbeddingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    learnable_property: Literal["object", "style"] | None = setting(None, "Train on textual inversion's prompt templates instead of the captions (diffusers' --learnable_property): object 'a photo of a {}', style 'a painting in the style of {}'; one template per image.")
    token: str = setting("<genadapt>", "--train embedding: the new token.", aliases=("--placeholder-token",), min_length=1)
    token_position: Literal["start", "end"] = setting("start", "Where the placeholder joins a caption that lacks it: start ('<t> a flag of France'), or end, where a causal text encoder (CLIP) encodes the caption's own words exactly as without it (on unseen-content prompts it kept more content and added more of the target's style, and with genadapt sample --embedding-weight it keeps the content; on the target's own captions it scored worse: docs/benchmarks.md).")
    init_token: str | None = setting(None, "Word to start the embedding from (else the mean of the vocabulary).", aliases=("--initializer-token",))
    vectors: int = setting(1, "Embedding vectors per token.", ge=1, le=75, aliases=("--num-vectors",))
    max_norm: float | None = setting(None, "Cap each learned vector's L2 norm at this multiple of the vocabulary's mean word norm (1: a typical word's), so the placeholder cannot drown the prompt's other words.", gt=0)


class PlaceholderRows(nn.Module):
    """A token embedding whose placeholder rows are trained apart from the frozen table: ids in `token_ids` read
    `rows` (fp32, what the optimiser holds), every other id reads the table. With `max_norm`, a row longer than it
    is read scaled back onto that radius (a projection inside the forward, so gradients see the cap)."""

    def __init__(self, table: nn.Embedding, token_ids: list[int], max_norm: float | None = None):
        super().__init__()
        self.table = table.requires_grad_(False)
        self.rows = nn.Parameter(table.weight.detach()[token_ids].float().clone())
        self.max_norm = max_norm
        lookup = torch.full((table.num_embeddings,), -1, dtype=torch.long)
        lookup[token_ids] = torch.arange(len(token_ids))
        self.register_buffer("lookup", lookup.to(table.weight.device), persistent=False)

    @property
    def weight(self) -> Tensor:
        """The table with the current rows written in: what a reader of `get_input_embeddings().weight` expects."""
        weight = self.table.weight.detach().clone()
        weight[self.lookup >= 0] = self.vectors().detach().to(weight.dtype)
        return weight

    def vectors(self) -> Tensor:
        """The rows as the text encoder reads them: capped at `max_norm`."""
        if self.max_norm is None:
            return self.rows
        return self.rows * (self.max_norm / self.rows.norm(dim=1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0)

    def forward(self, input_ids: Tensor) -> Tensor:
        out = self.table(input_ids)
        slot = self.lookup[input_ids]
        hit = (slot >= 0).unsqueeze(-1)
        return torch.where(hit, self.vectors()[slot.clamp(min=0)].to(out.dtype), out)


class TextualInversion:
    name = "embedding"
    weight_decay = 0.0

    def __init__(self, settings: EmbeddingSettings):
        self.token = settings.token
        self.init_token = settings.init_token
        self.token_position = settings.token_position
        self.vectors = settings.vectors
        self.max_norm = settings.max_norm
        self.tokens = [self.token] + [f"{self.token}_{i}" for i in range(1, self.vectors)]  # diffusers' naming
        self.templates = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}.get(settings.learnable_property)
        if self.templates is not None and settings.token_position != "start":
            raise UserError(f"--token-position {settings.token_position}: --learnable-property {settings.learnable_property} trains on templates that place the token themselves; drop one of the two")
        self._captioned = 0
        self.token_ids: list[list[int]] = []  # per text encoder: SDXL fine-tunes may have tokenizers that differ

    def prepare(self, model) -> None:
        self.token_ids = [self._add_rows(tokenizer, encoder) for tokenizer, encoder in model.text_encoders]
        model.extras["placeholder"] = " ".join(self.tokens)

    def _add_rows(self, tokenizer, encoder) -> list[int]:
        added = tokenizer.add_tokens(self.tokens)
        if added != len(self.tokens):
            raise UserError(f"--token {self.token}: already in the tokenizer's vocabulary; pick a new placeholder like <my-style>")
        encoder.resize_token_embeddings(len(tokenizer))
        token_ids = tokenizer.convert_tokens_to_ids(self.tokens)
        weight = encoder.get_input_embeddings().weight
        with torch.no_grad():
            if self.init_token:
                ids = tokenizer.encode(self.init_token, add_special_tokens=False)
                if len(ids) != 1:
                    raise UserError(f"--init-token {self.init_token!r} is {len(ids)} tokens; use a word that is a single token")
                start = weight[ids[0]].clone()
            else:
                start = weight[: min(token_ids)].mean(0)  # the centroid: no semantic prior
            weight[token_ids] = start
        cap = None if self.max_norm is None else self.max_norm * float(weight[: min(token_ids)].norm(dim=1).mean())
        encoder.set_input_embeddings(PlaceholderRows(encoder.get_input_embeddings(), token_ids, cap))
        return token_ids

    def caption(self, caption: str) -> str:
        """Put every placeholder vector in the prompt; add the token to captions that lack it, at --token-position.
        With --learnable-property the caption is the next template instead (in image order)."""
        if self.templates is not None:
            caption = self.templates[self._captioned % len(self.templates)].format(self.token)
            self._captioned += 1
        if self.token not in caption:
            if not caption:
                caption = f"a picture of {self.token}"
            else:
                caption = f"{caption} {self.token}" if self.token_position == "end" else f"{self.token} {caption}"
        return re.sub(re.escape(self.token) + r"(?!_\d)", " ".join(self.tokens), caption, count=1)

    def parameters(self, model):
        return [encoder.get_input_embeddings().rows for _, encoder in model.text_encoders]

    def learned(self, model) -> list[torch.Tensor]:
        """The new rows of each text encoder (one tensor for SD, two for SDXL), as the encoder reads them."""
        return [encoder.get_input_embeddings().vectors().detach().float().cpu() for _, encoder in model.text_encoders]

    def save(self, model, out: Path) -> list[Path]:
        """The files under the trigger word users type (the file stem, see export/embeddings.py); the diffusers
        file keeps the placeholder only when the tokenizer already holds the trigger (diffusers refuses it)."""
        from genadapt.export.embeddings import given_output_name, save_embeddings, taken, trigger_word

        out = Path(out)
        metadata = model.extras.get("training_metadata", {})
        trigger = trigger_word(self.token, given_output_name(out, metadata))
        diffusers_token = trigger
        if trigger not in self.tokens and taken(trigger, self.vectors, [tokenizer for tokenizer, _ in model.text_encoders]):
            print(f"note: the trigger {trigger!r} is already a word of the tokenizer, which diffusers' load_textual_inversion refuses, "
                  f"so learned_embeds.safetensors keeps {self.token!r} ({trigger}.safetensors still triggers on {trigger!r} in A1111/ComfyUI); "
                  "give --output-name a new word to have one trigger everywhere")
            diffusers_token = self.token
        files = save_embeddings(self.token, self.learned(model), out, metadata, trigger, diffusers_token)
        captions = model.extras.get("captions")
        if captions is not None:
            # The loop writes prompts.json from this list after save: make it the prompts a user types, the word the
            # diffusers file registers, which the pipeline expands to every vector (diffusers' maybe_convert_prompt;
            # the spelled-out `<t> <t>_1` would be expanded a second time).
            captions[:] = [self.typed(caption, diffusers_token) for caption in captions]
        return files

    def typed(self, caption: str, word: str) -> str:
        """A training caption as a user types it: the placeholder's vectors (`<t> <t>_1`) become the trigger word."""
        caption = caption.replace(" ".join(self.tokens), word)
        return re.sub(re.escape(self.token) + r"(?!_\d)", word, caption)


def load_textual_inversion(load_base, run: Path):
    from genadapt.export.embeddings import load_into

    model = load_base()
    model.extras["trigger"] = load_into(model.pipeline, Path(run))  # what --embedding-weight weighs
    return model


# ----------------------------------------------------------------------------- GAN: MineGAN miner


class LatentMiner(nn.Module):
    """MineGAN's miner (Wang et al. CVPR 2020, §3.1): a small MLP M whose z' = M(z) feeds the frozen G, trained
    adversarially, min_M max_D E[log D(x)] + E[log(1 − D(G(M(z))))].

    FreezeD's MineGAN baseline uses Linear(d, d) - ReLU - Linear(d, d); we add a residual connection with the
    last layer initialised to zero, z' = z + MLP(z), so mining starts from the source distribution
    (G(M(z)) = G(z) at step 0), as LoRA's B = 0 does.
    """

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or dim
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, z: Tensor) -> Tensor:
        return z + self.net(z)


def load_miner(path: Path) -> LatentMiner:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    miner = LatentMiner(int(metadata["style_dim"]), int(metadata["hidden"]))
    miner.load_state_dict(state)
    return miner.eval().requires_grad_(False)


class Miner:
    """MineGAN (Wang et al. 2020): learn where to sample the frozen G's latent space.

    Trains: the miner and the discriminator (all but its first ``--freeze-d`` blocks, default 0), as MineGAN
    and FreezeD's ``--miner`` baseline do; every G weight stays bitwise the source. The artifact is
    ``miner.safetensors``.
    """

    name = "embedding"
    weight_decay = 0.0

    def __init__(self, settings: FreezeDSettings):
        self.freeze_d = settings.freeze_d or 0
        self.resolved: dict = {"freeze_d": self.freeze_d}

    def prepare(self, model) -> None:
        model.latent_map = LatentMiner(model.style_dim).to(model.device)
        train_discriminator_except_frozen(model, self.freeze_d, lambda name: name.startswith("latent_map."))

    def parameters(self, model) -> list[Tensor]:
        return trainable(model)

    def save(self, model, out: Path) -> list[Path]:
        from genadapt.runs import save_safetensors

        miner = model.latent_map
        metadata = {"format": "genadapt-stylegan2-miner", "style_dim": str(model.style_dim),
                    "hidden": str(miner.net[0].out_features), "base": model.base}
        return [save_safetensors(Path(out) / "miner.safetensors", dict(miner.state_dict()), metadata)]


def load_gan_miner(load_base, run: Path):
    model = load_base()
    model.latent_map = load_miner(Path(run) / "miner.safetensors").to(model.device)
    return model


register(Technique(
    name="embedding",
    kind="parameter",
    summary="textual inversion (diffusion) or a MineGAN latent miner (GAN); the generator stays frozen",
    families={
        "diffusion": Implementation(
            build=TextualInversion, settings=EmbeddingSettings, learning_rate=5e-3,
            compare={"train": "embedding", "vectors": 2, "token": "<target>", "learning_rate": 5e-3}, load=load_textual_inversion,
        ),
        "gan": Implementation(build=Miner, settings=FreezeDSettings, learning_rate=GAN_LR, compare={"train": "embedding"}, load=load_gan_miner),
    },
))

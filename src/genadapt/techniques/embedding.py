"""Textual inversion (Gal et al. 2022, eq. 2): v* = argmin_v E ||ε − ε_θ(z_t, t, c_θ(y(v)))||².

The generator and the text encoder stay frozen; only the new placeholder rows of the token
embedding learn (for SDXL, in both text encoders, as diffusers' SDXL textual-inversion example). Other rows are held bitwise by zeroing their gradient (and no weight decay).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from genadapt.errors import UserError


class TextualInversion:
    name = "embedding"
    trains_text_encoder = True  # the text encoder runs every step, its weights stay frozen
    weight_decay = 0.0

    def __init__(self, token: str = "<genadapt>", init_token: str | None = None, vectors: int = 1):
        self.token = token
        self.init_token = init_token
        self.vectors = vectors
        self.tokens = [token] + [f"{token}_{i}" for i in range(1, vectors)]  # diffusers' naming
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
        mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype)
        mask[token_ids] = 1.0
        weight.requires_grad_(True)
        weight.register_hook(lambda grad: grad * mask.to(grad.device))
        return token_ids

    def caption(self, caption: str) -> str:
        """Put every placeholder vector in the prompt; add the token to captions that lack it."""
        if self.token not in caption:
            caption = f"{self.token} {caption}".strip() if caption else f"a picture of {self.token}"
        return re.sub(re.escape(self.token) + r"(?!_\d)", " ".join(self.tokens), caption, count=1)

    def parameters(self, model):
        return [encoder.get_input_embeddings().weight for _, encoder in model.text_encoders]

    def trained_parameters(self, model) -> int:
        """Only the new rows learn, not the whole embedding tables the optimiser holds."""
        return sum(len(ids) * weight.shape[1] for ids, weight in zip(self.token_ids, self.parameters(model)))

    def learned(self, model) -> list[torch.Tensor]:
        """The new rows of each text encoder (one tensor for SD, two for SDXL)."""
        return [weight[ids].detach().float().cpu() for ids, weight in zip(self.token_ids, self.parameters(model))]

    def save(self, model, out: Path) -> list[Path]:
        from genadapt.export.embeddings import save_embeddings

        return save_embeddings(self.token, self.learned(model), Path(out), model.extras.get("training_metadata", {}))

"""Textual-inversion files: diffusers' `learned_embeds.safetensors` and the A1111/kohya form.

diffusers: `{token: Tensor[n, d]}` with metadata `{"format": "pt"}`; loads with
`pipeline.load_textual_inversion(path)`. kohya/A1111/ComfyUI: `{"emb_params": Tensor[n, d]}`,
named after the trigger word (their trigger is the file stem).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from genadapt.runs import save_safetensors


def trigger_stem(token: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "", token) or "embedding"


def save_embeddings(token: str, vectors: list[torch.Tensor], out: Path, metadata: dict | None = None) -> list[Path]:
    """`vectors`: the new rows per text encoder. SD: one file each format. SDXL (two encoders): diffusers'
    SDXL example's `learned_embeds.safetensors` + `learned_embeds_2.safetensors`, and the A1111/ComfyUI
    SDXL form `{"clip_l": ..., "clip_g": ...}`."""
    out.mkdir(parents=True, exist_ok=True)
    info = {"token": token, "vectors": str(vectors[0].shape[0]), **{k: str(v) for k, v in (metadata or {}).items()}}
    kohya_path = out / f"{trigger_stem(token)}.safetensors"
    if len(vectors) == 1:
        diffusers_file = save_safetensors(out / "learned_embeds.safetensors", {token: vectors[0]}, {"format": "pt"})
        return [diffusers_file, save_safetensors(kohya_path, {"emb_params": vectors[0]}, info)]
    files = [
        save_safetensors(out / name, {token: rows}, {"format": "pt"})
        for name, rows in zip(("learned_embeds.safetensors", "learned_embeds_2.safetensors"), vectors)
    ]
    return files + [save_safetensors(kohya_path, {"clip_l": vectors[0], "clip_g": vectors[1]}, info)]


def load_into(pipeline, folder: Path) -> None:
    """Load a run's embeddings into a pipeline (both encoders for SDXL)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    first = load_file(folder / "learned_embeds.safetensors")
    (token, rows), = first.items()
    pipeline.load_textual_inversion(rows, token=token, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer)
    if (folder / "learned_embeds_2.safetensors").is_file():
        (_, rows_2), = load_file(folder / "learned_embeds_2.safetensors").items()
        pipeline.load_textual_inversion(rows_2, token=token, text_encoder=pipeline.text_encoder_2, tokenizer=pipeline.tokenizer_2)

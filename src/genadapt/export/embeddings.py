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


def save_embeddings(token: str, vectors: torch.Tensor, out: Path, metadata: dict | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    diffusers_file = save_safetensors(out / "learned_embeds.safetensors", {token: vectors}, {"format": "pt"})
    info = {"token": token, "vectors": str(vectors.shape[0]), **{k: str(v) for k, v in (metadata or {}).items()}}
    kohya_file = save_safetensors(out / f"{trigger_stem(token)}.safetensors", {"emb_params": vectors}, info)
    return [diffusers_file, kohya_file]

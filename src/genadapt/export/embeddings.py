"""Textual-inversion files: diffusers' `learned_embeds.safetensors` and the A1111/kohya form, under one trigger word.

The trigger word is the file stem, as A1111 (`modules/textual_inversion/textual_inversion.py`: an embedding is
named after its file), ComfyUI (`comfy/sd1_clip.py`: `embedding:<stem>`) and kohya (`--textual_inversion_embedding`
names) read it; it is `--output-name` when the user gave one, else the placeholder token stripped of characters
that are unsafe in file names (`<my-style>` -> `my-style`).

diffusers: `{trigger: Tensor[n, d]}` with metadata `{"format": "pt"}`. `pipeline.load_textual_inversion(path)`
without `token=` registers the dict's key (`loaders/textual_inversion.py::_retrieve_tokens_and_embeddings`), and
n > 1 rows as `trigger`, `trigger_1`, ... which the pipeline expands a typed `trigger` into. A trigger the
tokenizer already holds is refused there, so such a run keeps its placeholder in the diffusers file (and says so).
kohya/A1111/ComfyUI: `<trigger>.safetensors` with `{"emb_params": Tensor[n, d]}`; SDXL `{"clip_l", "clip_g"}`.
`trigger.txt` holds the word to type.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from genadapt.errors import UserError
from genadapt.runs import save_safetensors, write_text

DIFFUSERS_FILES = ("learned_embeds.safetensors", "learned_embeds_2.safetensors")
TRIGGER_FILE = "trigger.txt"
MAX_VECTORS = 75  # CLIP's 77 positions less BOS/EOS


def trigger_stem(token: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "", token) or "embedding"


def file_stem(name: str) -> str:
    """A user's --output-name as a file stem: path separators, characters Windows refuses and whitespace removed
    (a trigger word is one word)."""
    return re.sub(r'[\\/:*?"<>|\s\x00-\x1f]+', "", name).strip(".") or "embedding"


def given_output_name(out: Path, metadata: dict) -> str | None:
    """`--output-name` if the user gave one: config.yaml records it (None when defaulted); without a
    config.yaml, a `ss_output_name` other than the folder's name."""
    import yaml

    config = Path(out) / "config.yaml"
    if config.is_file():
        return (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("output_name")
    name = metadata.get("ss_output_name")
    return str(name) if name and str(name) != Path(out).name else None


def trigger_word(token: str, output_name: str | None) -> str:
    if output_name is None:
        return trigger_stem(token)
    stem = file_stem(output_name)
    if stem != output_name:
        print(f"note: --output-name {output_name!r} is not one word a file can be named; the embedding is {stem}.safetensors, trigger {stem}")
    return stem


def taken(word: str, count: int, tokenizers) -> bool:
    """Whether diffusers' load_textual_inversion would refuse `word` (or `word_1`...) in any of the tokenizers."""
    names = [word] + [f"{word}_{i}" for i in range(1, count)]
    return any(name in tokenizer.get_vocab() for tokenizer in tokenizers for name in names)


def save_embeddings(token: str, vectors: list[torch.Tensor], out: Path, metadata: dict | None = None,
                    trigger: str | None = None, diffusers_token: str | None = None) -> list[Path]:
    """`vectors`: the new rows per text encoder. SD: one file each format. SDXL (two encoders): diffusers'
    SDXL example's `learned_embeds.safetensors` + `learned_embeds_2.safetensors`, and the A1111/ComfyUI
    SDXL form `{"clip_l": ..., "clip_g": ...}`. `trigger` names the A1111 file; `diffusers_token` the diffusers
    key (both default to the token's stem)."""
    out.mkdir(parents=True, exist_ok=True)
    trigger = trigger or trigger_stem(token)
    diffusers_token = diffusers_token or trigger
    info = {"token": token, "trigger": trigger, "diffusers_token": diffusers_token, "vectors": str(vectors[0].shape[0]),
            **{k: str(v) for k, v in (metadata or {}).items()}}
    kohya_path = out / f"{trigger}.safetensors"
    files = [
        save_safetensors(out / name, {diffusers_token: rows}, {"format": "pt", "token": token, "trigger": trigger})
        for name, rows in zip(DIFFUSERS_FILES, vectors)
    ]
    kohya = {"emb_params": vectors[0]} if len(vectors) == 1 else {"clip_l": vectors[0], "clip_g": vectors[1]}
    files.append(save_safetensors(kohya_path, kohya, info))
    lines = [trigger] + ([f"diffusers: {diffusers_token}"] if diffusers_token != trigger else [])
    files.append(write_text(out / TRIGGER_FILE, "\n".join(lines) + "\n"))
    return files


def load_into(pipeline, folder: Path) -> str:
    """Load a run's embeddings into a pipeline (both encoders for SDXL), each file checked first; returns the
    word prompts trigger them with."""
    folder = Path(folder)
    pairs = [(pipeline.tokenizer, pipeline.text_encoder)]
    if getattr(pipeline, "text_encoder_2", None) is not None:
        pairs.append((pipeline.tokenizer_2, pipeline.text_encoder_2))
    token = None
    for name, (tokenizer, encoder) in zip(DIFFUSERS_FILES, pairs):
        path = folder / name
        if name != DIFFUSERS_FILES[0] and not path.is_file():
            break
        file_token, rows = checked_embedding(path, tokenizer, encoder)
        token = token or file_token  # SDXL: the second file's rows go under the first file's word
        pipeline.load_textual_inversion(rows, token=token, text_encoder=encoder, tokenizer=tokenizer)
    return token


def checked_embedding(path: Path, tokenizer, encoder) -> tuple[str, torch.Tensor]:
    """(token, rows [n, d]) of a diffusers embedding file, or a one-line UserError: readable safetensors, one
    float tensor, n <= 75 rows of the encoder's width, finite, and a token the tokenizer does not hold yet."""
    from safetensors.torch import load_file

    from genadapt.export.lora import inspect_safetensors

    header, _ = inspect_safetensors(path, "embedding")
    if len(header) != 1:
        raise UserError(f"embedding {path}: holds {len(header)} tensors, a diffusers embedding file holds one ({{token: [vectors, width]}}); rerun the adapt command that made it")
    (token, (shape, dtype)), = header.items()
    width = encoder.get_input_embeddings().weight.shape[1]
    if len(shape) != 2 or not 1 <= shape[0] <= MAX_VECTORS or shape[1] != width or not dtype.startswith(("F", "BF")):
        raise UserError(f"embedding {path}: tensor {token!r} is {dtype} {list(shape)}, this text encoder takes float [1..{MAX_VECTORS}, {width}]; it was trained for another base")
    if token in tokenizer.get_vocab():
        raise UserError(f"embedding {path}: its token {token!r} is already a word of this tokenizer; load it with another token")
    rows = load_file(str(path))[token]
    if not bool(torch.isfinite(rows).all()):
        raise UserError(f"embedding {path}: tensor {token!r} holds NaN or inf; the run that wrote it diverged, retrain it")
    return token, rows

"""A CLIP-format BPE tokenizer trained on a caption vocabulary.

It is saved as CLIP's `vocab.json` + `merges.txt`, with CLIP's normalisation (NFC, collapse
whitespace, lowercase), pre-tokenisation regex, byte-level alphabet and `</w>` end-of-word
suffix, so `transformers.CLIPTokenizer.from_pretrained` loads it and tools written for
Stable Diffusion's tokenizer folder work on it unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def train_clip_bpe(captions: list[str], out: Path, vocab_size: int = 4096, model_max_length: int = 77) -> Path:
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tokenizer = Tokenizer(BPE(end_of_word_suffix="</w>", unk_token=EOS))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS], initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False
    )
    tokenizer.train_from_iterator(captions, trainer)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.model.save(str(out))
    trained = json.loads((out / "vocab.json").read_text())
    merges = [line for line in (out / "merges.txt").read_text().splitlines() if line and not line.startswith("#version")]
    # The trainer's merges are deterministic but its ids for single symbols are not (a hash set's order), so ids
    # are reassigned in CLIP's order: the special tokens, every byte, every byte at a word's end (CLIP's vocabulary
    # has both for every byte), then each merge's result in merge order. The same captions give the same files.
    pieces = [BOS, EOS, *sorted(alphabet), *(symbol + "</w>" for symbol in sorted(alphabet)), *(merge.replace(" ", "") for merge in merges)]
    vocab: dict[str, int] = {}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    missing = set(trained) - set(vocab)
    if missing:
        raise RuntimeError(f"tokenizer training produced pieces outside its alphabet and merges: {sorted(missing)[:5]}")
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2))
    return out

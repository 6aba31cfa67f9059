"""Does a feature space see a change of style, and does it still see content? `pocket` vs `style`.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/style_shift.py [--splits 10] [--out benchmarks/results/style_shift.json]

Style shifts (`genadapt.eval.style.STYLE_SHIFTS`, plus milder variants) are applied to OpenMoji sets the
eval encoder never trained on as a whole: `flags` (reference + train, 320 icons; a target domain) and
`source/reference` (312 icons), at 32 and 64 px. For each set, space and shift, over R random splits into
two disjoint halves A and B (equal sizes, so KID is the exact unbiased MMD² of the full halves):

    null   = RMS_r KID(B_r, A_r)                     noise level: two halves of the same set (100 splits)
    shift  = mean_r KID(shift(B_r), A_r)             held-out shifted images vs the original (10 splits)
    ratio  = shift / null                            how many noise levels apart (RMS, not the mean:
                                                     the unbiased KID of two halves is ~0 and can be < 0)
    mix(f) = mean_r KID(mix_f(B_r), shift(A_r))      a fraction f of B shifted, the rest not, against
                                                     held-out shifted images; emulates a model adapted
                                                     towards the shift (f = 0: the unadapted base).
                                                     In expectation mix(f)/mix(0) = (1 - f)² exactly
                                                     (the mean embedding is linear in f), for any kernel.

Content (32 px): k-NN group accuracy of source/reference against source/train (cosine, 13 groups),
KID ratios of the 6 largest source groups against one another, and of flags against source/reference.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from genadapt.data import load_dataset
from genadapt.eval import style as S
from genadapt.eval.features import extract, get_extractor
from genadapt.eval.metrics import kid
from genadapt.zoo.eval_encoder import knn_accuracy

FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
SHIFTS = {
    **S.STYLE_SHIFTS,
    "palette-30°": lambda p: S.shift_palette(p, 30.0),
    "blur-σ0.5": lambda p: S.shift_blur(p, 0.5),
    "texture-5%": lambda p: S.shift_texture(p, 0.05),
}
MAIN = tuple(S.STYLE_SHIFTS)


def even(pixels: np.ndarray) -> np.ndarray:
    return pixels[: len(pixels) // 2 * 2]


def datasets(resolution: int) -> dict:
    flags = np.concatenate([load_dataset(f"builtin:openmoji/flags/{split}", resolution=resolution).pixels for split in ("reference", "train")])
    source = load_dataset("builtin:openmoji/source/reference", resolution=resolution).pixels
    return {"flags": even(flags), "source/reference": even(source)}


def feats(extractor, pixels) -> torch.Tensor:
    return extract(extractor, pixels, progress=False).double()


def shift_rows(spaces: dict, resolution: int, splits: int, null_splits: int, seed: int) -> list[dict]:
    rows = []
    for name, pixels in datasets(resolution).items():
        rng = np.random.default_rng(seed)
        perms = [rng.permutation(len(pixels)) for _ in range(max(splits, null_splits))]
        half = len(pixels) // 2
        shifted = {shift: fn(pixels) for shift, fn in SHIFTS.items()}
        for space, extractor in spaces.items():
            base = feats(extractor, pixels)
            nulls = [kid(base[p[half:]], base[p[:half]]) for p in perms[:null_splits]]
            perms_shift = perms[:splits]
            null = float(np.sqrt(np.mean(np.square(nulls))))
            for shift, shifted_pixels in shifted.items():
                moved = feats(extractor, shifted_pixels)
                values = [kid(moved[p[half:]], base[p[:half]]) for p in perms_shift]
                curves = np.array([
                    [kid(torch.cat([moved[p[half:][: round(f * half)]], base[p[half:][round(f * half):]]]), moved[p[:half]]) for f in FRACTIONS]
                    for p in perms_shift
                ])
                curve = curves.mean(0)
                rows.append({
                    "resolution": resolution, "set": name, "space": space, "shift": shift, "main": shift in MAIN,
                    "n_per_half": half, "kid_null_rms": null, "kid_null_mean": float(np.mean(nulls)),
                    "kid_shift": float(np.mean(values)), "ratio": float(np.mean(values)) / null,
                    "mix_kid": curve.tolist(), "mix_relative": (curve / curve[0]).tolist(),
                    "mix_monotone": bool(np.all(np.diff(curve) < 0)),
                    "mix_monotone_splits": int(sum(np.all(np.diff(c) < 0) for c in curves)),
                })
    return rows


def groups(images) -> list[str]:
    return [record.label.split("/")[-1] for record in images.records]


def null_rms(f: torch.Tensor, rng, splits: int) -> float:
    half = len(f) // 2
    values = []
    for _ in range(splits):
        p = rng.permutation(len(f))
        values.append(kid(f[p[:half]], f[p[half : 2 * half]]))
    return float(np.sqrt(np.mean(np.square(values))))


def content_rows(spaces: dict, splits: int, seed: int) -> list[dict]:
    """k-NN group accuracy and content KID ratios (noise: RMS over `splits` half-splits of the first set)."""
    reference = load_dataset("builtin:openmoji/source/reference", resolution=32)
    train = load_dataset("builtin:openmoji/source/train", resolution=32)
    flags = datasets(32)["flags"]
    labels = np.array(groups(train))
    largest = [g for g, _ in Counter(labels.tolist()).most_common(6)]
    rows = []
    for space, extractor in spaces.items():
        rng = np.random.default_rng(seed)
        query, gallery = feats(extractor, reference), feats(extractor, train)
        row = {"space": space}
        for k in (1, 5):
            row[f"knn{k}_group_accuracy"] = knn_accuracy(query.float(), groups(reference), gallery.float(), labels.tolist(), k)
        ratios = []
        for i, a in enumerate(largest):
            fa = gallery[labels == a]
            noise = null_rms(fa, rng, splits)
            for b in largest[i + 1 :]:
                ratios.append(kid(fa, gallery[labels == b]) / noise)
        row["group_pair_ratio_median"] = float(np.median(ratios))
        row["group_pair_ratio_min"] = float(np.min(ratios))
        f_flags = feats(extractor, flags)
        row["flags_vs_source_ratio"] = kid(f_flags, query) / null_rms(f_flags, rng, splits)
        rows.append(row)
    return rows


def timing(spaces: dict) -> dict:
    out = {}
    for resolution in (32, 64):
        pixels = load_dataset("builtin:openmoji/flags/reference", resolution=resolution).pixels
        for space, extractor in spaces.items():
            extract(extractor, pixels[:16], progress=False)  # warm-up
            start = time.process_time()
            extract(extractor, pixels, progress=False)
            out[f"{space}@{resolution}px_cpu_ms_per_image"] = 1000 * (time.process_time() - start) / len(pixels)
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| px | set | shift | pocket ratio | style ratio | pocket mix(f)/mix(0), f = ¼ ½ ¾ 1 | style mix(f)/mix(0) |",
        "|---|---|---|---|---|---|---|",
    ]
    keyed = {(r["resolution"], r["set"], r["shift"], r["space"]): r for r in rows}
    for (resolution, name, shift, space), row in keyed.items():
        if space != "pocket":
            continue
        style = keyed[(resolution, name, shift, "style")]

        def curve(r):
            return " ".join(f"{v:.2f}" for v in r["mix_relative"][1:]) + ("" if r["mix_monotone"] else " (not monotone)")

        label = shift if row["main"] else f"*{shift}* (mild)"
        lines.append(f"| {resolution} | {name} | {label} | {row['ratio']:.1f} | {style['ratio']:.1f} | {curve(row)} | {curve(style)} |")
    return "\n".join(lines)


def content_table(rows: list[dict]) -> str:
    lines = ["| space | 1-NN group acc | 5-NN group acc | group-pair KID ratio, median (min) | flags vs source ratio |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['space']} | {r['knn1_group_accuracy']:.3f} | {r['knn5_group_accuracy']:.3f} | {r['group_pair_ratio_median']:.0f} ({r['group_pair_ratio_min']:.0f}) | {r['flags_vs_source_ratio']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", type=int, default=10, help="half-splits averaged for the shifted KIDs and mixtures")
    parser.add_argument("--null-splits", type=int, default=100, help="half-splits for the noise level (RMS; 100: ~7 %% relative error)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", default=None, help="style block weights content,conv,colour,edges (default: equal)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "style_shift.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started, cpu = time.time(), time.process_time()
    weights = tuple(float(w) for w in args.weights.split(",")) if args.weights else S.DEFAULT_WEIGHTS
    spaces = {"pocket": get_extractor("pocket"), "style": S.load_style_extractor(weights)}
    rows = [row for resolution in (32, 64) for row in shift_rows(spaces, resolution, args.splits, args.null_splits, args.seed)]
    content = content_rows(spaces, args.null_splits, args.seed)
    speed = timing(spaces)
    result = {
        "command": " ".join(["benchmarks/style_shift.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), no GPU used",
        "extractors": {space: e.extractor_id for space, e in spaces.items()},
        "weights": list(weights), "splits": args.splits, "null_splits": args.null_splits, "seed": args.seed,
        "shifts": rows, "content": content, "timing": speed,
        "wall_s": time.time() - started, "cpu_s": time.process_time() - cpu,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(table(rows) + "\n\n" + content_table(content) + "\n")
    print(" ".join(f"{k} {v:.2f}" for k, v in speed.items()))
    print(f"extractors: {result['extractors']}; {result['wall_s']:.0f} s wall, {result['cpu_s']:.0f} CPU-s; saved {args.out}")


if __name__ == "__main__":
    main()

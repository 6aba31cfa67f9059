"""`genadapt evaluate`: fidelity, diversity and memorisation of generated samples, with CIs.

Samples are images the caller gives (an ImageSet, a folder or a builtin spec); `genadapt.api.evaluate`
generates them from a run folder. Features come from an injectable extractor and are cached per image set,
so one reference costs one pass.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import torch

from genadapt.data import load_dataset
from genadapt.data.imageset import ImageSet
from genadapt.errors import UserError
from genadapt.eval import metrics
from genadapt.eval.copies import memorisation_audit
from genadapt.eval.features import cached_features, get_extractor
from genadapt.runs import write_json, write_text


def _resolution_for(features) -> int:
    return 299 if isinstance(features, str) and features.startswith("inception:") else 32


def load_eval_images(spec: str, resolution: int, n: int | None = None, seed: int = 0) -> ImageSet:
    images = load_dataset(spec, resolution=resolution)
    if len(images) < 2:
        raise UserError(f"{spec}: {len(images)} usable image(s); metrics need at least 2")
    return images


def evaluate(
    samples,
    reference,
    train=None,
    features="pocket",
    out: Path | None = None,
    num_samples: int | None = None,
    seed: int = 0,
    n_boot: int = 50,
    lpips=None,
) -> dict:
    """All few-shot metrics for one sample set; ImageSets or specs (folder, builtin:...).

    `lpips`: (backbone_path, linear_path, net[, size]) or a loaded `genadapt.eval.lpips.LPIPS`; with
    `train`, adds CDC's intra-cluster LPIPS ("intra_cluster_lpips", images resized to `size`, default 256).
    """
    lpips_model, lpips_size = _lpips_model(lpips) if (lpips is not None and train is not None) else (None, None)
    resolution = _resolution_for(features)
    extractor = get_extractor(features)
    reference_set = reference if isinstance(reference, ImageSet) else load_eval_images(str(reference), resolution)
    sample_set = samples if isinstance(samples, ImageSet) else load_eval_images(str(samples), resolution, num_samples or len(reference_set), seed)
    train_set = train if (train is None or isinstance(train, ImageSet)) else load_dataset(str(train), resolution=resolution)

    feats_samples = cached_features(extractor, sample_set)
    feats_reference = cached_features(extractor, reference_set)
    space = extractor.extractor_id
    result = {
        "samples": {"name": sample_set.name, "count": len(sample_set)},
        "reference": {"name": reference_set.name, "count": len(reference_set)},
        "features": space,
        "fid": metrics.fid_with_ci(feats_samples, feats_reference, n_boot=n_boot, seed=seed),
        "kid": metrics.kid_with_ci(feats_samples, feats_reference, n_boot=n_boot, seed=seed),
        "precision_recall": metrics.precision_recall(feats_reference, feats_samples, k=min(3, len(reference_set) - 1, len(sample_set) - 1)),
        "density_coverage": metrics.density_coverage(feats_reference, feats_samples, k=min(5, len(reference_set) - 1, len(sample_set) - 1)),
    }
    if train_set is not None:
        feats_train = cached_features(extractor, train_set)
        result["train"] = {"name": train_set.name, "count": len(train_set)}
        diversity = metrics.intra_cluster_diversity(feats_samples, feats_train, distance="cosine", space=space)
        result["intra_cluster_diversity"] = {k: v for k, v in diversity.items() if k not in ("nearest_shot", "nn_distance")}
        # The same measure on real target images: how diverse the domain itself is around these shots, the yardstick
        # for "collapsed" (compare's diversity floor); a base trained elsewhere can be far more diverse than the target.
        real = metrics.intra_cluster_diversity(feats_reference, feats_train, distance="cosine", space=space)
        result["reference_diversity"] = {k: real[k] for k in ("value", "std", "n_clusters_used", "cluster_sizes")}
        audit = memorisation_audit(sample_set, train_set, feats_samples, feats_train, reference=reference_set, reference_feats=feats_reference)
        result["memorisation"] = {
            "rule": audit["rule"],
            "copy_rate": audit["copy_rate"],
            "threshold": audit["threshold"],
            "calibration": {k: v for k, v in audit["calibration"].items() if k != "inter_shot_nearest"},
            "closest_non_copy": audit["closest_non_copy"],
            "checks": audit["checks"],
            "copies": [
                {"sample": sample_set.records[int(i)].id, "shot": train_set.records[int(s)].id, "sample_index": int(i), "shot_index": int(s),
                 "distance": audit["distance"][int(i)], "mirrored": mirrored, "zoom": zoom, "shift": shift}
                for i, s, mirrored, zoom, shift in zip(audit["flagged"], audit["copied_shot"], audit["mirrored"], audit["zoom"], audit["shift"])
            ],
        }
        if len(train_set) >= 2:  # authenticity compares a shot with its nearest other shot: one shot has none
            result["authenticity"] = {k: v for k, v in metrics.authenticity(feats_train, feats_samples).items() if k in ("authenticity", "n_fake")}
        if lpips_model is not None:
            from genadapt.eval.lpips import intra_cluster_lpips

            perceptual = intra_cluster_lpips(sample_set, train_set, lpips_model, size=lpips_size, seed=seed)
            result["intra_cluster_lpips"] = {k: v for k, v in perceptual.items() if k not in ("nearest_shot", "nn_distance")}
    result = _plain(result)
    if out is not None:
        write_report(result, Path(out), sample_set, train_set)
    return result


def _lpips_model(spec):
    """(LPIPS module, size) from a loaded module or (backbone, linear, net[, size]); files load onto the GPU if there is one."""
    from genadapt.eval.lpips import CDC_SIZE, LPIPS, load_lpips

    if isinstance(spec, LPIPS):
        return spec, CDC_SIZE  # used on the device the caller put it on
    if not (isinstance(spec, (tuple, list)) and len(spec) in (2, 3, 4)):
        raise UserError(f"lpips={spec!r}: pass (backbone_path, linear_path, net) or a loaded LPIPS module")
    backbone, linear, net, size = (*spec, *("vgg", CDC_SIZE)[len(spec) - 2 :])
    return load_lpips(backbone, linear, net).to("cuda" if torch.cuda.is_available() else "cpu"), size


def _plain(value):
    """JSON-ready: tensors and numpy scalars to Python numbers and lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def rows(result: dict) -> list[tuple[str, str]]:
    """(metric, value) pairs for tables; CIs as [low, high]."""
    def ci(entry, digits=4):
        return f"{entry['value']:.{digits}f} [{entry['ci_low']:.{digits}f}, {entry['ci_high']:.{digits}f}]"

    table = [
        ("FID (95% CI)", ci(result["fid"], 2)),
        ("KID (95% CI)", ci(result["kid"])),
        (f"precision / recall (k={result['precision_recall']['k']})", f"{result['precision_recall']['precision']:.3f} / {result['precision_recall']['recall']:.3f}"),
        (f"density / coverage (k={result['density_coverage']['k']})", f"{result['density_coverage']['density']:.3f} / {result['density_coverage']['coverage']:.3f}"),
    ]
    if "memorisation" in result:
        diversity = result["intra_cluster_diversity"]
        table.append((f"intra-cluster diversity ({diversity['distance_name']})", f"{diversity['value']:.4f}"))
        if "reference_diversity" in result:
            table.append(("the same on the reference (the target's own diversity around these shots)", f"{result['reference_diversity']['value']:.4f}"))
        if "intra_cluster_lpips" in result:
            perceptual = result["intra_cluster_lpips"]
            resized = f"{perceptual['size']} px" if perceptual["size"] else "native size"
            table.append((f"intra-cluster {perceptual['distance_name']} (CDC, {resized})", f"{perceptual['value']:.4f} ± {perceptual['std']:.4f}"))
        copies = result["memorisation"]
        calibration = copies["calibration"]
        how = {"inter_shot": f"{calibration['fraction']:.2f} x closest shot pair", "reference": f"{calibration['fraction']:.2f} x nearest reference image"}.get(calibration["method"], calibration["method"])
        how += ", floor" if calibration.get("floored") else ""
        table.append((f"copy rate (aligned pixels, D < {copies['threshold']:.3f}: {how})", f"{copies['copy_rate']:.3f}"))
        feature = copies["checks"]["feature_ratio"]
        table.append((f"feature NN-ratio < {feature['ratio']:.2f} hits (not counted)", f"{feature['flagged']} ({len(feature['only'])} without a pixel match)"))
        if "authenticity" in result:
            table.append(("authenticity (Alaa et al. 2022)", f"{result['authenticity']['authenticity']:.3f}"))
    return table


def write_report(result: dict, out: Path, samples: ImageSet, train: ImageSet | None) -> None:
    from genadapt.grid import save_grid

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", result)
    header = f"samples: {result['samples']['name']} ({result['samples']['count']}); reference: {result['reference']['name']} ({result['reference']['count']}); features: {result['features']}"
    markdown = ["| metric | value |", "|---|---|"] + [f"| {m} | {v} |" for m, v in rows(result)]
    write_text(out / "report.md", f"# Evaluation\n\n{header}\n\n" + "\n".join(markdown) + "\n")
    save_grid(samples.pixels[:64], out / "samples.png", scale=2)
    copies_html = ""
    if train is not None and result["memorisation"]["copies"]:
        pairs = result["memorisation"]["copies"][:16]
        side_by_side = np.concatenate([np.stack([samples.pixels[c["sample_index"]], train.pixels[c["shot_index"]]]) for c in pairs])
        save_grid(side_by_side, out / "copies.png", columns=2, scale=2)
        copies_html = "<h2>Flagged copies (sample | training shot)</h2><img src='copies.png'>"
    table = "".join(f"<tr><td>{html.escape(m)}</td><td>{html.escape(v)}</td></tr>" for m, v in rows(result))
    write_text(
        out / "report.html",
        f"<!doctype html><meta charset='utf-8'><title>genadapt evaluation</title>"
        f"<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td{{padding:.2em 1em;border-bottom:1px solid #ddd}}img{{image-rendering:pixelated}}</style>"
        f"<h1>Evaluation</h1><p>{html.escape(header)}</p><table>{table}</table><h2>Samples</h2><img src='samples.png'>{copies_html}",
    )

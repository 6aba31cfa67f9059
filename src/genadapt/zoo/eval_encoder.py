"""pocket eval-encoder: the default feature space for FID, KID, precision/recall, diversity and memorisation.

A small CNN that maps a 32x32 RGB image (NCHW, [-1, 1]; other sizes are resized to 32) to a
D = 256 feature vector. Inception-v3 (Szegedy et al. 2016) is the standard feature space for
FID, but its weights are a download genadapt never makes, and it was never meant for 32 px
icons (it upsamples them 9x); this encoder is trained by us, offline, in minutes, on exactly the kind of
images genadapt generates. Use Inception (`eval/inception.py`) when you need numbers that are
comparable with papers.

Training data: `builtin:openmoji/source` and `builtin:digits` only. The target domains
(`flags`, `dark-skin`) are never seen in training, so the feature space is not fitted to the
distributions the adapted generators are judged on; `training_data` enforces this by label and
by pixel hash, and the run's `manifest.json` lists every training image with its hash. A
deterministic 10 % of those images (by a hash of the item id) is held out for the sanity
metrics.

Objective (per batch of B images, two augmented views each):
    L = NT-Xent(g(h1), g(h2); τ) + λ · CE(W h, group)
* NT-Xent is SimCLR's contrastive loss (Chen et al. 2020, "A Simple Framework for Contrastive
  Learning of Visual Representations", eq. 1): for each of the 2B views, −log of the softmax of
  its positive's cosine similarity / τ against all 2B − 1 other views. τ = 0.5, the value of
  SimCLR's CIFAR-10 (32 px) setting in google-research/simclr. It makes features discriminate
  *instances*, which memorisation (nearest-neighbour ratio, authenticity), diversity and
  precision/recall need: a copy of a training image must be closer to it than to its siblings.
* The supervised cross-entropy on the Unicode group (13 OpenMoji groups, among them the four
  skin-tone groups) and the digit class (10) gives the space *semantic* axes a generator can be
  right or wrong about, and keeps skin tone in the features: contrastive learning alone would
  become invariant to whatever the augmentations change.
Augmentations are chosen for icons (`augment`): small rotation (±10°), scale (0.85-1.1) and
translation (±1/8 of the side, DiffAugment's ratio, Zhao et al. 2020), white fill, mild
brightness/contrast/saturation jitter. No flips (they change arrows, text and digits), no hue
jitter or greyscale (colour and skin tone are what the target domains are about), no blur
(blurry samples must look different from sharp ones).

Features: the raw, global-average-pooled output of the last conv stage (post-ReLU), h in
SimCLR's notation, D = widths[-1] = 256; not the projection g(h) and not L2-normalised.
Chen et al. (2020, section 4.2) show h keeps information that g(h) discards (g is trained to be
invariant to the augmentations); FID fits a Gaussian to the features, which an L2-normalised
(spherical) set is not, and normalising throws away the norm. Inception's pool3 is likewise a
raw post-ReLU average. The classifier head is linear on h, so group identity is linear in h.

Speed (measured, see `DEFAULT_STEPS` below): the default config runs in under ten minutes on
2 CPU cores with 2 threads, including the final sanity metrics (`out/metrics.json`).

A 150-step probe of this config (1 thread, 2.4 min) already gave: held-out 1-NN group accuracy
0.73 (23 classes, majority class 0.11); FID to the source training part 0.5 for held-out source
icons vs 91 for flags/reference and 94 for dark-skin/reference (0.9 and 1.7 between each target's
train and reference halves); instance retrieval of augmented copies, top-1 in features vs pixels:
0.45 vs 0.27 (held-out source), 0.64 vs 0.34 (flags), 0.30 vs 0.21 (dark-skin).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genadapt.errors import UserError
from genadapt.runs import (
    append_jsonl,
    load_torch,
    module_states,
    progress,
    restore_states,
    save_safetensors,
    save_torch,
    use_cpu,
    write_json,
    write_manifest,
    write_yaml,
)

MODEL_NAME = "pocket-eval-encoder"
WEIGHTS_FILE = "encoder.safetensors"
CONFIG_FILE = "config.json"
TARGET_PREFIXES = ("flags/", "dark-skin/")  # labels of builtin:openmoji's target domains

# Measured on the 2-core dev machine with `nice -n 19`, OMP_NUM_THREADS=1, torch.set_num_threads(1),
# while a 2-thread pretraining job ran beside it: 0.77 CPU-s per step (0.8-1.2 s wall; 150 steps
# took 132 s) for the default config (batch 128 x 2 views, widths 32-64-128-256, 1.17 M parameters).
# 700 steps are therefore ~9 min even if a second thread gave no speed-up (the upper bound for
# 2 threads), plus ~15 s for data and the sanity metrics; with a typical 1.5-1.8x from the second
# thread (not measured: the cores were busy) ~5-6 min.
# 700 x 128 = 90k images: about 20 passes over the 4.4k training icons and digits.
DEFAULT_STEPS = 700


@dataclass
class EvalEncoderConfig:
    seed: int = 0
    data: tuple = ("builtin:openmoji/source", "builtin:digits")
    resolution: int = 32
    holdout_fraction: float = 0.1  # of each training set, by a hash of the item id: sanity metrics only
    widths: tuple = (32, 64, 128, 256)  # conv stages at 32, 16, 8, 4 px; D = widths[-1]
    projection_dim: int = 128  # SimCLR's g(h) output (Chen et al. 2020 use 128)
    steps: int = DEFAULT_STEPS
    batch: int = 128  # images per step; two views each
    lr: float = 2e-3
    weight_decay: float = 1e-4  # SimCLR's CIFAR-10 setting
    warmup_steps: int = 50
    temperature: float = 0.5  # NT-Xent τ, SimCLR's CIFAR-10 setting
    supervised_weight: float = 1.0  # λ on the group / digit cross-entropy
    # Augmentations (see `augment`).
    max_rotation: float = 10.0  # degrees
    scale_range: tuple = (0.85, 1.1)
    max_translation: float = 0.125  # fraction of the side (DiffAugment's 1/8)
    brightness: float = 0.1
    contrast: float = 0.2
    saturation: float = 0.2
    checkpoint_every: int = 100
    log_every: int = 10
    threads: int = 1  # 1 thread: 2 OpenMP threads stall at every barrier when anything else runs on a 2-core box


# --------------------------------------------------------------------------- the network


class ConvBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class EvalEncoder(nn.Module):
    """NCHW images in [-1, 1] -> feats [N, widths[-1]]: VGG-style stages (two 3x3 convs each, the first of
    every stage after the stem with stride 2), then a global average pool. Inputs that are not
    `resolution` px are resized to it (bilinear, antialiased when shrinking)."""

    def __init__(self, widths=(32, 64, 128, 256), resolution: int = 32) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        layers = [ConvBlock(3, widths[0]), ConvBlock(widths[0], widths[0])]
        for previous, width in zip(widths, widths[1:]):
            layers += [ConvBlock(previous, width, stride=2), ConvBlock(width, width)]
        self.body = nn.Sequential(*layers)
        self.widths = widths
        self.resolution = int(resolution)
        self.extractor_id = f"{MODEL_NAME}@untrained"

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.resolution, self.resolution):
            shrink = images.shape[-1] > self.resolution or images.shape[-2] > self.resolution
            images = F.interpolate(images, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False, antialias=shrink)
        return self.body(images).mean(dim=(2, 3))


class TrainingHeads(nn.Module):
    """SimCLR's projection g (Linear-ReLU-Linear) for the contrastive loss, and a linear group classifier."""

    def __init__(self, feature_dim: int, projection_dim: int, classes: int) -> None:
        super().__init__()
        self.projection = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(), nn.Linear(feature_dim, projection_dim))
        self.classifier = nn.Linear(feature_dim, classes)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent, Chen et al. 2020 eq. 1: ℓ(i, j) = −log exp(sim(z_i, z_j)/τ) / Σ_{k≠i} exp(sim(z_i, z_k)/τ),
    sim = cosine, averaged over all 2N views (each view's positive is the other view of its image)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    logits = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, positives)


def augment(images: torch.Tensor, config: EvalEncoderConfig, generator: torch.Generator) -> torch.Tensor:
    """A random view of each icon: rotation, scale and translation (one affine warp, white fill), then
    brightness (multiplicative on [0, 1]), contrast (towards the image's mean grey) and saturation
    (towards each pixel's grey) jitter. No flips, no hue changes (see the module docstring)."""
    n = len(images)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    angle = uniform(-1, 1) * math.radians(config.max_rotation)
    scale = uniform(*config.scale_range)
    shift = 2 * config.max_translation  # normalised coordinates span 2
    tx, ty = uniform(-shift, shift), uniform(-shift, shift)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1).to(images)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # grid_sample fills with 0; shifting by -1 makes that fill white (+1) once shifted back.
    views = F.grid_sample(images - 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1

    unit = views.add(1).div(2)  # [0, 1]
    unit = unit * uniform(1 - config.brightness, 1 + config.brightness).view(n, 1, 1, 1).to(unit)
    grey = (0.299 * unit[:, 0:1] + 0.587 * unit[:, 1:2] + 0.114 * unit[:, 2:3])
    mean = grey.mean(dim=(1, 2, 3), keepdim=True)
    unit = mean + uniform(1 - config.contrast, 1 + config.contrast).view(n, 1, 1, 1).to(unit) * (unit - mean)
    grey = (0.299 * unit[:, 0:1] + 0.587 * unit[:, 1:2] + 0.114 * unit[:, 2:3])
    unit = grey + uniform(1 - config.saturation, 1 + config.saturation).view(n, 1, 1, 1).to(unit) * (unit - grey)
    return unit.clamp(0, 1).mul(2).sub(1)


# --------------------------------------------------------------------------- data


def _held_out(record_id: str, fraction: float) -> bool:
    digest = hashlib.sha256(record_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def class_of(label: str) -> str:
    """The supervised target: the OpenMoji group ('source/train/smileys' -> 'openmoji/smileys') or the digit."""
    if label.startswith("source/"):
        return "openmoji/" + label.split("/")[-1]
    if label.isdigit():
        return f"digit/{label}"
    return label or "unlabelled"


def _target_domain_hashes(resolution: int) -> set[str]:
    from genadapt.data import openmoji

    everything = openmoji.load_all(resolution)
    return {record.sha256 for record in everything.records if record.label.startswith(TARGET_PREFIXES)}


def training_data(config: EvalEncoderConfig):
    """(train, held_out) ImageSets from `config.data`; a target-domain image anywhere is an error.

    Checked twice: by label (builtin:openmoji records carry their domain) and by pixel hash against
    every rendered flags / dark-skin image, so a renamed copy is caught too.
    """
    from genadapt.data import load_dataset
    from genadapt.data.imageset import ImageSet, pixel_hash

    sets = [load_dataset(spec, resolution=config.resolution) for spec in config.data]
    forbidden = _target_domain_hashes(config.resolution)
    for spec, images in zip(config.data, sets):
        for record, pixels in zip(images.records, images.pixels):
            if record.label.startswith(TARGET_PREFIXES) or pixel_hash(pixels) in forbidden:
                raise UserError(
                    f"eval-encoder data {spec!r} contains target-domain image {record.id!r}; the encoder must not see "
                    "flags or dark-skin: train on builtin:openmoji/source and builtin:digits"
                )
    name = "+".join(str(spec) for spec in config.data)
    combined = ImageSet(name, np.concatenate([s.pixels for s in sets]), [r for s in sets for r in s.records])
    held = [_held_out(record.id, config.holdout_fraction) for record in combined.records]
    train = combined.subset([i for i, h in enumerate(held) if not h], name=f"{name} (train part)")
    held_out = combined.subset([i for i, h in enumerate(held) if h], name=f"{name} (held-out part)")
    return train, held_out


# --------------------------------------------------------------------------- training




def _lr_factor(step: int, config: EvalEncoderConfig) -> float:
    """Linear warm-up, then cosine decay to zero (SimCLR's schedule)."""
    warmup = min(1.0, (step + 1) / max(1, config.warmup_steps))
    return warmup * 0.5 * (1 + math.cos(math.pi * min(step, config.steps) / max(1, config.steps)))


def train_step(encoder, heads, optimizer, schedule, images, labels, config: EvalEncoderConfig, generator) -> dict:
    """One step of NT-Xent + λ·CE on two augmented views of each image; returns the loss terms."""
    n = len(images)
    views = torch.cat([augment(images, config, generator), augment(images, config, generator)])
    feats = encoder(views)
    z = heads.projection(feats)
    logits = heads.classifier(feats)
    contrastive = nt_xent(z[:n], z[n:], config.temperature)
    supervised = F.cross_entropy(logits, labels.repeat(2))
    loss = contrastive + config.supervised_weight * supervised
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    accuracy = (logits.argmax(1) == labels.repeat(2)).float().mean()
    return {"loss": loss.item(), "nt_xent": contrastive.item(), "ce": supervised.item(), "batch_accuracy": accuracy.item()}


def _config_record(config: EvalEncoderConfig) -> dict:
    return json.loads(json.dumps({"model": "eval-encoder", **asdict(config)}))  # tuples -> lists, as YAML stores them


def _check_same_config(out: Path, config: EvalEncoderConfig) -> None:
    import yaml

    path = out / "config.yaml"
    if not path.is_file() or not (out / "checkpoints").is_dir():
        return
    before = yaml.safe_load(path.read_text())
    now = _config_record(config)
    changed = sorted(k for k in set(before) | set(now) if k != "threads" and before.get(k) != now.get(k))
    if changed:
        raise UserError(
            f"{out} holds an eval-encoder run with a different config ({', '.join(changed)}); "
            "rerun with the same settings to resume, or use a new --out"
        )


def save_model(encoder: EvalEncoder, config: EvalEncoderConfig, out: Path, step: int) -> Path:
    """out/model/{encoder.safetensors, config.json}, replaced atomically as a folder."""
    staging, final = out / "model.tmp", out / "model"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_safetensors(staging / WEIGHTS_FILE, encoder.state_dict(), metadata={"format": "pt"})  # one key: the header is byte-stable
    write_json(
        staging / CONFIG_FILE,
        {
            "model": MODEL_NAME,
            "widths": list(encoder.widths),
            "resolution": encoder.resolution,
            "feature_dim": encoder.feature_dim,
            "features": "raw global-average-pooled last conv stage (post-ReLU), not L2-normalised",
            "input": "NCHW RGB float in [-1, 1]; other sizes are resized to `resolution`",
            "trained_on": list(config.data),
            "steps": step,
            "seed": config.seed,
        },
    )
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    return final


def pretrain(out: Path, config: EvalEncoderConfig | None = None) -> Path:
    """Train the eval-encoder (resumable: rerun the same call), then write `out/model` and `out/metrics.json`."""
    config = config or EvalEncoderConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    use_cpu(config.threads)
    _check_same_config(out, config)
    write_yaml(out / "config.yaml", _config_record(config))
    train, held_out = training_data(config)
    classes = sorted({class_of(record.label) for record in train.records})
    write_manifest(out, config.seed, {"train": train, "held_out": held_out}, {"classes": classes})

    torch.manual_seed(config.seed)
    encoder = EvalEncoder(config.widths, config.resolution)
    heads = TrainingHeads(encoder.feature_dim, config.projection_dim, len(classes))
    parameters = list(encoder.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config))
    generator = torch.Generator().manual_seed(config.seed)
    trained = {"encoder": encoder, "heads": heads, "optimizer": optimizer, "schedule": schedule}

    step, state_path = 0, out / "checkpoints" / "state.pt"
    model, metrics_path = out / "model", out / "metrics.json"
    if state_path.is_file():
        state = load_torch(state_path)
        if state["classes"] != classes:
            raise UserError(f"{state_path}: the checkpoint's classes differ from the data's; use a new --out")
        restore_states(state, trained)
        generator.set_state(state["generator"])
        step = state["step"]

    if step >= config.steps and (model / WEIGHTS_FILE).is_file() and metrics_path.is_file():
        return model  # finished earlier
    pixels = train.tensors()
    class_index = {name: i for i, name in enumerate(classes)}
    labels = torch.tensor([class_index[class_of(record.label)] for record in train.records])
    encoder.train()
    heads.train()
    bar = progress(config.steps, step, "eval-encoder")
    started, recent = time.time(), []
    while step < config.steps:
        index = torch.randint(len(pixels), (config.batch,), generator=generator)
        terms = train_step(encoder, heads, optimizer, schedule, pixels[index], labels[index], config, generator)
        step += 1
        recent.append(terms)
        bar.update(1)
        bar.set_postfix(loss=f"{terms['loss']:.3f}", acc=f"{terms['batch_accuracy']:.2f}")
        if step % config.log_every == 0 or step == config.steps:
            means = {key: float(np.mean([t[key] for t in recent])) for key in recent[0]}
            append_jsonl(out / "log.jsonl", {"step": step, **means, "lr": schedule.get_last_lr()[0], "seconds": time.time() - started})
            recent = []
        if step % config.checkpoint_every == 0 or step == config.steps:
            save_torch(
                state_path,
                {
                    **module_states(trained),
                    "generator": generator.get_state(),
                    "classes": classes,
                    "step": step,
                },
            )
    bar.close()

    model = save_model(encoder, config, out, step)
    encoder = load_eval_encoder(model)
    metrics = sanity_metrics(encoder, train, held_out, config)
    write_json(metrics_path, {"extractor_id": encoder.extractor_id, "steps": step, **metrics})
    return model


# --------------------------------------------------------------------------- loading and sanity metrics


def load_eval_encoder(folder: Path) -> EvalEncoder:
    """The encoder in `folder` (encoder.safetensors + config.json), in eval mode, frozen, with `extractor_id`
    "pocket-eval-encoder@<first 12 hex of the weights' sha256>" (over tensor names, dtypes, shapes and
    bytes, so it does not depend on the file's header: safetensors writes metadata in no fixed order)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    weights, config_path = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not weights.is_file() or not config_path.is_file():
        raise UserError(
            f"{folder}: not an eval-encoder folder (needs {WEIGHTS_FILE} and {CONFIG_FILE}); "
            "build one with `genadapt pretrain eval-encoder --out DIR` and use DIR/model"
        )
    from genadapt.eval.features import tensors_sha256

    info = json.loads(config_path.read_text())
    encoder = EvalEncoder(info["widths"], info.get("resolution", 32))
    tensors = load_file(weights)
    try:
        encoder.load_state_dict(tensors)
    except (RuntimeError, KeyError) as error:
        raise UserError(f"{weights}: weights do not match {CONFIG_FILE} ({str(error).splitlines()[0]})") from None
    encoder.extractor_id = f"{MODEL_NAME}@{tensors_sha256(tensors)[:12]}"
    return encoder.eval().requires_grad_(False)


@torch.no_grad()
def _feats(encoder: EvalEncoder, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    return torch.cat([encoder(chunk) for chunk in images.split(batch)]) if len(images) else torch.zeros(0, encoder.feature_dim)


def knn_accuracy(query, query_labels, gallery, gallery_labels, k: int) -> float:
    """Majority vote of the k nearest gallery items by cosine similarity (ties: the nearest class)."""
    similarity = F.normalize(query, dim=1) @ F.normalize(gallery, dim=1).T
    nearest = similarity.topk(k, dim=1).indices
    correct = 0
    for row, truth in zip(nearest.tolist(), query_labels):
        votes: dict = {}
        for rank, j in enumerate(row):
            votes.setdefault(gallery_labels[j], []).append(rank)
        best = max(votes, key=lambda label: (len(votes[label]), -min(votes[label])))
        correct += best == truth
    return correct / max(1, len(query_labels))


def retrieval_accuracy(encoder: EvalEncoder, images: torch.Tensor, config: EvalEncoderConfig, seed: int = 1) -> dict:
    """Top-1 instance retrieval: an augmented copy of each image (training-strength augmentation) finds its
    original as the Euclidean nearest neighbour among all originals, in feature space and, as a baseline,
    in pixel space (what nearest-neighbour memorisation checks rely on)."""
    augmented = augment(images, config, torch.Generator().manual_seed(seed))
    truth = torch.arange(len(images))
    in_feats = torch.cdist(_feats(encoder, augmented), _feats(encoder, images)).argmin(1) == truth
    in_pixels = torch.cdist(augmented.flatten(1), images.flatten(1)).argmin(1) == truth
    return {"features": float(in_feats.float().mean()), "pixels": float(in_pixels.float().mean())}


def sanity_metrics(encoder: EvalEncoder, train, held_out, config: EvalEncoderConfig) -> dict:
    """kNN group accuracy on the held-out part, instance retrieval, and FIDs that should be ordered
    (same-distribution << other domain). The target domains are used here for evaluation only."""
    from genadapt.data import load_dataset
    from genadapt.eval.metrics import fid

    train_feats, held_feats = _feats(encoder, train.tensors()), _feats(encoder, held_out.tensors())
    train_labels = [class_of(r.label) for r in train.records]
    held_labels = [class_of(r.label) for r in held_out.records]
    metrics: dict = {"train_count": len(train), "held_out_count": len(held_out), "feature_dim": encoder.feature_dim}
    if len(held_out):
        counts = {label: held_labels.count(label) for label in set(held_labels)}
        metrics["held_out_knn"] = {
            "1nn_accuracy": knn_accuracy(held_feats, held_labels, train_feats, train_labels, 1),
            "5nn_accuracy": knn_accuracy(held_feats, held_labels, train_feats, train_labels, min(5, len(train))),
            "majority_class_rate": max(counts.values()) / len(held_labels),
            "classes": len(set(train_labels)),
        }
        metrics["retrieval_top1"] = {"held_out": retrieval_accuracy(encoder, held_out.tensors(), config)}
    names = ("flags/train", "flags/reference", "dark-skin/train", "dark-skin/reference")
    targets = {name: load_dataset(f"builtin:openmoji/{name}", resolution=config.resolution) for name in names}
    metrics.setdefault("retrieval_top1", {})
    for name in ("flags/reference", "dark-skin/reference"):
        metrics["retrieval_top1"][name + " (unseen domain)"] = retrieval_accuracy(encoder, targets[name].tensors(), config)
    source = [i for i, r in enumerate(train.records) if r.label.startswith("source/")]
    source_held = [i for i, r in enumerate(held_out.records) if r.label.startswith("source/")]
    if len(source) > 1 and len(source_held) > 1:
        reference = train_feats[source]
        feats = {name: _feats(encoder, images.tensors()) for name, images in targets.items()}
        metrics["fid_vs_source_train"] = {
            "source held-out (same distribution)": fid(held_feats[source_held], reference),
            "flags/reference": fid(feats["flags/reference"], reference),
            "dark-skin/reference": fid(feats["dark-skin/reference"], reference),
        }
        metrics["fid_within_target"] = {
            "flags train vs reference": fid(feats["flags/train"], feats["flags/reference"]),
            "dark-skin train vs reference": fid(feats["dark-skin/train"], feats["dark-skin/reference"]),
            "flags/reference vs dark-skin/reference": fid(feats["flags/reference"], feats["dark-skin/reference"]),
        }
        metrics["fid_note"] = "FID is biased upward at small N; compare values at similar N (here 140-320 images, D=256)"
    return metrics

"""Best step by validation: few-shot adaptation overfits, so a run is judged at intervals, not at its last step.

Every `--validate-every N` steps the loop calls `Validation.check`: `--validation-samples` fresh samples (a fixed
seed, so every check sees the same noise) are scored by KID (Bińkowski et al. 2018, in the eval encoder's space)
against held-out validation images — `--validation DIR`, or the images of `--data` that are not the run's shots,
never the compare's final reference — and by the copy rate against the shots (`genadapt.eval.copies`). The
state of the best check whose copy rate is at most `--copy-ceiling` is kept; after `--patience` checks without
a better score the run stops early. The artifact the run saves is the best state, and `validation.jsonl` /
summary.json say which step it is. DPMs-ANT (Wang et al., ICML 2024) report few-shot FID at its best near 300
iterations and worse by 400, with diversity falling: the reason a fixed step count is the wrong default.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from genadapt.errors import UserError


def validation_images(config, shots, resolution: int):
    """`--validation`, else the images of `--data` that are not among the run's shots (at most 256)."""
    from genadapt.data import load_dataset

    reading = dict(resolution=resolution, fit=config.fit, background=config.background,
                   caption_extension=config.caption_extension, caption_column=config.caption_column)
    if config.validation:
        images = load_dataset(config.validation, **reading)
    else:
        whole = config.data.split("?", 1)[0]  # the pool the shots come from, not the shot subset a spec's query picks
        pool = load_dataset(whole, **reading)
        used = {record.sha256 for record in shots.records}
        keep = [i for i, record in enumerate(pool.records) if record.sha256 not in used][:256]
        images = pool.subset(keep) if keep else None
    if images is None or len(images) < 4:
        raise UserError(f"--validate-every needs held-out images: pass --validation DIR, or --data with more images than --shots ({len(shots)} used)")
    return images


class Validation:
    def __init__(self, every: int, samples: int, patience: int, copy_ceiling: float, images, shots, sample, seed: int, out: Path):
        from genadapt.eval.features import cached_features, get_extractor

        self.every, self.samples, self.patience, self.copy_ceiling = every, samples, patience, copy_ceiling
        self.shots, self.sample, self.seed, self.out = shots, sample, seed, Path(out)
        self.extractor = get_extractor("pocket")
        self.reference = cached_features(self.extractor, images)
        self.history: list[dict] = []
        self.best: dict | None = None  # {"step", "kid", "copy_rate"}
        self.best_state = None
        self.since_best = 0

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    @torch.no_grad()
    def check(self, step: int, model, snapshot) -> dict:
        """Score the model at `step`; keep `snapshot()` if it is the best yet under the copy ceiling."""
        from genadapt.data.imageset import image_set
        from genadapt.eval import metrics
        from genadapt.eval.copies import detect_copies
        from genadapt.eval.features import cached_features

        images = self.sample(model, self.samples, self.seed)
        samples = image_set(f"validation@{step}", images)
        feats = cached_features(self.extractor, samples)
        kid = metrics.kid(feats, self.reference, n_subsets=20, seed=self.seed)
        copy_rate = float(detect_copies(samples.pixels, self.shots.pixels)["copy_rate"])
        eligible = copy_rate <= self.copy_ceiling
        improved = eligible and (self.best is None or kid < self.best["kid"])
        if improved:
            self.best = {"step": step, "kid": kid, "copy_rate": copy_rate}
            self.best_state = snapshot()
            self.since_best = 0
        else:
            self.since_best += 1
        record = {"step": step, "kid": kid, "copy_rate": copy_rate, "eligible": eligible, "best": improved}
        self.history.append(record)
        with (self.out / "validation.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        return record

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.best is not None and self.since_best >= self.patience

    def state_dict(self) -> dict:
        return {"history": self.history, "best": self.best, "best_state": self.best_state, "since_best": self.since_best}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.best, self.best_state, self.since_best = state["history"], state["best"], state["best_state"], state["since_best"]
        lines = "".join(json.dumps(record) + "\n" for record in self.history)
        (self.out / "validation.jsonl").write_text(lines, encoding="utf-8")

    def summary(self) -> dict:
        return {"every": self.every, "samples": self.samples, "patience": self.patience, "copy_ceiling": self.copy_ceiling,
                "best_step": self.best["step"] if self.best else None, "best_kid": self.best["kid"] if self.best else None,
                "checks": len(self.history), "stopped_early": self.stop}

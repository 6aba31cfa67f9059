"""Best step by validation: the best check under the copy ceiling is kept, copies never win, patience stops the run."""

import json

import torch

from genadapt.data import load_dataset
from genadapt.recipes.validation import Validation


def test_the_best_eligible_check_is_kept_and_patience_stops(tmp_path):
    shots = load_dataset("builtin:openmoji/flags?shots=10&seed=0", resolution=32)
    held_out = load_dataset("builtin:openmoji/flags/reference", resolution=32)
    validation, later = held_out.subset(range(0, 80)), held_out.subset(range(80, 112))
    noise = torch.Generator().manual_seed(0)
    outputs = {
        1: torch.rand(32, 3, 32, 32, generator=noise) * 2 - 1,  # far from the domain
        2: later.tensors(),  # the domain itself: the best
        3: shots.tensors().repeat(4, 1, 1, 1)[:32],  # literal copies of the shots: lower KID is no excuse
        4: torch.rand(32, 3, 32, 32, generator=noise) * 2 - 1,
    }
    step_of = {"step": 0}

    def sample(model, n, seed):
        return outputs[step_of["step"]][:n]

    checker = Validation(every=1, samples=32, patience=2, copy_ceiling=0.05, images=validation, shots=shots, sample=sample, seed=0, out=tmp_path)
    for step in (1, 2, 3, 4):
        step_of["step"] = step
        record = checker.check(step, model=None, snapshot=lambda: {"weights_at": step})
        if step == 3:
            assert record["copy_rate"] > 0.9 and not record["eligible"]
        if checker.stop:
            break
    assert checker.best["step"] == 2 and checker.best_state == {"weights_at": 2}
    assert step == 4 and checker.stop  # two checks without improvement after step 2
    lines = [json.loads(line) for line in (tmp_path / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and [r["best"] for r in lines] == [True, True, False, False]
    again = Validation(every=1, samples=32, patience=2, copy_ceiling=0.05, images=validation, shots=shots, sample=sample, seed=0, out=tmp_path)
    again.load_state_dict(checker.state_dict())
    assert again.best == checker.best and again.stop

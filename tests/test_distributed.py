"""Two CPU processes (torchrun, gloo): ranks see different batches, yet trainable weights stay identical,
so LoRA gradients were synchronised."""

import json
import os
import subprocess
import sys
import textwrap

from diffusion_fixtures import build_tiny_pipeline

SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys, torch
    torch.set_num_threads(1)
    from accelerate import Accelerator
    from genadapt.config import AdaptConfig
    from genadapt.recipes.train import adapt_diffusion

    base, out = sys.argv[1], sys.argv[2]
    accelerator = Accelerator(cpu=True)
    config = AdaptConfig(base=base, data="builtin:digits/3?shots=6", train="lora", rank=2, steps=3, batch_size=2,
                         learning_rate=1e-2, checkpointing_steps=3, num_validation_images=1, sample_steps=1, out=out)
    summary = adapt_diffusion(config, accelerator=accelerator)
    digest = hashlib.sha256()
    for name, parameter in summary["model"].named_parameters():
        if parameter.requires_grad:
            digest.update(name.encode() + parameter.detach().numpy().tobytes())
    record = {"rank": accelerator.process_index, "world": accelerator.num_processes, "digest": digest.hexdigest(),
              "losses": [row["loss"] for row in summary["history"]]}
    open(f"{out}/rank{accelerator.process_index}.json", "w").write(json.dumps(record))
    """
)


def test_two_process_lora_stays_identical_across_ranks(tmp_path):
    base = build_tiny_pipeline(tmp_path / "tiny")
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", str(script), str(base), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["losses"] != ranks[1]["losses"], "ranks must train on different batches"
    assert ranks[0]["digest"] == ranks[1]["digest"], "LoRA weights diverged: gradients were not synchronised"
    assert (out / "pytorch_lora_weights.safetensors").is_file()

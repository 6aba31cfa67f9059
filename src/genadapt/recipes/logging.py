"""`--report-to tensorboard`: the step records both loops append to log.jsonl, also as TensorBoard events in RUN/logs.

Every loss term is a scalar `loss/<name>` (the total as `loss/loss` in the diffusion loop; `loss/d_loss`,
`loss/g_loss` and each term in the GAN loop), the learning rate `lr` (GAN: also `d_lr`), any other number of the
record `train/<name>`, and each sample grid the image `samples`. A resumed run purges the events after its
checkpoint, as log.jsonl is rewritten to it, so the curves show one run.
"""

from __future__ import annotations

from pathlib import Path

from genadapt.errors import UserError

LOG_DIR = "logs"
NOT_LOSSES = {"step", "lr", "d_lr", "augment_p", "real_score", "fake_score"}


class Reporter:
    """Writes nothing unless `report_to` is `tensorboard` (and only on the main process)."""

    def __init__(self, out: Path, report_to: str, main: bool = True, start: int = 0):
        self.writer = None
        if report_to != "tensorboard" or not main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--report-to tensorboard needs tensorboard, which is not installed: pip install 'genadapt[tensorboard]' (or pip install tensorboard)") from None
        self.writer = SummaryWriter(log_dir=str(Path(out) / LOG_DIR), purge_step=start or None)

    def log(self, step: int, record: dict) -> None:
        if self.writer is None:
            return
        for name, value in record.items():
            if name == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            tag = name if name in ("lr", "d_lr") else (f"train/{name}" if name in NOT_LOSSES else f"loss/{name}")
            self.writer.add_scalar(tag, float(value), step)

    def image(self, path: Path, step: int, tag: str = "samples") -> None:
        """A sample grid the loop wrote as PNG."""
        if self.writer is None or path is None:
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

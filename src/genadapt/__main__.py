"""`python -m genadapt`: what `accelerate launch -m genadapt` and `torchrun -m genadapt` run."""

from genadapt.cli import app

app()

"""genadapt: adapt pretrained generators (diffusion models and GANs) to small image sets.

Importing the package is cheap: heavy modules (torch, diffusers) load only when used.
"""

__version__ = "0.1.0"

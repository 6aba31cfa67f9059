"""genadapt: adapt pretrained generators (diffusion models and GANs) to small image sets.

Importing the package is cheap: heavy modules (torch, diffusers) load only when used.
"""

__version__ = "0.1.0"


def _silence_torchvision_notice() -> None:
    """transformers warns on every import of an image processor that torchvision is missing and falls back to PIL;
    genadapt never uses torchvision, so the line is noise before every command's output."""
    import logging

    class NoTorchvisionNotice(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "requires torchvision (not installed)" not in record.getMessage()

    logging.getLogger("transformers.utils.import_utils").addFilter(NoTorchvisionNotice())


_silence_torchvision_notice()

"""latentcache's pipeline: WebDataset image shards -> VAE actors on Ray -> latent shards, and back."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("latentcache")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"


from typing import Any  # noqa: E402

from .io.latent_reader import read_latents  # noqa: E402  (after __version__, which submodules import)

__all__ = ["__version__", "LatentDataset", "read_latents"]


def __getattr__(name: str) -> Any:
    # The training reader imports torch; `import pipeline` (and `latentcache --version`) need not.
    if name == "LatentDataset":
        from .dataset import LatentDataset

        return LatentDataset
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")

"""latentcache's pipeline: WebDataset image shards -> VAE actors on Ray -> latent shards."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("latentcache")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"


from .readback import read_latents  # noqa: E402  (after __version__, which submodules import)

__all__ = ["__version__", "read_latents"]

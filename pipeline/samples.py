"""Plain data passed between the pipeline's stages: raw samples, prepared samples, sample errors.

A shard is the unit of work; a sample is the unit of error. A stage that cannot handle one sample
yields a `SampleError` in its place and goes on with the next.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, TypeAlias

import numpy as np

# One WebDataset sample as webdataset's grouping makes it:
# {"__key__": "a/b/000123", "__url__": "s3://bucket/train-000001.tar", "jpg": b"...", "txt": b"..."}.
# Member extensions are lower-cased; every member's value is its raw bytes.
RawSample: TypeAlias = dict[str, Any]

STAGES = ("read", "decode", "preprocess", "encode", "write")


@dataclass(frozen=True)
class SampleError:
    """Why one sample of a shard produced no latent.

    key: the sample's key in the shard (or `<shard>:<truncated>` when the tar broke before a key).
    shard: the input shard's URL.
    stage: where it failed, one of `STAGES` (not enforced, so that old ledgers always load).
    reason: a human-readable cause naming the bad value.
    """

    key: str
    shard: str
    stage: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        """The plain form, one row of the errors table."""
        return asdict(self)


# eq=False: dataclass equality would compare the pixel arrays with `==` and fail on truthiness.
@dataclass(frozen=True, eq=False)
class PreparedSample:
    """A decoded, resized, cropped sample, ready to batch for the VAE.

    pixels: uint8 array, (height, width, 3) RGB, at `target_size`.
    original_size: (height, width) of the decoded image after EXIF orientation.
    crop_top_left: (top, left) of the crop inside the resized image (SDXL's crop conditioning).
    target_size: (height, width) the image was resized and cropped to.
    extras: the sample's non-image members by lower-case extension, e.g. {"txt": b"a cat"}.
    """

    key: str
    pixels: np.ndarray
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]
    extras: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        expected = (*self.target_size, 3)
        if self.pixels.dtype != np.uint8 or self.pixels.shape != expected:
            raise ValueError(f"PreparedSample {self.key!r}: pixels are {self.pixels.dtype} {self.pixels.shape}; "
                             f"expected uint8 {expected}")

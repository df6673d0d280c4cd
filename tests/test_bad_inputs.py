"""Bad inputs generated with hypothesis, through the real encode shard path in-process (issue 8,
"Faults to inject", item 5).

Each example is a WebDataset tar that mixes real photos (tests/imagedata.py) with bad members:
random bytes, truncated and zero-byte images, samples without an image, duplicate members and
non-adjacent keys, links and special files, path-traversal, non-UTF-8 and reserved names,
decompression bombs, huge, tiny and animated images, oversized members; and, as a whole, cut
short, padded, compressed, followed by a header that lies about its size, or not a tar at all.
It runs through `EncodeWorker` + `ShardProcessor` (no Ray) with the tiny random-weights VAE, and:

- nothing escapes `ShardProcessor.process`: a file that is not a tar is one read error;
- written + errored == read, and no key is written twice;
- each sample is written (read back from the Parquet file, passthrough values included) or is a
  SampleError whose reason names its problem, as the example's model predicts;
- a tar cut short keeps every sample before the damage and reports the damage once;
- a shard with an oversized member or a decompression bomb stays within a memory bound, and a
  header that declares more bytes than the file holds does not hang the reader.

Hypothesis profiles: `latentcache-ci` (the default: derandomized, no example database, so every
run tries the same examples) and `latentcache-dev` (random, five times the examples), chosen with
LATENTCACHE_HYPOTHESIS_PROFILE=dev.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import io
import itertools
import json
import lzma
import os
import tarfile
import threading
import tracemalloc
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.config import ConfigError, EncodeConfig, PreprocessConfig, VAEConfig
from pipeline.core.kind import PlanContext
from pipeline.core.ledger import Ledger, ShardRecord, build_manifest
from pipeline.core.scheduler import ShardResult, ShardTask
from pipeline.core.shard import ShardProcessor
from pipeline.io import tar_reader
from pipeline.io.latent_reader import read_latents
from pipeline.io.tar_reader import iter_shard
from pipeline.jobs.encode import EncodeJob
from pipeline.samples import STAGES, SampleError
from tests import imagedata

# Header-only bombs make Pillow warn before our own check refuses them; the refusal is asserted.
pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")]

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
settings.register_profile("latentcache-ci", derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=_HEALTH)
settings.register_profile("latentcache-dev", deadline=None, print_blob=True, suppress_health_check=_HEALTH)
_PROFILE_NAME = "latentcache-" + os.environ.get("LATENTCACHE_HYPOTHESIS_PROFILE", "ci")
_PROFILE = settings.get_profile(_PROFILE_NAME)


_CI = _PROFILE_NAME == "latentcache-ci"
# A whole property's limit (pytest-timeout's one alarm per test): each example is bounded on its own
# by SHARD_SECONDS below; in CI the properties take well under a minute on 2 shared cores.
PROPERTY_TIMEOUT = 300 if _CI else 3600


def examples(n: int) -> settings:
    """Settings for one property: n examples in CI (2 shared cores), five times that in dev."""
    return settings(_PROFILE, max_examples=n if _CI else 5 * n)


RES = 64
# The member limit of the generated shards: small, so an oversized member costs a few KB per example.
LIMIT = 64 * 1024
DEFAULT_LIMIT = PreprocessConfig().max_member_bytes
# Peak Python allocation allowed while a shard with a bomb is processed (after the encoder's warm-up):
# a handful of small samples need under 1 MiB; reading any of the bombs needs 32 MiB to 512 MiB.
MEMORY_BOUND = 8 * 2**20
CORRUPT = "truncated or corrupt tar"
# One shard of a few small samples takes well under a second; one that runs this long hangs.
SHARD_SECONDS = 30.0


# --- the encode shard path, in-process ------------------------------------------------------------


class ShardHung(BaseException):
    """A shard did not finish within SHARD_SECONDS. A BaseException, so that hypothesis passes it
    on at once: a failure it shrinks would hang again at every shrinking step (and pytest-timeout's
    one alarm per test only ends the first)."""


def _within(seconds: float, fn: Callable[[], Any], what: str) -> Any:
    """fn() in a daemon thread, or ShardHung once `seconds` pass (the thread is left to spin)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["out"] = fn()
        except BaseException as e:  # handed to the caller's thread as is
            box["exc"] = e

    worker = threading.Thread(target=target, daemon=True, name="shard-under-test")
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise ShardHung(f"{what} did not finish within {seconds:.0f} s")
    if "exc" in box:
        raise box["exc"]
    return box["out"]


@dataclass
class Outcome:
    """What one shard became: the processor's result, the committed record, the rows read back."""

    url: str
    name: str
    result: ShardResult
    record: ShardRecord
    rows: list[tuple[str, np.ndarray, dict]]

    @property
    def written(self) -> list[str]:
        return [key for key, _, _ in self.rows]

    @property
    def errors(self) -> list[SampleError]:
        return list(self.record.errors)

    def extras(self, key: str) -> dict[str, Any]:
        return next(meta["extras"] for k, _, meta in self.rows if k == key)


class Encoder:
    """The encode job's own worker and ShardProcessor, committing shards into one output folder."""

    def __init__(self, root: Path, max_member_bytes: int | None = None) -> None:
        self.root = root
        self.limit = max_member_bytes
        (root / "in").mkdir(parents=True)
        (root / "shards").mkdir()
        # The plan lists the inputs, so there must be one; the shards under test come afterwards.
        imagedata.write_tar_shard(str(root / "in" / "seed-000000.tar"),
                                  [{"__key__": "seed", "jpg": photo_pool()[0][1]}])
        pre = PreprocessConfig(resolution=RES) if max_member_bytes is None else \
            PreprocessConfig(resolution=RES, max_member_bytes=max_member_bytes)
        self.cfg = EncodeConfig(input=(str(root / "in"),), output=str(root / "out"),
                                vae=VAEConfig(source="random:tiny", dtype="float32"), preprocess=pre,
                                passthrough=("txt", "json"), latent_dtype="float32", batch_size=3,
                                decode_threads=2, max_error_rate=1.0)
        kind = EncodeJob()
        plan = kind.plan(self.cfg, kind.inputs(self.cfg), PlanContext(device="cpu"))
        self.ledger = Ledger(self.cfg.output)
        self.ledger.open_job(build_manifest(kind="encode", identity=plan.identity, shards=plan.inputs,
                                            data_extension="parquet", code_version="test"), overwrite=False)
        self.processor = ShardProcessor(kind.worker(self.cfg, plan), output=self.cfg.output,
                                        identity=plan.identity)
        self._names = itertools.count()
        # The first shard pays for lazy imports and caches (~27 MiB): not a cost the bounds measure.
        if max_member_bytes is None:  # (a small limit refuses the photo itself)
            assert self.run(tar_of([Member("warm.jpg", photo_pool()[0][1])])[0]).written == ["warm"]

    def new_shard(self, suffix: str = ".tar") -> tuple[str, Path]:
        """A fresh shard name and the path its input file goes to."""
        name = f"bad-{next(self._names):06d}"
        return name, self.root / "shards" / f"{name}{suffix}"

    def write(self, data: bytes, suffix: str = ".tar") -> tuple[str, str]:
        name, path = self.new_shard(suffix)
        path.write_bytes(data)
        return name, str(path)

    def process(self, name: str, url: str) -> Outcome:
        """Run one shard; the checks every shard must pass, whatever its content, are made here."""
        # The worker hands preprocess.max_member_bytes (self.limit) to the reader.
        result = _within(SHARD_SECONDS, lambda: self.processor.process(ShardTask(name, url)),
                         f"shard {url} (kept for a rerun)")
        record = self.ledger.committed(name)
        assert record is not None, f"shard {name} was not committed"
        rows = list(read_latents(str(Path(self.cfg.output) / f"{name}.parquet")))
        outcome = Outcome(url, name, result, record, rows)
        check_invariants(outcome)
        return outcome

    def run(self, data: bytes, suffix: str = ".tar") -> Outcome:
        return self.process(*self.write(data, suffix))

    def close(self) -> None:
        self.processor._pool.shutdown(wait=True)


def check_invariants(o: Outcome) -> None:
    """Every sample read is written or errored, once; what is written is a whole latent."""
    r = o.result
    assert r.samples_read == r.samples_written + r.samples_errored
    assert (o.record.samples_read, o.record.samples_written, len(o.record.errors)) == \
        (r.samples_read, r.samples_written, r.samples_errored)
    assert len(o.written) == r.samples_written
    dupes = [k for k, n in Counter(o.written).items() if n > 1]
    assert not dupes, f"keys written twice: {dupes}"
    for key, latent, meta in o.rows:
        assert latent.shape == (4, RES // 8, RES // 8) and np.isfinite(latent).all(), key
        assert meta["target_size"] == (RES, RES)
    for e in o.errors:
        assert e.shard == o.url and e.stage in STAGES and e.key and e.reason, e
        for text in (e.key, e.reason):
            text.encode("utf-8")  # the errors table (Parquet strings) and the logs must hold them


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Encoder]:
    enc = Encoder(tmp_path_factory.mktemp("bad-inputs"), max_member_bytes=LIMIT)
    yield enc
    enc.close()


@pytest.fixture(scope="module")
def default_encoder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Encoder]:
    """The same at the default member limit (64 MiB), for the memory bounds."""
    enc = Encoder(tmp_path_factory.mktemp("bad-inputs-default"))
    yield enc
    enc.close()


# --- tar members and the model of what must become of them ---------------------------------------


@dataclass(frozen=True)
class Member:
    """One tar entry. `declared` overrides the header's size (a header that lies); names may hold
    lone surrogates, written as the raw bytes they stand for."""

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    declared: int | None = None

    def __repr__(self) -> str:  # falsifying examples stay readable: sizes, not photo bytes
        extra = "".join(f", {k}={v!r}" for k, v in (("linkname", self.linkname), ("declared", self.declared)) if v)
        return f"Member({self.name!r}, <{len(self.data)} bytes {self.data[:8]!r}...>, type={self.type!r}{extra})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # how hypothesis prints examples
        printer.text(repr(self))


@dataclass(frozen=True)
class Sample:
    """A generated sample and its expected fate.

    key: the key it is reported under. expect: None when it must be written; else substrings, one of
    which its SampleError's reason must hold. may_write: written is also right (random bytes may
    happen to be an image). passthrough: the txt/json values a written row must carry.
    """

    key: str
    members: tuple[Member, ...]
    expect: tuple[str, ...] | None = None
    stage: str | None = None
    may_write: bool = False
    passthrough: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Shard:
    """Samples with noise entries between them (noise[i] goes before sample i; noise[n] at the end)."""

    samples: tuple[Sample, ...]
    noise: tuple[tuple[Member, ...], ...]

    def entries(self) -> list[tuple[Member, int]]:
        """(member, index of the sample it belongs to); noise belongs to the sample after it."""
        out = []
        for i, sample in enumerate(self.samples):
            out += [(m, i) for m in self.noise[i]] + [(m, i) for m in sample.members]
        return out + [(m, len(self.samples)) for m in self.noise[-1]]


def tar_of(members: Sequence[Member], *, end: bool = True) -> tuple[bytes, list[tuple[int, int]]]:
    """The tar (GNU format: long and non-UTF-8 names keep their bytes) and each entry's byte span."""
    out = bytearray()
    spans = []
    for m in members:
        start = len(out)
        info = tarfile.TarInfo(m.name)
        info.type, info.linkname, info.mtime, info.mode = m.type, m.linkname, 1_700_000_000, 0o644
        info.size = m.declared if m.declared is not None else len(m.data)
        out += info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape")
        out += m.data + b"\0" * (-len(m.data) % 512)
        spans.append((start, len(out)))
    if end:
        out += b"\0" * 1024
    return bytes(out), spans


# --- real images ---------------------------------------------------------------------------------


@functools.cache
def photo_pool() -> list[tuple[str, bytes]]:
    """(extension, bytes) of each bundled photo, 40 px, as JPEG, PNG and WebP."""
    pool = []
    for _, img in imagedata.real_photos(max_side=40):
        pool += [("jpg", imagedata.encode(img, "JPEG", quality=85)), ("png", imagedata.encode(img, "PNG")),
                 ("webp", imagedata.encode(img, "WEBP", quality=80))]
    return pool


@functools.cache
def animated_pool() -> list[tuple[str, bytes]]:
    """Three-frame animations of real photos: GIF, APNG and animated WebP."""
    frames = [img.resize((40, 30)) for _, img in imagedata.real_photos(max_side=40)[:3]]
    out = []
    for fmt, ext in (("GIF", "gif"), ("PNG", "png"), ("WEBP", "webp")):
        buf = io.BytesIO()
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=80, loop=0)
        out.append((ext, buf.getvalue()))
    return out


@functools.lru_cache(maxsize=64)
def extreme_photo(width: int, height: int) -> bytes:
    """A real photo squeezed to width x height (1 px lines, 3000:1 strips), as PNG."""
    return imagedata.encode(imagedata.photo("coffee").resize((width, height), Image.Resampling.BILINEAR), "PNG")


@functools.cache
def odd_pool() -> dict[str, imagedata.Encoded]:
    return imagedata.odd_images()


_GOOD_ODD = ("gray_l", "rgba_transparent", "palette_transparent", "palette_transparent_gif", "gray_alpha_la",
             "bilevel_1", "cmyk_jpeg", "gray16_png", "gray16_tiff", "float_tiff", "int32_tiff", "rgb16_png",
             "exif_rotated_jpeg", "webp", "bmp", "tiny")


# --- strategies: one sample of each kind ---------------------------------------------------------

Draw = Callable[[st.SearchStrategy], Any]
captions = st.text(st.characters(codec="utf-8"), max_size=30).map(lambda t: t.encode("utf-8"))
json_docs = st.dictionaries(st.sampled_from("abc"), st.integers(-5, 5), max_size=2).map(
    lambda d: json.dumps(d).encode())


def _with_extras(draw: Draw, key: str, image: Member, **kw: Any) -> Sample:
    """The image plus optional txt/json members, in a drawn order."""
    extras = {}
    if draw(st.booleans()):
        extras["txt"] = draw(captions)
    if draw(st.booleans()):
        extras["json"] = draw(json_docs)
    members = [image] + [Member(f"{key}.{ext}", v) for ext, v in extras.items()]
    return Sample(key, tuple(draw(st.permutations(members))), passthrough=extras, **kw)


def good_photo(draw: Draw, key: str) -> Sample:
    ext, data = draw(st.sampled_from(photo_pool()))
    ext = ext.upper() if draw(st.booleans()) else ext  # the reader lower-cases extensions
    kind = draw(st.sampled_from([tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE]))  # all regular files
    sample = _with_extras(draw, key, Member(f"{key}.{ext}", data, type=kind))
    if draw(st.integers(0, 4)) == 0:  # members no column keeps: counted, never an error
        extra = Member(f"{key}." if draw(st.booleans()) else f"{key}.cls", b"7")
        sample = Sample(key, sample.members + (extra,), passthrough=sample.passthrough)
    return sample


def odd_image(draw: Draw, key: str) -> Sample:
    enc = odd_pool()[draw(st.sampled_from(_GOOD_ODD))]
    return _with_extras(draw, key, Member(f"{key}.{enc.ext}", enc.data))


def extreme_dimensions(draw: Draw, key: str) -> Sample:
    thin, long = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 7, 640, 3000]))
    width, height = (thin, long) if draw(st.booleans()) else (long, thin)
    return _with_extras(draw, key, Member(f"{key}.png", extreme_photo(width, height)))


def animated(draw: Draw, key: str) -> Sample:
    ext, data = draw(st.sampled_from(animated_pool()))
    return _with_extras(draw, key, Member(f"{key}.{ext}", data))


def zero_byte_caption(draw: Draw, key: str) -> Sample:
    ext, data = draw(st.sampled_from(photo_pool()))
    return Sample(key, (Member(f"{key}.{ext}", data), Member(f"{key}.txt", b"")), passthrough={"txt": b""})


def random_bytes_image(draw: Draw, key: str) -> Sample:
    ext = draw(st.sampled_from(["jpg", "png", "webp", "gif", "tif", "bmp", "tga", "ico", "jp2"]))
    data = draw(st.binary(min_size=1, max_size=600))
    return Sample(key, (Member(f"{key}.{ext}", data),), expect=("image", "cannot", "pixels"), may_write=True)


def zero_byte_image(draw: Draw, key: str) -> Sample:
    ext = draw(st.sampled_from(["jpg", "png", "webp"]))
    return _with_extras(draw, key, Member(f"{key}.{ext}", b""), expect=("image data is empty",), stage="decode")


def truncated_image(draw: Draw, key: str) -> Sample:
    ext, data = draw(st.sampled_from(photo_pool()))
    cut = max(1, int(len(data) * draw(st.floats(0.05, 0.95))))
    return _with_extras(draw, key, Member(f"{key}.{ext}", data[:cut]), expect=("truncated", "cannot", "broken"),
                        stage="decode")


def header_lies_image(draw: Draw, key: str) -> Sample:
    """A PNG whose header claims 4000x3000 over a one-pixel body: under the pixel limit, undecodable."""
    enc = odd_pool()["huge_header_png"]
    return Sample(key, (Member(f"{key}.png", enc.data),), expect=("4000x3000",), stage="decode")


def bomb_image(draw: Draw, key: str) -> Sample:
    enc = odd_pool()[draw(st.sampled_from(["bomb_header_png", "bomb_header_gif"]))]
    return _with_extras(draw, key, Member(f"{key}.{enc.ext}", enc.data), expect=("pixels",), stage="decode")


def missing_image(draw: Draw, key: str) -> Sample:
    members = [Member(f"{key}.{ext}", draw(captions)) for ext in draw(
        st.lists(st.sampled_from(["txt", "json", "cls"]), min_size=1, max_size=3, unique=True))]
    return Sample(key, tuple(members), expect=("no image member",), stage="decode")


def duplicate_member(draw: Draw, key: str) -> Sample:
    ext, data = draw(st.sampled_from(photo_pool()))
    twice = draw(st.sampled_from([ext, ext.upper(), "txt"]))
    first = Member(f"{key}.{ext}", data)
    members = [first, Member(f"{key}.{twice}", b"second"), Member(f"{key}.{twice}", b"third")] if twice == "txt" \
        else [first, Member(f"{key}.{twice}", data)]
    return Sample(key, tuple(members), expect=("duplicate member",), stage="read")


def link_member(draw: Draw, key: str) -> Sample:
    ext, data = draw(st.sampled_from(photo_pool()))
    kind, word = draw(st.sampled_from([(tarfile.SYMTYPE, "symbolic link"), (tarfile.LNKTYPE, "hard link")]))
    target = draw(st.sampled_from(["/etc/passwd", "../../x.jpg", f"{key}.{ext}", "seed.jpg"]))
    if draw(st.booleans()):  # the image itself is the link
        members = [Member(f"{key}.{ext}", type=kind, linkname=target)]
    else:
        members = [Member(f"{key}.{ext}", data), Member(f"{key}.txt", type=kind, linkname=target)]
    return Sample(key, tuple(draw(st.permutations(members))), expect=(word,), stage="read")


def special_member(draw: Draw, key: str) -> Sample:
    ext, data = draw(st.sampled_from(photo_pool()))
    kind = draw(st.sampled_from([tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, b"Z"]))
    word = "unknown type" if kind == b"Z" else "special file"
    odd = Member(f"{key}.{draw(st.sampled_from([ext, 'txt']))}", data if kind == b"Z" else b"", type=kind)
    members = [odd] if odd.name.endswith(ext) else [Member(f"{key}.{ext}", data), odd]
    return Sample(key, tuple(members), expect=(word,), stage="read")


def traversal_name(draw: Draw, key: str) -> Sample:
    bad = draw(st.sampled_from([f"../{key}", f"../../etc/{key}", f"/abs/{key}", f"a/../../{key}",
                                f"a/b/../../../{key}", f"//{key}"]))
    ext, data = draw(st.sampled_from(photo_pool()))
    return _with_extras(draw, bad, Member(f"{bad}.{ext}", data), expect=("absolute path or has a '..' segment",),
                        stage="read")


def _escaped(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def non_utf8_name(draw: Draw, key: str) -> Sample:
    """Bytes that are not UTF-8 in the name (a continuation byte after ASCII, then any high bytes),
    as tarfile decodes them: lone surrogates. Reported escaped."""
    high = [draw(st.integers(0x80, 0xBF))] + draw(st.lists(st.integers(0x80, 0xFF), max_size=2))
    raw = key + "".join(chr(0xDC00 + b) for b in high)
    ext, data = draw(st.sampled_from(photo_pool()))
    sample = _with_extras(draw, raw, Member(f"{raw}.{ext}", data))
    return Sample(_escaped(raw), sample.members, expect=("not valid UTF-8",), stage="read")


def reserved_extension(draw: Draw, key: str) -> Sample:
    ext, data = draw(st.sampled_from(photo_pool()))
    reserved = draw(st.sampled_from(["__key__", "__url__", "__KEY__", "__local_path__"]))
    members = [Member(f"{key}.{ext}", data), Member(f"{key}.{reserved}", b"x")]
    return Sample(key, tuple(draw(st.permutations(members))), expect=("reserves",), stage="read")


def oversized_member(draw: Draw, key: str) -> Sample:
    ext, data = draw(st.sampled_from(photo_pool()))
    extra = draw(st.integers(1, 8192))
    if draw(st.booleans()):  # a caption of LIMIT + extra bytes
        members = [Member(f"{key}.{ext}", data), Member(f"{key}.txt", b"a" * (LIMIT + extra))]
    else:  # an image padded past the limit (it would decode: JPEG and PNG ignore trailing bytes)
        members = [Member(f"{key}.{ext}", data + b"\0" * (LIMIT + extra - len(data)))]
    return Sample(key, tuple(draw(st.permutations(members))), expect=("over the limit max_member_bytes",),
                  stage="read")


def undecodable_caption(draw: Draw, key: str) -> Sample:
    ext, data = draw(st.sampled_from(photo_pool()))
    bad = b"\xff" + draw(st.binary(max_size=20))
    return Sample(key, (Member(f"{key}.{ext}", data), Member(f"{key}.txt", bad)), expect=("not UTF-8",),
                  stage="write")


GOOD_KINDS = [good_photo, odd_image, extreme_dimensions, animated, zero_byte_caption]
BAD_KINDS = [random_bytes_image, zero_byte_image, truncated_image, header_lies_image, bomb_image, missing_image,
             duplicate_member, link_member, special_member, traversal_name, non_utf8_name, reserved_extension,
             oversized_member, undecodable_caption]


@st.composite
def noise(draw: Draw, i: int) -> tuple[Member, ...]:
    """Entries that are no sample: no extension, shard metadata, folders (some too large to read)."""
    choices = [Member(f"README{i}", b"notes"), Member(f"LICENSE{i}", b"b" * (LIMIT + 1)), Member("__index__", b"{}"),
               Member(f"__meta{i}__", b"m"), Member(f"dir{i}", type=tarfile.DIRTYPE)]
    return tuple(draw(st.lists(st.sampled_from(choices), max_size=2)))


@st.composite
def shards(draw: Draw, kinds: Sequence[Callable[[Draw, str], Sample]] = GOOD_KINDS + BAD_KINDS) -> Shard:
    """Up to eight samples of drawn kinds (keys unique, with folder prefixes), noise between them,
    and sometimes a sample that repeats an earlier key after others (an error for the repeat)."""
    n = draw(st.integers(1, 8))
    prefix = draw(st.sampled_from(["", "part/", "a/b/", "./"]))
    samples = [draw(st.sampled_from(kinds))(draw, f"{prefix}s{i:02d}") for i in range(n)]
    if n >= 2 and draw(st.integers(0, 3)) == 0:
        original = samples[draw(st.integers(0, n - 2))]
        ext, data = draw(st.sampled_from(photo_pool()))
        repeat = original.members[0].name.rsplit(".", 1)[0]  # the tar's own spelling of the key
        samples.append(Sample(original.key, (Member(f"{repeat}.{ext}", data),), expect=("adjacent",), stage="read"))
    return Shard(tuple(samples), tuple(draw(noise(i)) for i in range(len(samples) + 1)))


# --- matching what happened with what the model says -----------------------------------------------


def _take_written(written: Counter, sample: Sample, o: Outcome) -> bool:
    if written[sample.key] <= 0:
        return False
    written[sample.key] -= 1
    extras = o.extras(sample.key)
    for ext, value in sample.passthrough.items():
        assert extras.get(ext) == value.decode("utf-8"), (sample.key, ext, extras)
    return True


def _take_error(errors: list[SampleError], sample: Sample) -> bool:
    for i, e in enumerate(errors):
        if e.key == sample.key and not e.reason.startswith(CORRUPT) and \
                any(s in e.reason for s in sample.expect or ()) and sample.stage in (None, e.stage):
            del errors[i]
            return True
    return False


def account(o: Outcome, exact: Sequence[Sample], maybe: Sequence[Sample] = (), *,
            corrupt_keys: set[str] | None = None) -> None:
    """Each `exact` sample is written or errored as its model says; each `maybe` one (next to the
    damage) that or absent; with `corrupt_keys`, exactly one corrupt-tar error under one of them,
    else none. Nothing else may have been written or errored."""
    written = Counter(o.written)
    errors = list(o.errors)
    for s in exact:
        if s.expect is None:
            ok = _take_written(written, s, o)
        else:
            ok = _take_error(errors, s) or (s.may_write and _take_written(written, s, o))
        assert ok, f"sample {s.key!r} ({s.expect or 'written'}) is neither: written {o.written}, errors {o.errors}"
    for s in maybe:
        if s.expect is not None and (_take_error(errors, s) or not s.may_write):
            continue
        _take_written(written, s, o)
    corrupt = [e for e in errors if e.reason.startswith(CORRUPT)]
    if corrupt_keys is None:
        assert not corrupt, corrupt
    else:
        assert len(corrupt) == 1 and corrupt[0].key in corrupt_keys and corrupt[0].stage == "read", \
            (corrupt, corrupt_keys)
        errors.remove(corrupt[0])
    assert not +written and not errors, f"unexplained: written {dict(+written)}, errors {errors}"


# --- the properties ------------------------------------------------------------------------------

DAMAGE = ["none", "pad_zeros", "pad_garbage", "gzip", "bz2", "xz", "truncate", "lying_tail"]


@pytest.mark.timeout(PROPERTY_TIMEOUT)
@examples(150)
@given(shard=shards(), damage=st.sampled_from(DAMAGE), data=st.data())
def test_every_sample_is_written_or_its_error(encoder: Encoder, shard: Shard, damage: str,
                                              data: st.DataObject) -> None:
    """Whole, padded and compressed tars: every sample exactly as modelled. Cut short: the samples
    before the damage exactly, one corrupt-tar error, nothing after. A last header that declares more
    bytes than the file holds (a regular, oversized, unknown-type or FIFO member): every sample, then
    one corrupt-tar error for it, promptly."""
    entries = shard.entries()
    if damage == "lying_tail":
        tail_type = data.draw(st.sampled_from([tarfile.REGTYPE, b"Z", tarfile.FIFOTYPE]), label="tail type")
        declared = data.draw(st.sampled_from([LIMIT // 2, LIMIT + 1, 2**33, 2**40, 2**62]), label="declared")
        entries = entries + [(Member("tail.bin", b"t" * 100, type=tail_type, declared=declared), len(shard.samples))]
    tar, spans = tar_of([m for m, _ in entries], end=damage != "lying_tail")
    suffix = ".tar"
    samples = list(shard.samples)
    if damage == "pad_zeros":
        tar += b"\0" * 512 * data.draw(st.integers(1, 30), label="zero blocks")
    elif damage == "pad_garbage":  # after the end-of-archive marker: never read
        tar += data.draw(st.binary(min_size=1, max_size=2000), label="garbage")
    elif damage in ("gzip", "bz2", "xz"):
        tar = {"gzip": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[damage](tar)
        suffix = {"gzip": ".tar.gz", "bz2": ".tar.bz2", "xz": ".tar.xz"}[damage]
    if damage == "truncate":
        cut = data.draw(st.integers(0, spans[-1][1] + 511 if spans else 511), label="cut at")
        o = encoder.run(tar[:cut], suffix)
        # The entry the cut falls in (or the missing end-of-archive blocks after the last one).
        hit = next((i for i, (start, end) in enumerate(spans) if cut < end), len(entries))
        d = entries[hit][1] if hit < len(entries) else len(samples)
        near = samples[max(0, d - 1): d + 1]
        keys = {s.key for s in near} | ({f"{o.name}:<truncated>"} if d == 0 else set())
        account(o, samples[: max(0, d - 1)], near, corrupt_keys=keys)
    else:
        o = encoder.run(tar, suffix)
        account(o, samples, corrupt_keys={"tail"} if damage == "lying_tail" else None)


@pytest.mark.timeout(PROPERTY_TIMEOUT)
@examples(40)
@given(data=st.one_of(
    st.binary(min_size=1, max_size=3000).filter(lambda b: b[:1] != b"\0"),
    st.sampled_from([b"", b"<html><body>Not Found</body></html>", b"PK\x03\x04" + bytes(range(200)),
                     b"\x1f\x8b\x08\x00" + bytes(range(256)) * 2, b"BZh91AY&SY" + bytes(300),
                     b"\xfd7zXZ\x00" + bytes(range(100)), b"\x28\xb5\x2f\xfd" + bytes(100)]),
    st.sampled_from(photo_pool()).map(lambda p: p[1])))
def test_a_file_that_is_not_a_tar_is_one_read_error(encoder: Encoder, data: bytes) -> None:
    """Random bytes, a web page, a zip, broken gzip/bzip2/xz/zstd streams, a bare JPEG: the shard is
    committed with one read error under `<shard>:<truncated>` (retrying cannot help), never raised."""
    o = encoder.run(data)
    assert o.written == [] and o.result.samples_read == 1
    (err,) = o.errors
    assert (err.key, err.stage) == (f"{o.name}:<truncated>", "read")
    assert err.reason.startswith(f"{CORRUPT} after 0 samples:"), err.reason


@pytest.mark.timeout(PROPERTY_TIMEOUT)
@examples(40)
@given(shard=shards(GOOD_KINDS + BAD_KINDS), cut=st.floats(0.0, 1.0))
def test_a_compressed_tar_cut_short_loses_nothing_silently(encoder: Encoder, shard: Shard, cut: float) -> None:
    """A .tar.gz cut anywhere: whatever is written was modelled as writable, every error is a
    modelled one or the single corrupt-tar error, and the counts reconcile (checked by run)."""
    tar, _ = tar_of([m for m, _ in shard.entries()])
    packed = gzip.compress(tar)
    o = encoder.run(packed[: int(len(packed) * cut)], ".tar.gz")
    writable = {s.key for s in shard.samples if s.expect is None or s.may_write}
    reasons: dict[str, set[str]] = {}
    for s in shard.samples:
        reasons.setdefault(s.key, set()).update(s.expect or ())
    assert set(o.written) <= writable, (o.written, writable)
    corrupt = [e for e in o.errors if e.reason.startswith(CORRUPT)]
    assert len(corrupt) <= 1
    for e in o.errors:
        if e not in corrupt:
            assert any(r in e.reason for r in reasons.get(e.key, ())), e
    unaccounted = {s.key for s in shard.samples} - set(o.written) - {e.key for e in o.errors}
    assert not unaccounted or len(corrupt) == 1, f"samples lost without the corrupt-tar error: {unaccounted}"


# --- defects found by the properties, each as a fixed example -------------------------------------


@pytest.mark.parametrize("members, key, reason", [
    pytest.param([("k.jpg", "photo"), ("k.__key__", b"x")], "k", "reserves", id="reserved-extension"),
    pytest.param([("k.jpg", "photo"), ("k.__URL__", b"x")], "k", "reserves", id="reserved-extension-upper"),
    pytest.param([("k\udcff.jpg", "photo"), ("k\udcff.txt", b"t")], "k\\xff", "b'k\\xff.jpg' is not valid UTF-8",
                 id="non-utf8-name"),
    pytest.param([("../../etc/k.jpg", "photo")], "../../etc/k", "absolute path or has a '..' segment", id="dotdot"),
    pytest.param([("/abs/k.jpg", "photo")], "/abs/k", "absolute path or has a '..' segment", id="absolute"),
    pytest.param([("k.jpg", "photo"), ("k.txt", b"a" * (LIMIT + 1))], "k",
                 f"'k.txt' is {LIMIT + 1} bytes, over the limit max_member_bytes={LIMIT}", id="oversized-caption"),
])
def test_names_and_sizes_the_reader_refuses_are_that_samples_error(encoder: Encoder, members, key: str,
                                                                    reason: str) -> None:
    """Before the fix: `k.__key__` made webdataset raise, so the whole shard failed as a retryable
    ShardReadError; a non-UTF-8 name crashed the Parquet writer (UnicodeEncodeError) at commit; '..'
    and absolute keys went into the cache; an oversized caption was read whole and written."""
    photo = photo_pool()[0][1]
    entries = [Member("before.jpg", photo)] + [Member(n, photo if d == "photo" else d) for n, d in members] + \
              [Member("after.jpg", photo)]
    o = encoder.run(tar_of(entries)[0])
    assert sorted(o.written) == ["after", "before"]
    (err,) = o.errors
    assert (err.key, err.stage) == (key, "read") and reason in err.reason, err


# --- memory and time bounds ----------------------------------------------------------------------


def _stream_tar(path: Path, entries: Sequence[tuple[tarfile.TarInfo, Any]], mode: str = "w") -> None:
    """Write a tar member by member from file objects (a bomb is never whole in memory here either)."""
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as tf:
        for info, fileobj in entries:
            tf.addfile(info, fileobj)


class _Repeat(io.RawIOBase):
    """`size` bytes of one value, read in chunks."""

    def __init__(self, size: int, byte: bytes = b"\0") -> None:
        self.left, self.byte = size, byte

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self.left)
        buf[:n] = self.byte * n
        self.left -= n
        return n


def _info(name: str, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = size, 1_700_000_000
    return info


def _photo_entries(*keys: str) -> list[tuple[tarfile.TarInfo, Any]]:
    photo = photo_pool()[0][1]
    return [(_info(f"{k}.jpg", len(photo)), io.BytesIO(photo)) for k in keys]


def _peak_while(fn: Callable[[], Outcome]) -> tuple[Outcome, int]:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _sparse_entry(name: str, realsize: int) -> bytes:
    """An old-GNU sparse member: one stored byte at the end of a `realsize` hole (a tar bomb:
    1 KB in the file, `realsize` bytes to whoever extracts it)."""
    info = tarfile.TarInfo(name)
    info.size, info.type = 1, tarfile.GNUTYPE_SPARSE
    buf = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    buf[386:398], buf[398:410] = b"%011o\0" % (realsize - 1), b"%011o\0" % 1  # one (offset, numbytes) pair
    buf[482], buf[483:495] = 0, b"%011o\0" % realsize  # not extended; the real size
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf) + b"z" + b"\0" * 511


def _png_bomb(width: int, height: int) -> bytes:
    """A real grayscale PNG of zeros, compressed row by row (about 1000:1): a few hundred KB."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    comp = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("case", ["plain", "gz", "bz2"])
def test_oversized_passthrough_member_is_refused_unread_at_the_default_limit(default_encoder: Encoder,
                                                                             case: str) -> None:
    """A caption of 64 MiB + 1 byte (plain), or of 65 MiB compressed to 64 KB (gzip) or to a few
    hundred bytes (bzip2): that sample's error; the samples around it are written; peak memory
    stays far below it. Before the fix the whole member was read (peak > 64 MiB) and the sample
    written; and skipping it through tarfile's own decompression inflated a whole input block at
    once (gzip: 30 MiB; bzip2: the whole member)."""
    size = DEFAULT_LIMIT + 1 if case == "plain" else DEFAULT_LIMIT + 2**20
    name, path = default_encoder.new_shard(".tar" if case == "plain" else f".tar.{case}")
    entries = _photo_entries("a", "big") + [(_info("big.txt", size), _Repeat(size, b"a"))] + _photo_entries("b")
    _stream_tar(path, entries, "w" if case == "plain" else f"w:{case}")
    o, peak = _peak_while(lambda: default_encoder.process(name, str(path)))
    assert sorted(o.written) == ["a", "b"]
    (err,) = o.errors
    assert err.key == "big" and err.stage == "read"
    assert f"'big.txt' is {size} bytes, over the limit max_member_bytes={DEFAULT_LIMIT}" in err.reason
    assert peak < MEMORY_BOUND, f"peak {peak / 2**20:.0f} MiB"


def test_sparse_member_that_expands_past_the_limit_is_refused(default_encoder: Encoder) -> None:
    """A 2 KB tar whose sparse member expands to 256 MiB: refused from its header. Before the fix
    tarfile materialised every byte of the hole (peak > 256 MiB) and the sample was written."""
    tar = tar_of([Member("a.jpg", photo_pool()[0][1])], end=False)[0] + _sparse_entry("bomb.txt", 4 * DEFAULT_LIMIT) \
        + tar_of([Member("bomb.jpg", photo_pool()[1][1]), Member("b.jpg", photo_pool()[2][1])])[0]
    name, url = default_encoder.write(tar)
    o, peak = _peak_while(lambda: default_encoder.process(name, url))
    assert sorted(o.written) == ["a", "b"]
    (err,) = o.errors
    assert err.key == "bomb" and f"is {4 * DEFAULT_LIMIT} bytes, over the limit" in err.reason
    assert peak < MEMORY_BOUND, f"peak {peak / 2**20:.0f} MiB"


def test_oversized_pax_header_ends_the_shard_as_corrupt_in_bounded_memory(default_encoder: Encoder) -> None:
    """A 32 MiB pax header (tarfile reads those whole, three copies): the samples before it are
    written, then one corrupt-tar error. Before the fix the header was read (peak ~96 MiB)."""
    size = 32 * 2**20
    head = b"%d comment=" % size
    body = head + b"x" * (size - len(head) - 1) + b"\n"
    pax = _info("././@PaxHeader", len(body))
    pax.type = tarfile.XHDTYPE
    name, path = default_encoder.new_shard()
    with open(path, "wb") as f:
        f.write(tar_of([Member("a.jpg", photo_pool()[0][1]), Member("b.jpg", photo_pool()[1][1])], end=False)[0])
        f.write(pax.tobuf(format=tarfile.USTAR_FORMAT) + body + b"\0" * (-len(body) % 512))
        f.write(tar_of([Member("c.jpg", photo_pool()[2][1])])[0])
    o, peak = _peak_while(lambda: default_encoder.process(name, str(path)))
    assert o.written == ["a"]  # b may be missing members: the damage follows it
    (err,) = o.errors
    assert err.key == "b" and err.reason.startswith(f"{CORRUPT} after 1 samples")
    assert f"extended header of {len(body)} bytes" in err.reason
    assert peak < MEMORY_BOUND, f"peak {peak / 2**20:.0f} MiB"


def test_png_bomb_is_refused_from_its_header(default_encoder: Encoder) -> None:
    """A real 20000x20000 PNG of zeros (400 Mpx in ~400 KB) is refused before a pixel is decoded."""
    bomb = _png_bomb(20000, 20000)
    assert len(bomb) < 2**20 and bomb[12:24] == b"IHDR" + (20000).to_bytes(4, "big") * 2
    assert zlib.decompressobj().decompress(bomb[41:], 2**20) == b"\0" * 2**20  # real pixel rows follow
    name, url = default_encoder.write(tar_of([Member("bomb.png", bomb), Member("bomb.txt", b"t"),
                                              Member("a.jpg", photo_pool()[0][1])])[0])
    o, peak = _peak_while(lambda: default_encoder.process(name, url))
    assert o.written == ["a"]
    (err,) = o.errors
    assert err.key == "bomb" and err.stage == "decode" and "400000000 pixels" in err.reason
    assert peak < MEMORY_BOUND, f"peak {peak / 2**20:.0f} MiB"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("member", [Member("z.bin", type=b"Z", declared=2**60), Member("README", declared=2**60),
                                    Member("__meta__", declared=2**60), Member("big.txt", declared=2**60)],
                         ids=["unknown-type", "no-extension", "metadata", "oversized"])
def test_a_header_declaring_more_than_the_file_holds_does_not_hang(encoder: Encoder, member: Member) -> None:
    """tarfile skips a member's data block by block and ignores short reads: before the fix a
    member of an unknown type claiming 2**60 bytes in a 2 KB file spun (for years)."""
    tar = tar_of([Member("a.jpg", photo_pool()[0][1]), Member("b.jpg", photo_pool()[1][1]), member], end=False)[0]
    o = encoder.run(tar)
    # b is written when the member has a key of its own (so b was complete), else it is the error.
    assert o.written == (["a", "b"] if member.name in ("z.bin", "big.txt") else ["a"])
    (err,) = o.errors
    assert err.key == ({"z.bin": "z", "big.txt": "big"}.get(member.name, "b")) and err.stage == "read"
    assert err.reason.startswith(f"{CORRUPT} after") and "ends inside a member" in err.reason, err


def test_a_run_of_extended_headers_is_a_corrupt_tar_not_a_retry(encoder: Encoder) -> None:
    """5000 pax headers in a row make tarfile recurse past the interpreter's limit. Before the fix
    the RecursionError was a ShardReadError (retried, then the job failed); it is the data's fault."""
    record = b"18 comment=xxxxxx\n"
    pax = Member("././@PaxHeader", record, type=tarfile.XHDTYPE)
    tar = tar_of([Member("a.jpg", photo_pool()[0][1]), Member("b.jpg", photo_pool()[1][1])] + [pax] * 5000 +
                 [Member("c.jpg", photo_pool()[2][1])])[0]
    o = encoder.run(tar)
    assert o.written == ["a"]
    (err,) = o.errors
    assert err.key == "b" and err.reason.startswith(f"{CORRUPT} after 1 samples") and "RecursionError" in err.reason


def test_the_reader_takes_a_member_limit_and_checks_it(tmp_path: Path) -> None:
    url = imagedata.write_tar_members(str(tmp_path / "s.tar"), [("a.txt", b"12345"), ("b.txt", b"123456")])
    got = list(iter_shard(url, max_member_bytes=5))
    assert got[0] == {"__key__": "a", "__url__": url, "txt": b"12345"}
    assert isinstance(got[1], SampleError) and "'b.txt' is 6 bytes, over the limit max_member_bytes=5" in got[1].reason
    with pytest.raises(ValueError, match="max_member_bytes=-1 is not allowed"):
        list(iter_shard(url, max_member_bytes=-1))
    with pytest.raises(ConfigError, match="max_member_bytes=0 must be positive"):
        PreprocessConfig(max_member_bytes=0)
    assert DEFAULT_LIMIT == 64 * 2**20 == tar_reader.DEFAULT_MAX_MEMBER_BYTES


def test_the_configured_member_limit_reaches_the_reader(tmp_path: Path) -> None:
    enc = Encoder(tmp_path / "cfg-limit", max_member_bytes=1000)
    try:
        name, url = enc.write(tar_of([Member("a.jpg", photo_pool()[0][1]), Member("a.txt", b"a" * 5000)])[0])
        o = enc.processor.process(ShardTask(name, url))
        assert o.samples_errored == 1
        (error,) = enc.ledger.committed(name).errors
        assert error.key == "a" and "max_member_bytes=1000" in error.reason, error
    finally:
        enc.close()


def test_a_json_member_that_does_not_parse_is_recorded_at_encode(encoder: Encoder) -> None:
    photo = photo_pool()[0][1]
    o = encoder.run(tar_of([Member("a.jpg", photo), Member("a.json", b"{not json"), Member("b.jpg", photo)])[0])
    assert o.written == ["b"]
    (err,) = o.errors
    assert err.key == "a" and "json" in err.reason

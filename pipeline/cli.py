"""The `latentcache` command: parse flags, build the config, call the job. Nothing imports this."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Sequence

from . import __version__
from .config import EncodeConfig, apply_overrides, from_dict, load_yaml

# Flag -> config key; a flag left unset keeps the YAML's (or the default) value.
_ENCODE_FLAGS = {
    "input": "input", "output": "output", "vae": "vae.source", "preset": "vae.preset",
    "dtype": "vae.dtype", "device": "vae.device", "format": "format", "resolution": "preprocess.resolution",
    "buckets": "preprocess.buckets", "flip": "preprocess.flip", "batch_size": "batch_size",
    "actors": "actors", "latent_dtype": "latent_dtype", "overwrite": "overwrite",
}


def encode_config_from_args(args: argparse.Namespace) -> EncodeConfig:
    """YAML file (if any), then flags, then `--set key=value` overrides -> a checked EncodeConfig."""
    data: dict[str, Any] = load_yaml(args.config) if args.config else {}
    flags = {key: getattr(args, flag) for flag, key in _ENCODE_FLAGS.items() if getattr(args, flag) is not None}
    data = apply_overrides(data, flags)
    sets = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value, e.g. --set preprocess.resolution=1024")
        sets[key] = value
    return from_dict(EncodeConfig, apply_overrides(data, sets))


def _cmd_encode(args: argparse.Namespace) -> int:
    from .driver import run_encode

    cfg = encode_config_from_args(args)
    summary = run_encode(cfg, ray_address=args.address, progress=not args.no_progress)
    print(f"done: {summary.samples_written} latents written, {summary.samples_errored} samples errored, "
          f"{summary.processed_shards} shard(s) encoded and {summary.skipped_shards} already committed, "
          f"{summary.steady_images_per_second:.1f} img/s once the VAE was loaded "
          f"({summary.images_per_second:.1f} img/s overall) -> {summary.output}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from .status import format_status

    print(format_status(args.output, storage_options=None))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.workdir, preset=args.preset, resolution=args.resolution, actors=args.actors)
    return 0


def _add_encode_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", help="tar shard URLs: braces {000..009}, globs, or folders")
    p.add_argument("--output", help="output folder (local path or fsspec URL)")
    p.add_argument("--vae", help="weights: file, URL, diffusers folder, HF repo id, or random:PRESET")
    p.add_argument("--preset", help="VAE family: sd15, sdxl, sd3, flux, tiny (sets scaling)")
    p.add_argument("--format", choices=["parquet", "safetensors"])
    p.add_argument("--resolution", type=int)
    p.add_argument("--buckets", action="store_const", const=True, help="aspect-ratio buckets")
    p.add_argument("--flip", action="store_const", const=True, help="also store latents of flipped images")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], help="compute precision")
    p.add_argument("--device", help="auto, cpu, cuda")
    p.add_argument("--latent-dtype", choices=["float16", "float32"], help="storage precision")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--actors", type=int, help="number of actors (default: one per GPU, else 1 on CPU)")
    p.add_argument("--overwrite", action="store_const", const=True,
                   help="replace an output made with another VAE or preprocessing")
    p.add_argument("--config", help="YAML file whose keys are EncodeConfig's fields")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any config field, e.g. retry.max_attempts=5 (repeatable)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentcache",
        description="Precompute Stable Diffusion VAE latents for WebDataset image shards, on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"latentcache {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    enc = sub.add_parser("encode", help="encode image shards into latent shards (resumable)")
    _add_encode_flags(enc)
    enc.set_defaults(func=_cmd_encode)

    st = sub.add_parser("status", help="progress of a job, read from its output folder")
    st.add_argument("output", help="the job's output folder (local path or URL)")
    st.set_defaults(func=_cmd_status)

    demo = sub.add_parser("demo", help="build shards from bundled real photos and encode them on a local Ray")
    demo.add_argument("--workdir", default="latentcache-demo", help="folder for the demo's shards and output")
    demo.add_argument("--preset", default="sd15", help="random-weights VAE preset to use")
    demo.add_argument("--resolution", type=int, default=256)
    demo.add_argument("--actors", type=int, default=2)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from vae import WeightsError

    from .config import ConfigError
    from .driver import JobError
    from .ledger import LedgerError
    from .shards import DuplicateShardNameError, ShardListingError

    try:
        return args.func(args)
    except (ConfigError, JobError, LedgerError, ShardListingError, DuplicateShardNameError, WeightsError) as e:
        # Errors about the user's inputs: the message names the thing; a traceback adds nothing.
        print(f"latentcache: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

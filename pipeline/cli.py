"""The `latentcache` command: parse flags, build the config, call the job. Nothing imports this."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Sequence

from . import __version__
from .config import RunConfig, apply_overrides, from_dict, load_yaml

# Flags every job kind has -> config key; a flag left unset keeps the YAML's (or the default) value.
_RUN_FLAGS = {"input": "input", "output": "output", "actors": "actors", "overwrite": "overwrite",
              "break_lock": "break_lock", "recheck": "recheck"}


def config_from_args(kind: Any, args: argparse.Namespace) -> RunConfig:
    """YAML file (if any), then flags, then `--set key=value` overrides -> the kind's checked config."""
    data: dict[str, Any] = load_yaml(args.config) if args.config else {}
    table = {**_RUN_FLAGS, **kind.flags}
    flags = {key: getattr(args, flag) for flag, key in table.items() if getattr(args, flag, None) is not None}
    data = apply_overrides(data, flags)
    sets = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value, e.g. --set preprocess.resolution=1024")
        sets[key] = value
    return from_dict(kind.config_type, apply_overrides(data, sets))


def _add_run_flags(p: argparse.ArgumentParser, kind: Any) -> None:
    p.add_argument("--input", nargs="+", help=kind.input_help)
    p.add_argument("--output", help="output folder (local path or fsspec URL)")
    p.add_argument("--actors", type=int, help="number of actors (default: one per GPU, else 1 on CPU)")
    p.add_argument("--overwrite", action="store_const", const=True,
                   help="replace an output made by another job (another VAE, preprocessing, format)")
    p.add_argument("--break-lock", action="store_const", const=True,
                   help="take over the output's lock from a driver that is gone but whose heartbeat is still fresh")
    p.add_argument("--recheck", action="store_const", const=True,
                   help="hash every committed shard against its record first, and redo those whose bytes changed "
                        "(a rerun otherwise checks sizes only)")
    p.add_argument("--config", help=f"YAML file whose keys are {kind.config_type.__name__}'s fields")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any config field, e.g. retry.max_attempts=5 (repeatable)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _cmd_job(args: argparse.Namespace) -> int:
    from .core.runner import run_job

    cfg = config_from_args(args.kind, args)
    s = run_job(args.kind, cfg, ray_address=args.address, progress=not args.no_progress)
    extra = args.kind.describe_summary(s.counters)
    if s.result.get("report"):
        print(f"report: {s.result['report']}")
    print(f"done: {s.samples_written} samples written, {s.samples_errored} errored, "
          f"{s.processed_shards} shard(s) processed and {s.skipped_shards} already committed, "
          f"{s.steady_images_per_second:.1f} img/s once the model was loaded "
          f"({s.images_per_second:.1f} img/s overall){'; ' + extra if extra else ''} -> {s.output}")
    failed = args.kind.verdict(cfg, s)
    if failed:
        print(f"latentcache: {args.kind.name} gate failed: {failed}", file=sys.stderr)
        return 3
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from .status import format_status

    print(format_status(args.output, storage_options=None))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    import json

    from .io.shards import DuplicateShardNameError, ShardListingError
    from .verify import NoJobError, format_report, verify_output

    if args.workers < 1:
        print(f"latentcache: verify: --workers {args.workers}: expected at least 1", file=sys.stderr)
        return 2
    try:
        report = verify_output(args.url, source=args.source, checksums=args.checksums, workers=args.workers)
    except (NoJobError, ShardListingError, DuplicateShardNameError) as e:
        # Nothing to verify against, or a --source that lists nothing: a usage error.
        print(f"latentcache: verify: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=1) if args.json else format_report(report))
    return 0 if report.ok else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.workdir, vae=args.vae, resolution=args.resolution, actors=args.actors)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .jobs import kinds

    parser = argparse.ArgumentParser(
        prog="latentcache",
        description="Precompute Stable Diffusion VAE latents for WebDataset image shards on Ray, and decode "
                    "them back.",
    )
    parser.add_argument("--version", action="version", version=f"latentcache {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for kind in kinds():
        p = sub.add_parser(kind.name, help=kind.help)
        kind.add_arguments(p)
        _add_run_flags(p, kind)
        p.set_defaults(func=_cmd_job, kind=kind)

    st = sub.add_parser("status", help="progress of a job, read from its output folder")
    st.add_argument("output", help="the job's output folder (local path or URL)")
    st.set_defaults(func=_cmd_status)

    vf = sub.add_parser("verify", help="check an output folder against its records; exit 1 on any violation")
    vf.add_argument("url", help="the job's output folder (local path or URL)")
    vf.add_argument("--source", nargs="+", metavar="URLS",
                    help="input shards whose every key must be written or recorded as an error")
    vf.add_argument("--checksums", action="store_true", help="also compare each data file's sha256 (reads it all)")
    vf.add_argument("--json", action="store_true", help="print the report as JSON")
    vf.add_argument("--workers", type=int, default=8, help="shards checked at once (default: 8)")
    vf.set_defaults(func=_cmd_verify)

    demo = sub.add_parser("demo", help="build shards from bundled real photos, encode them on a local Ray, "
                                       "decode them back, and audit the round trip (report.html)")
    demo.add_argument("--workdir", default="latentcache-demo", help="folder for the demo's shards and outputs")
    demo.add_argument("--vae", default="builtin:tiny-demo",
                      help="VAE source (default: the tiny VAE trained on the bundled photos; random:sd15 for "
                           "a random-weights SD VAE)")
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
    from .core.kind import PlanError
    from .core.runner import JobError
    from .core.ledger import LedgerError
    from .core.lock import LockError
    from .io.tar_reader import ShardReadError
    from .io.shards import DuplicateShardNameError, ShardListingError

    try:
        return args.func(args)
    except (ConfigError, JobError, PlanError, LedgerError, ShardListingError, DuplicateShardNameError,
            ShardReadError, WeightsError, LockError) as e:
        # Errors about the user's inputs: the message names the thing; a traceback adds nothing.
        print(f"latentcache: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

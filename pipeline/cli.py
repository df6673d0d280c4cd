"""The `latentcache` command: parse flags, build the config, call the job. Nothing imports this."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Sequence

from . import __version__
from .config import RunConfig, apply_overrides, from_dict, load_yaml, parse_sets
from .jobs import KIND_NAMES

# Flags every job kind has -> config key; a flag left unset keeps the YAML's (or the default) value.
_RUN_FLAGS = {"input": "input", "output": "output", "actors": "actors", "overwrite": "overwrite",
              "break_lock": "break_lock", "recheck": "recheck"}


def config_from_args(kind: Any, args: argparse.Namespace) -> RunConfig:
    """YAML file (if any), then flags, then `--set key=value` overrides -> the kind's checked config."""
    data: dict[str, Any] = load_yaml(args.config) if args.config else {}
    table = {**_RUN_FLAGS, **kind.flags}
    flags = {key: getattr(args, flag) for flag, key in table.items() if getattr(args, flag, None) is not None}
    data = apply_overrides(data, flags)
    return from_dict(kind.config_type, apply_overrides(data, parse_sets(args.set)))


_EXAMPLES = {
    "encode": ["latentcache encode --input 'shards/train-{000000..000099}.tar' --output latents/ --config demo-tiny",
               "latentcache encode --config sd15-512 --input 's3://bucket/train-*.tar' --output s3://bucket/latents "
               "--set batch_size=32"],
    "decode": ["latentcache decode --input latents/ --output decoded/",
               "latentcache decode --input s3://bucket/latents --output s3://bucket/decoded --set image_format=jpg"],
    "audit": ["latentcache audit --input latents/ --output audit/ --samples 256",
              "latentcache audit --input s3://bucket/latents --output s3://bucket/audit --set fail_under_psnr=24"],
    "run": ["latentcache run jobs/encode.yaml --set output=latents/",
            "latentcache run jobs/audit.yaml --address auto"],
    "submit": ["latentcache submit jobs/encode.yaml --address http://head:8265 --follow",
               "RAY_ADDRESS=http://head:8265 latentcache submit jobs/decode.yaml --set resources.max_actors=8"],
    "status": ["latentcache status latents/", "latentcache status s3://bucket/latents --json | jq .state"],
    "verify": ["latentcache verify latents/ --source 'shards/*.tar'", "latentcache verify s3://bucket/latents --checksums"],
}


def _examples(command: str) -> str:
    lines = _EXAMPLES.get(command)
    return ("\n\nexamples:\n" + "\n".join(f"  {line}" for line in lines)) if lines else ""


def _with_defaults(p: argparse.ArgumentParser, kind: Any) -> None:
    """Each flag that sets a config field says that field's default (flags default to unset, so
    that a YAML file's value is kept)."""
    from .config import config_default

    table = {**_RUN_FLAGS, **kind.flags}
    for action in p._actions:
        key = table.get(action.dest)
        if key is None or action.help == argparse.SUPPRESS or "default" in (action.help or ""):
            continue
        default = config_default(kind.config_type, key)
        if default is None or default in ((), "", False):
            continue
        action.help = f"{action.help} (default: {default})" if action.help else f"default: {default}"


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
    _add_progress_flags(p)


def _add_progress_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar on a terminal (the plain progress lines of a non-terminal remain)")
    p.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                   help="seconds between plain progress lines when stderr is not a terminal (default: 30)")


def _cmd_job(args: argparse.Namespace) -> int:
    return _run(args.kind, config_from_args(args.kind, args), args)


def _run(kind: Any, cfg: RunConfig, args: argparse.Namespace) -> int:
    from .core.runner import run_job

    s = run_job(kind, cfg, ray_address=args.address, progress=not args.no_progress,
                progress_every_s=args.progress_every)
    extra = kind.describe_summary(s.counters)
    if s.result.get("report"):
        print(f"report: {s.result['report']}")
    if s.processed_shards == 0 and s.skipped_shards == s.total_shards and s.total_shards:
        print(f"complete: {s.output} holds this {kind.name} job finished ({s.total_shards} shards); nothing to do")
    else:
        print(f"done: {s.samples_written} samples written, {s.samples_errored} errored, "
              f"{s.processed_shards} shard(s) processed and {s.skipped_shards} already committed, "
              f"{s.steady_images_per_second:.1f} img/s once the model was loaded "
              f"({s.images_per_second:.1f} img/s overall){'; ' + extra if extra else ''} -> {s.output}")
    failed = kind.verdict(cfg, s)
    if failed:
        print(f"latentcache: {kind.name} gate failed: {failed}", file=sys.stderr)
        return 3
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import json
    import os

    from .config import ConfigError
    from .jobs import get_kind
    from .spec import load_spec, spec_from_dict

    sets = parse_sets(args.set)
    if args.spec_env:
        text = os.environ.get(args.spec_env)
        if not text:
            raise ConfigError(f"--spec-env {args.spec_env}: that environment variable is not set")
        spec = spec_from_dict(json.loads(text), sets, source=f"${args.spec_env}")
    elif args.spec:
        spec = load_spec(args.spec, sets)
    else:
        raise ConfigError("run: expected a job spec file, e.g. latentcache run jobs/encode.yaml")
    return _run(get_kind(spec.kind), spec.config, args)


def _quiet_ray_client(verbose: bool) -> None:
    """Ray's client logs each packaging step and a warning per default-excluded folder at INFO and
    WARNING; a person submitting a job needs its id and its logs."""
    if not verbose:
        logging.getLogger("ray").setLevel(logging.ERROR)


def _cmd_submit(args: argparse.Namespace) -> int:
    import os

    from .cluster import build_submission, connect, submit
    from .config import ConfigError
    from .spec import load_spec

    _quiet_ray_client(args.verbose)

    spec = load_spec(args.spec, parse_sets(args.set))  # a typo fails here, not on the cluster
    env = {}
    for item in args.env or []:
        name, sep, value = item.partition("=")
        if not sep:
            if name not in os.environ:
                raise ConfigError(f"--env {name}: not set in this shell; give NAME=VALUE or export it")
            value = os.environ[name]
        env[name] = value
    submission = build_submission(spec, working_dir=args.working_dir, pip=args.pip or (), env=env)
    for url in (*spec.config.input, spec.config.output):
        if "://" not in url:
            print(f"note: {url} is a local path: the cluster's nodes must see it at that path", file=sys.stderr)
    client = connect(args.address)
    job_id = submit(client, submission)
    print(f"submitted {spec.kind} job {job_id} to {client.get_address()}")
    if not args.follow:
        print(f"follow it: latentcache jobs logs {job_id} --follow; stop it: latentcache jobs stop {job_id}")
        return 0
    return _follow(client, job_id)


def _follow(client: Any, job_id: str) -> int:
    """Stream a job's logs until it ends; 0 only when it succeeded."""
    from .cluster import failure_reason, follow_logs, status_name, wait_until_done

    try:
        follow_logs(client, job_id, sys.stdout)
        info = wait_until_done(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on. latentcache jobs logs {job_id} --follow / "
              f"latentcache jobs stop {job_id}", file=sys.stderr)
        return 130
    status = status_name(info)
    if status == "SUCCEEDED":
        print(f"job {job_id} succeeded")
        return 0
    print(f"latentcache: job {job_id} {status.lower()}: {failure_reason(client, job_id, info)}", file=sys.stderr)
    return 1


def _cmd_jobs(args: argparse.Namespace) -> int:
    from .cluster import connect, format_rows, job_info, list_rows, status_name

    _quiet_ray_client(args.verbose)
    client = connect(args.address)
    if args.action == "list":
        print(format_rows(list_rows(client)))
        return 0
    if args.action == "status":
        info = job_info(client, args.id)
        meta = info.metadata or {}
        print(f"{args.id}: {status_name(info)}")
        for label, value in (("job", meta.get("job")), ("output", meta.get("output")), ("spec", meta.get("spec")),
                             ("message", " ".join((info.message or "").split()))):
            if value:
                print(f"  {label}: {value}")
        return 1 if status_name(info) in ("FAILED", "STOPPED") else 0
    if args.action == "logs":
        if args.follow:
            return _follow(client, args.id)
        job_info(client, args.id)  # an unknown id is one clear line
        print(client.get_job_logs(args.id), end="")
        return 0
    job_info(client, args.id)
    stopped = client.stop_job(args.id)
    print(f"{args.id}: {'stop requested' if stopped else 'had already ended'}; submitting the same spec again "
          "resumes it (committed shards are kept)")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    from .status import EXIT_CODES, format_status, job_status

    status = job_status(args.output, storage_options=None)
    print(json.dumps(status, indent=1) if args.json else format_status(status))
    return EXIT_CODES[status["state"]]


def _cmd_configs(args: argparse.Namespace) -> int:
    from .config import shipped_configs

    for name, path in shipped_configs().items():
        first = next((line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        print(f"{name:24s} {first}")
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


# The top level's switches (options that take no value), for the parser and for `_bare_kinds`.
_TOP_LEVEL_SWITCHES = {("-v", "--verbose"): "debug logging", ("--debug",): "show the traceback of an error"}


def _bare_kinds(argv: Sequence[str]) -> bool:
    """Whether parsing `argv` can do with the job kinds' bare names: a command other than a kind,
    or `--version`. Top-level help (and no command at all) lists the kinds with their help, and so
    does any other option before the command (`-vh`, `--he`: argparse reads those as help)."""
    for word in argv:
        if word == "--version":
            return True
        if any(word in flags for flags in _TOP_LEVEL_SWITCHES):
            continue
        return not word.startswith("-") and word not in KIND_NAMES
    return False


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; given the `argv` it will parse, a command other than a job kind gets the
    kinds as bare names, so that `status`, `verify`, `configs` and their `--help` do not import
    torch and the VAE (2-3 s of a command that otherwise takes half a second)."""
    from .jobs import kinds

    parser = argparse.ArgumentParser(
        prog="latentcache",
        description="Precompute Stable Diffusion VAE latents for WebDataset image shards on Ray, and decode "
                    "them back.",
    )
    parser.add_argument("--version", action="version", version=f"latentcache {__version__}")
    for flags, text in _TOP_LEVEL_SWITCHES.items():
        parser.add_argument(*flags, action="store_true", help=text)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    bare = argv is not None and _bare_kinds(argv)
    for name in KIND_NAMES if bare else ():
        sub.add_parser(name)
    for kind in () if bare else kinds():
        p = sub.add_parser(kind.name, help=kind.help, epilog=_examples(kind.name).lstrip("\n"),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        kind.add_arguments(p)
        _add_run_flags(p, kind)
        _with_defaults(p, kind)
        p.set_defaults(func=_cmd_job, kind=kind)

    rn = sub.add_parser("run", epilog=_examples("run").lstrip("\n"),
                        formatter_class=argparse.RawDescriptionHelpFormatter, help="run a job spec (a config YAML with `job: encode | decode | audit`) here, "
                                    "or on the Ray cluster this machine belongs to (--address auto)")
    rn.add_argument("spec", nargs="?", help="the job spec file, e.g. jobs/encode.yaml")
    rn.add_argument("--spec-env", help=argparse.SUPPRESS)  # what `submit` runs on the cluster
    rn.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any spec field (repeatable)")
    rn.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    _add_progress_flags(rn)
    rn.set_defaults(func=_cmd_run)

    sb = sub.add_parser("submit", epilog=_examples("submit").lstrip("\n"),
                        formatter_class=argparse.RawDescriptionHelpFormatter, help="check a job spec here and run it on a Ray cluster (Ray's job API)")
    sb.add_argument("spec", help="the job spec file, e.g. jobs/encode.yaml")
    sb.add_argument("--address", default=None,
                    help="the cluster's dashboard, e.g. http://HEAD:8265 (default: RAY_ADDRESS)")
    sb.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any spec field (repeatable)")
    sb.add_argument("--follow", action="store_true", help="stream the job's logs; exit 0 only if it succeeds")
    sb.add_argument("--working-dir", help="the latentcache checkout to ship (default: this one, when it runs "
                                          "from a checkout; else latentcache==VERSION from pip)")
    sb.add_argument("--pip", action="append", metavar="REQUIREMENT",
                    help="install these on the cluster instead of shipping a checkout (repeatable)")
    sb.add_argument("--env", action="append", metavar="NAME[=VALUE]",
                    help="an environment value for the job (never a credential; repeatable). AWS_ENDPOINT_URL "
                         "and AWS_REGION travel when set")
    sb.set_defaults(func=_cmd_submit)

    jb = sub.add_parser("jobs", help="the jobs of a Ray cluster: list, status ID, logs ID [--follow], stop ID")
    jsub = jb.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, text in (("list", "every job the cluster knows, newest first"), ("status", "one job's status"),
                         ("logs", "one job's logs"), ("stop", "stop a job (a later submit resumes it)")):
        a = jsub.add_parser(action, help=text)
        if action != "list":
            a.add_argument("id", help="the job's submission id (`latentcache jobs list`)")
        if action == "logs":
            a.add_argument("--follow", action="store_true", help="stream until the job ends; exit 0 only if it "
                                                                 "succeeded")
        a.add_argument("--address", default=None, help="the cluster's dashboard (default: RAY_ADDRESS)")
        a.set_defaults(func=_cmd_jobs)

    st = sub.add_parser("status", help="state and progress of a job, read from its output folder",
                        epilog="exit status: 0 complete or running, 1 failed, 2 no job in that folder, 3 stopped "
                               "(a rerun resumes it)" + _examples("status"),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    st.add_argument("output", help="the job's output folder (local path or URL)")
    st.add_argument("--json", action="store_true", help="print the status as JSON (for scripts)")
    st.set_defaults(func=_cmd_status)

    cf = sub.add_parser("configs", help="the configs shipped with latentcache (`--config NAME` takes one by name)")
    cf.set_defaults(func=_cmd_configs)

    vf = sub.add_parser("verify", epilog=_examples("verify").lstrip("\n"),
                        formatter_class=argparse.RawDescriptionHelpFormatter, help="check an output folder against its records; exit 1 on any violation")
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


# The errors a command turns into one line, as (module, class): a usage error exits 2, a failed job 1.
_USAGE_ERRORS = (("pipeline.config", "ConfigError"), ("pipeline.core.preflight", "PreflightError"),
                 ("pipeline.core.kind", "PlanError"), ("pipeline.io.shards", "ShardListingError"),
                 ("pipeline.io.shards", "DuplicateShardNameError"), ("vae.weights", "WeightsError"),
                 ("pipeline.core.ledger", "IncompatibleOutputError"), ("pipeline.cluster", "ClusterError"))
_FAILED_ERRORS = (("pipeline.core.runner", "JobError"), ("pipeline.core.ledger", "LedgerError"),
                  ("pipeline.io.tar_reader", "ShardReadError"), ("pipeline.core.lock", "LockError"))


def _loaded(errors: Sequence[tuple[str, str]]) -> tuple[type[BaseException], ...]:
    """The classes of `errors` whose module is imported. A module that was never imported raised
    nothing, and importing it to find out would cost `status` the 2-3 s of torch."""
    return tuple(getattr(sys.modules[module], name) for module, name in errors if module in sys.modules)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: the same clean stop (exit status 143)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    """The command. Exit status: 0 done, 1 the job failed, 2 a usage or config error, 3 a gate
    (audit) failed, 130 interrupted (143 on SIGTERM); `status` documents its own."""
    import os
    import signal
    import threading

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no colour codes in a log file
    if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.func(args)
    except (*_loaded(_USAGE_ERRORS), *_loaded(_FAILED_ERRORS)) as e:  # evaluated once an error is here
        # Errors about the user's inputs: the message names the thing; a traceback adds nothing.
        if args.debug:
            raise
        print(f"latentcache: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, _loaded(_USAGE_ERRORS)) else 1
    except Exception as e:  # noqa: BLE001 - only credential errors are turned into a line; the rest re-raise
        if args.debug or type(e).__name__ not in ("NoCredentialsError", "PartialCredentialsError"):
            raise
        print(f"latentcache: error: object storage: {e}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or "
              "AWS_PROFILE, use an instance role, or set storage_options", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if args.debug:
            raise
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        resume = ("; shards in flight were abandoned (none is half written), committed shards are kept: run the "
                  "same command again to resume") if getattr(args, "kind", None) or args.func is _cmd_run else ""
        print(f"\nlatentcache: {what}{resume}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())

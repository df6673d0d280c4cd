"""Our VAE codec against diffusers' AutoencoderKL: same weights, same input, one process, alternating.

For each dtype, four variants run on the same input, timed alternately (medians):

    diffusers         diffusers.AutoencoderKL as it comes: eager, contiguous (NCHW), torch.no_grad
    ours              our codec, eager (channels_last, inference_mode)
    ours+compile      our codec with compile=True
    diffusers+compile diffusers with torch.compile on its encoder and decoder (default options)

and the table gives images/s and the ratio to `diffusers` in the same dtype. Warm-up (the first
call, which includes compiling) is excluded from the timings and reported on its own. Both models
get the random sd15-architecture weights from one safetensors file.

--glibc-tunables runs the whole comparison twice, each in a fresh child process: once with glibc's
default malloc settings and once with GLIBC_TUNABLES set (glibc reads it only at process start), and
prints both side by side. By default glibc serves allocations of 32 MiB and more (one activation of
SD's first level at 256 px in float32) with mmap and unmaps them on free, so every such temporary
is page-faulted in again on first touch.

    python bench/bench_codec.py                              # CPU, float32 + bfloat16, batch 1, 256 px
    python bench/bench_codec.py --glibc-tunables             # ... with and without the malloc settings
    python bench/bench_codec.py --device cuda --size 512 --batch 8 --dtypes bfloat16 --ref-dtype float16
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae import get_preset, load_vae  # noqa: E402
from vae.codec import resolve_dtype  # noqa: E402

VARIANTS = ("diffusers", "ours", "ours+compile", "diffusers+compile")
BASELINE = "diffusers"
# Serve every allocation below 4 GiB from the heap and never give the heap's top back: freed
# activations are reused instead of being unmapped and page-faulted in again on the next op.
DEFAULT_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


class _Runner:
    """Runs calls on the calling thread, or on one worker thread (as a threaded Ray actor does:
    glibc gives such threads their own arenas, which keep mmapping large blocks)."""

    def __init__(self, in_thread: bool) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1) if in_thread else None

    def __call__(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        return fn() if self._pool is None else self._pool.submit(fn).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def _timed(run: _Runner, fn: Callable[[], torch.Tensor], device: str) -> tuple[float, float, torch.Tensor]:
    """Wall seconds, this process's CPU seconds (all threads, user + system) and the output of `fn`.

    CPU time is the cross-check on a shared machine: other processes stretch the wall time (an
    OpenMP step waits for its slowest thread) but hardly the CPU time of the work itself.
    """
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = run(fn)
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, out


def _variants(args: argparse.Namespace, dtype: str, weights: Path, ref_fp32: torch.nn.Module,
              wanted: list[str]) -> dict[str, dict[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """Each wanted variant's encode (images -> posterior mean) and decode (latents -> images)."""
    ref_dtype = resolve_dtype(args.ref_dtype or dtype)
    out: dict[str, dict[str, Callable[[torch.Tensor], torch.Tensor]]] = {}
    for name in wanted:
        if name.startswith("ours"):
            codec = load_vae(str(weights), preset=args.preset, device=args.device, dtype=dtype, tile_size=None,
                             compile=name.endswith("+compile"))
            out[name] = {"encode": lambda x, c=codec: c.encode(x).mean,
                         "decode": lambda z, c=codec: c.decode(z)}
            continue
        ref = copy.deepcopy(ref_fp32).to(args.device, ref_dtype)
        if name.endswith("+compile"):
            ref.encoder = torch.compile(ref.encoder)
            ref.decoder = torch.compile(ref.decoder)

        def encode(x: torch.Tensor, r: torch.nn.Module = ref, dt: torch.dtype = ref_dtype) -> torch.Tensor:
            with torch.no_grad():
                return r.encode(x.to(dt)).latent_dist.mean.float()

        def decode(z: torch.Tensor, r: torch.nn.Module = ref, dt: torch.dtype = ref_dtype) -> torch.Tensor:
            with torch.no_grad():
                return r.decode(z.to(dt)).sample.float()

        out[name] = {"encode": encode, "decode": decode}
    return out


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows of the table for this process's environment: one per direction, dtype and variant."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from safetensors.torch import save_file

    preset = get_preset(args.preset)
    torch.manual_seed(0)
    ref_fp32 = DiffusersVAE(**preset.diffusers_config()).eval()
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(args.batch, 3, args.size, args.size, generator=g) * 2 - 1).to(args.device)
    lat = args.size // 8
    z = torch.randn(args.batch, preset.arch.latent_channels, lat, lat, generator=g).to(args.device)
    inputs = {"encode": x, "decode": z}
    wanted = [v for v in VARIANTS if v in args.variants]
    run = _Runner(args.in_thread)
    rows: list[dict[str, Any]] = []
    first_dtype_out: dict[str, torch.Tensor] = {}  # the baseline's output in the first dtype
    with tempfile.TemporaryDirectory() as tmp, contextlib.closing(run):
        weights = Path(tmp) / "bench_weights.safetensors"
        save_file({k: v.contiguous() for k, v in ref_fp32.state_dict().items()}, str(weights))
        for dtype in args.dtypes:
            fns = _variants(args, dtype, weights, ref_fp32, wanted)
            calls: dict[str, Callable[[], torch.Tensor]] = {}
            for direction in args.directions:
                calls = {name: (lambda f=fns[name][direction], t=inputs[direction]: f(t)) for name in wanted}
                warm: dict[str, float] = {}
                outs: dict[str, torch.Tensor] = {}
                for name in wanted:
                    print(f"[{dtype} {direction}] warm-up {name} ...", file=sys.stderr, flush=True)
                    warm[name], _, outs[name] = _timed(run, calls[name], args.device)
                times: dict[str, list[float]] = {name: [] for name in wanted}
                cpu: dict[str, list[float]] = {name: [] for name in wanted}
                for _ in range(args.repeats):  # alternate so drift on a shared machine hits all alike
                    for name in wanted:
                        wall_s, cpu_s, _ = _timed(run, calls[name], args.device)
                        times[name].append(wall_s)
                        cpu[name].append(cpu_s)
                base = outs.get(BASELINE, outs[wanted[0]])
                first_dtype_out.setdefault(direction, base)
                ips = {name: args.batch / statistics.median(t) for name, t in times.items()}
                cpu_per_img = {name: statistics.median(t) / args.batch for name, t in cpu.items()}
                for name in wanted:
                    rows.append({
                        "direction": direction, "dtype": dtype, "variant": name, "img_s": ips[name],
                        "ratio": ips[name] / ips[BASELINE] if BASELINE in ips else None,
                        "cpu_s_per_img": cpu_per_img[name],
                        "cpu_ratio": cpu_per_img[BASELINE] / cpu_per_img[name] if BASELINE in ips else None,
                        "warmup_s": warm[name], "times_s": times[name], "cpu_s": cpu[name],
                        # agreement: with the baseline in this dtype, and with the first dtype's baseline
                        "rel_err_vs_baseline": _rel_err(outs[name], base),
                        f"rel_err_vs_{args.dtypes[0]}": _rel_err(outs[name], first_dtype_out[direction]),
                    })
                print(f"[{dtype} {direction}] " + "  ".join(f"{n} {ips[n]:.3f} img/s" for n in wanted),
                      file=sys.stderr, flush=True)
            del fns, calls  # free this dtype's models before building the next dtype's
    return rows


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def print_table(rows: list[dict[str, Any]], tuned: list[dict[str, Any]] | None, tunables: str | None) -> None:
    """A markdown table; with `tuned`, the same rows measured under GLIBC_TUNABLES, side by side."""
    if tuned is None:
        print("| direction | dtype | variant | img/s | vs diffusers (same dtype) | CPU s/img | vs diffusers "
              "(CPU time) | warm-up s | rel. err vs diffusers |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['direction']} | {r['dtype']} | {r['variant']} | {r['img_s']:.3f} | "
                  f"{_fmt(r['ratio'], '.2f')} | {r['cpu_s_per_img']:.2f} | {_fmt(r['cpu_ratio'], '.2f')} | "
                  f"{r['warmup_s']:.1f} | {r['rel_err_vs_baseline']:.1e} |")
        return
    base = {(r["direction"], r["dtype"]): r["img_s"] for r in rows if r["variant"] == BASELINE}
    print(f"GLIBC_TUNABLES={tunables}")
    print("| direction | dtype | variant | img/s, default malloc | vs diffusers | vs diffusers (CPU time) | "
          "img/s, tuned malloc | vs diffusers, both tuned | vs diffusers, both tuned (CPU time) | "
          "vs diffusers with default malloc | tuned / default | tuned / default (CPU time) | "
          "warm-up s (default, tuned) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r, t in zip(rows, tuned):
        assert (r["direction"], r["dtype"], r["variant"]) == (t["direction"], t["dtype"], t["variant"])
        b = base.get((r["direction"], r["dtype"]))
        print(f"| {r['direction']} | {r['dtype']} | {r['variant']} | {r['img_s']:.3f} | {_fmt(r['ratio'], '.2f')} | "
              f"{_fmt(r['cpu_ratio'], '.2f')} | {t['img_s']:.3f} | {_fmt(t['ratio'], '.2f')} | "
              f"{_fmt(t['cpu_ratio'], '.2f')} | {_fmt(t['img_s'] / b if b else None, '.2f')} | "
              f"{t['img_s'] / r['img_s']:.2f} | {r['cpu_s_per_img'] / t['cpu_s_per_img']:.2f} | "
              f"{r['warmup_s']:.1f}, {t['warmup_s']:.1f} |")


def _child(argv: list[str], tunables: str | None) -> list[dict[str, Any]]:
    """Run this benchmark in a fresh process with GLIBC_TUNABLES set to `tunables` (None: unset)."""
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        print(f"--- child process, GLIBC_TUNABLES={tunables or '(unset)'}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, __file__, *argv, "--rows-json", str(out)], env=env, check=True)
        return json.loads(out.read_text())


def _strip_tunables_flag(argv: list[str]) -> list[str]:
    """argv without --glibc-tunables and its value, for the child processes."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--glibc-tunables":
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            continue
        if a.startswith("--glibc-tunables="):
            continue
        out.append(a)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="sd15")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated; our codec's dtypes")
    ap.add_argument("--ref-dtype", default=None, help="diffusers' dtype (default: the same as ours in each row)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    ap.add_argument("--directions", default="encode,decode")
    # 1 x 256 px keeps the whole table (8 compiles included) near 6 minutes on 2 quiet cores; one
    # float32 activation of the first level is still 32 MiB, the size glibc starts to mmap.
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--in-thread", action="store_true",
                    help="run every call on a worker thread, as a Ray actor with max_concurrency > 1 does")
    ap.add_argument("--glibc-tunables", nargs="?", const=DEFAULT_TUNABLES, default=None, metavar="TUNABLES",
                    help=f"run once with default malloc and once with GLIBC_TUNABLES=TUNABLES, each in a "
                         f"child process (default TUNABLES: {DEFAULT_TUNABLES})")
    ap.add_argument("--rows-json", default=None, help=argparse.SUPPRESS)  # a child's rows go here
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    args.dtypes = args.dtypes.split(",")
    args.variants = args.variants.split(",")
    args.directions = args.directions.split(",")
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; expected some of {VARIANTS}")
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    if args.glibc_tunables is not None:
        child_argv = _strip_tunables_flag(sys.argv[1:])
        rows, tuned = _child(child_argv, None), _child(child_argv, args.glibc_tunables)
    else:
        rows, tuned = measure(args), None
        if args.rows_json:  # a child: the parent prints and records
            Path(args.rows_json).write_text(json.dumps(rows))
            return

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    env_note = os.environ.get("GLIBC_TUNABLES") if tuned is None else None
    print(f"\nVAE codec vs diffusers: preset={args.preset} device={args.device} ({device_name}) torch "
          f"{torch.__version__} batch={args.batch} size={args.size} repeats={args.repeats} (medians)"
          f"{' in a worker thread' if args.in_thread else ''}"
          f"{f' GLIBC_TUNABLES={env_note}' if env_note else ''}; wall {time.perf_counter() - t0:.0f} s\n")
    print_table(rows, tuned, args.glibc_tunables)
    record = {"bench": "codec", "args": vars(args), "device_name": device_name, "torch": torch.__version__,
              "glibc_tunables_env": os.environ.get("GLIBC_TUNABLES"), "rows": rows, "rows_tuned": tuned,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    suffix = ("-malloc" if tuned is not None else "") + ("-thread" if args.in_thread else "")
    out = Path(args.out) / f"codec-{args.preset}-{args.device.replace(':', '')}-b{args.batch}-{args.size}{suffix}.json"
    out.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

"""What a fused GroupNorm + SiLU could still save the CPU codec (BENCHMARKS.md, codec section).

The sd15 encoder's own GroupNorm calls (shapes, weights and activations captured from one forward
pass at --size px, channels_last, in --dtype) are timed as the model runs them and against what
fusion could reach, all in this one thread of torch's:

  ours        vae.model._group_norm as the codec calls it: ATen's GroupNorm, then SiLU in place
  gn-only     ATen's GroupNorm alone (what the SiLU pass costs is the difference)
  gn+relu     ATen's GroupNorm, then ReLU in place where the codec has its SiLU: the same memory
              traffic as the SiLU pass, with next to no arithmetic
  compiled    GroupNorm + SiLU written as per-channel sums and one scale/shift/SiLU map, compiled
              by inductor (the fused kernel a user can get without writing C++)
  gn floor    1.5 copies of each tensor: one read for the statistics, one read and one write to
              apply them. No GroupNorm kernel moves less memory than that.
  fused, at best   max(gn floor, ours - gn-only): a kernel that fuses the SiLU into GroupNorm's
              write still moves GroupNorm's memory and still does SiLU's arithmetic. The SiLU pass
              (ours - gn-only) is compute-bound where it costs several times the ReLU pass on the
              same memory, so its time is that arithmetic's, with its traffic hidden under it

Each figure is the sum over the encoder's calls, in ms per image; medians of --repeats passes, the
variants alternating within each pass. The last column is what each would save against "ours";
divide it into the encoder's time per image (BENCHMARKS.md) for the ratio it could move.

    python bench/bench_groupnorm.py                     # sd15, 1 x 256 px, bfloat16, about 1 min
    python bench/bench_groupnorm.py --dtype float32
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae import build_model  # noqa: E402
from vae import model  # noqa: E402
from vae.model import _group_norm  # noqa: E402


def captured_calls(size: int, dtype: torch.dtype) -> list[tuple[nn.GroupNorm, torch.Tensor, bool]]:
    """(norm, its input, whether SiLU follows) for each GroupNorm call of one encoder pass, as the
    model makes them (`vae.model._group_norm`, wrapped for the one pass)."""
    torch.manual_seed(0)
    vae = build_model("sd15", seed=0).to(dtype=dtype, memory_format=torch.channels_last).eval()
    calls: list[tuple[nn.GroupNorm, torch.Tensor, bool]] = []

    def recording(norm: nn.GroupNorm, x: torch.Tensor, *, silu: bool) -> torch.Tensor:
        calls.append((norm, x.clone(memory_format=torch.channels_last), silu))
        return _group_norm(norm, x, silu=silu)

    x = torch.rand(1, 3, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last) * 2 - 1
    model._group_norm = recording
    try:
        with torch.inference_mode():
            vae.encoder(x)
    finally:
        model._group_norm = _group_norm
    return calls


def channel_sums_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                      silu: bool) -> torch.Tensor:
    """GroupNorm (+ SiLU) from per-channel sums in float32: a reduction over the pixels, which is
    contiguous per channel in channels_last, and one pointwise map that inductor can fuse."""
    n, c, h, w = x.shape
    xf = x.float()
    s1 = xf.sum(dim=(2, 3)).view(n, groups, c // groups)
    s2 = (xf * xf).sum(dim=(2, 3)).view(n, groups, c // groups)
    count = h * w * (c // groups)
    mean = s1.sum(-1) / count
    var = (s2.sum(-1) / count - mean * mean).clamp_min(0)
    scale = weight.float().view(1, groups, c // groups) * torch.rsqrt(var + eps)[:, :, None]
    shift = bias.float().view(1, groups, c // groups) - mean[:, :, None] * scale
    y = xf * scale.reshape(n, c, 1, 1) + shift.reshape(n, c, 1, 1)
    return (F.silu(y) if silu else y).to(x.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the codec tables use 2)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    calls = captured_calls(args.size, dtype)
    compiled = torch.compile(channel_sums_norm, dynamic=False)

    variants = {
        "ours": lambda m, x, silu: _group_norm(m, x, silu=silu),
        "gn-only": lambda m, x, silu: m(x),
        "gn+relu": lambda m, x, silu: m(x).relu_() if silu else m(x),
        "compiled": lambda m, x, silu: compiled(x, m.weight, m.bias, m.num_groups, m.eps, silu),
        "copy": lambda m, x, silu: torch.empty_like(x).copy_(x),
    }
    errors = {}
    with torch.inference_mode():
        for name in ("compiled",):  # compiles each shape once, outside the timings; checks it is right
            worst = 0.0
            for m, x, silu in calls:
                ref = _group_norm(m, x, silu=silu).float()
                got = variants[name](m, x, silu).float()
                worst = max(worst, ((got - ref).norm() / ref.norm()).item())
            errors[name] = worst
        times: dict[str, list[float]] = {name: [] for name in variants}
        for rep in range(args.repeats + 1):
            order = list(variants)[rep % len(variants):] + list(variants)[:rep % len(variants)]
            for name in order:
                t0 = time.perf_counter()
                for m, x, silu in calls:
                    variants[name](m, x, silu)
                if rep:  # the first pass warms every variant up
                    times[name].append((time.perf_counter() - t0) * 1e3)
    ms = {name: statistics.median(v) for name, v in times.items()}
    ms["gn floor"] = 1.5 * ms.pop("copy")
    ms["fused, at best"] = max(ms["gn floor"], ms["ours"] - ms["gn-only"])
    rows = [{"variant": name, "ms_per_image": round(ms[name], 2), "saves_ms": round(ms["ours"] - ms[name], 2),
             "max_rel_err": errors.get(name)}
            for name in ("ours", "gn-only", "gn+relu", "compiled", "gn floor", "fused, at best")]
    print(f"sd15 encoder, {len(calls)} GroupNorm calls ({sum(s for *_, s in calls)} with SiLU), "
          f"1 x {args.size} px, {args.dtype}, channels_last, {args.threads} threads, torch {torch.__version__}")
    print(f"{'variant':14s} {'ms/image':>9s} {'saves ms':>9s}  max rel err vs ours")
    for r in rows:
        err = "" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
        print(f"{r['variant']:14s} {r['ms_per_image']:9.2f} {r['saves_ms']:9.2f}  {err}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"groupnorm-sd15-{args.size}-{args.dtype}.json"
    path.write_text(json.dumps({"args": vars(args), "machine": platform.processor() or platform.machine(),
                                "torch": torch.__version__, "calls": len(calls), "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""The audit's report, written by the driver once every part is committed.

Under the audit's output folder (local or any fsspec URL, written the same way):

    metrics.parquet   one row per scored latent: key, shard, flipped, psnr, ssim, mae, flags, ...
    summary.json      the figures below, machine-readable (what a pipeline gates on)
    report.html       summary table, histograms, contact sheets; relative links only
    images/           the report's pictures (PNG)
    parts/            the per-shard parts the audit's tasks wrote (the engine's data files)

The parts are read one at a time, so memory holds one part plus a few numbers per latent.
"""

from __future__ import annotations

import datetime as _dt
import html
import io
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import __version__
from pipeline.config import AuditConfig
from pipeline.core.kind import JobPlan
from pipeline.core.layout import CURRENT
from pipeline.core.ledger import Ledger
from pipeline.core.storage import join, write_atomically, write_bytes_atomically
from pipeline.jobs.audit import METRIC_COLUMNS, PART_SCHEMA, LowestK
from pipeline.metrics import CLIP_MARGIN, HEAT_MAX, SATURATED_FRACTION
from vae.presets import LatentScaling

log = logging.getLogger(__name__)

# Scaled latents of a correctly scaled VAE have a per-channel std near 1 (that is what the scaling
# factor is chosen for); outside this band the factor (or the VAE) is likely not the one they were made with.
LATENT_STD_BAND = (0.75, 1.33)
_HIST_BINS = 40


@dataclass
class _Totals:
    """What the report needs from the metric rows, gathered part by part."""

    k: int
    rows: int = 0
    psnr: list[np.ndarray] = field(default_factory=list)
    ssim: list[np.ndarray] = field(default_factory=list)
    mae: list[np.ndarray] = field(default_factory=list)
    stds: list[np.ndarray] = field(default_factory=list)
    weight: float = 0.0
    sum_mean: np.ndarray | None = None
    sum_sq: np.ndarray | None = None
    flags: dict[str, int] = field(default_factory=lambda: {"latent_non_finite": 0, "output_non_finite": 0,
                                                           "saturated": 0})
    worst: LowestK = field(init=False)
    random: LowestK = field(init=False)

    def __post_init__(self) -> None:
        self.worst, self.random = LowestK(self.k), LowestK(self.k)

    def add(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        psnr = table.column("psnr").to_numpy(zero_copy_only=False).astype(np.float64)
        scored = ~np.isnan(psnr)
        self.psnr.append(psnr[scored].astype(np.float32))
        self.ssim.append(table.column("ssim").to_numpy(zero_copy_only=False).astype(np.float32)[scored])
        self.mae.append(table.column("mae").to_numpy(zero_copy_only=False).astype(np.float32)[scored])
        for flag in self.flags:
            self.flags[flag] += int(pc.sum(table.column(flag)).as_py() or 0)
        means = table.column("latent_mean").to_pylist()
        stds = table.column("latent_std").to_pylist()
        areas = (table.column("height").to_numpy() * table.column("width").to_numpy()).astype(np.float64)
        for mean, std, area in zip(means, stds, areas):
            m, s = np.asarray(mean, np.float64), np.asarray(std, np.float64)
            if not (np.isfinite(m).all() and np.isfinite(s).all()):
                continue  # a non-finite latent is counted by its flag, not mixed into the statistics
            if self.sum_mean is None:
                self.sum_mean, self.sum_sq = np.zeros_like(m), np.zeros_like(m)
            self.sum_mean += area * m
            self.sum_sq += area * (s * s + m * m)
            self.weight += area
            self.stds.append(s.astype(np.float32))
        keys = table.select(["key", "shard", "flipped", "psnr", "ssim", "mae", "pick"]).to_pylist()
        for row in keys:
            self.worst.offer(-math.inf if row["psnr"] is None else row["psnr"], lambda row=row: row)
            self.random.offer(row["pick"], lambda row=row: row)

    def channel_stats(self) -> tuple[list[float], list[float]]:
        if self.sum_mean is None or self.weight == 0:
            return [], []
        mean = self.sum_mean / self.weight
        var = np.maximum(self.sum_sq / self.weight - mean * mean, 0.0)
        return mean.tolist(), np.sqrt(var).tolist()


def _stats(values: np.ndarray) -> dict[str, float | None]:
    if values.size == 0:
        return {"mean": None, "median": None, "p05": None, "min": None, "max": None}
    return {"mean": float(values.mean()), "median": float(np.median(values)),
            "p05": float(np.percentile(values, 5)), "min": float(values.min()), "max": float(values.max())}


# --- pictures ----------------------------------------------------------------------------------


def _figure_png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _quality_plot(psnr: np.ndarray, ssim: np.ndarray, fail_under: float | None) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    for ax, values, name, unit in ((axes[0], psnr, "PSNR", "dB"), (axes[1], ssim, "SSIM", "")):
        if values.size:
            ax.hist(values, bins=_HIST_BINS, color="#3b6ea8")
            ax.axvline(float(values.mean()), color="#222", linestyle="--", label=f"mean {values.mean():.3g}")
        if name == "PSNR" and fail_under is not None:
            ax.axvline(fail_under, color="#c0392b", label=f"--fail-under-psnr {fail_under:g}")
        ax.set_xlabel(f"{name} {unit}".strip())
        ax.set_ylabel("latents")
        ax.set_title(f"{name} of each reconstruction against its source")
        if values.size or name == "PSNR" and fail_under is not None:
            ax.legend(loc="upper left", fontsize=8)
    return _figure_png(fig)


def _latent_plot(mean: list[float], std: list[float], stds: np.ndarray) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    channels = np.arange(len(mean))
    axes[0].bar(channels - 0.2, mean, width=0.4, label="mean", color="#7f8c8d")
    axes[0].bar(channels + 0.2, std, width=0.4, label="std", color="#3b6ea8")
    axes[0].axhline(1.0, color="#27ae60", linestyle="--", label="std of a correctly scaled latent")
    axes[0].axhspan(*LATENT_STD_BAND, color="#27ae60", alpha=0.08)
    axes[0].set_xticks(channels)
    axes[0].set_xlabel("latent channel")
    axes[0].set_title("scaled latents, per channel, over the audited latents")
    # Below the axes: inside, it would cover a bar whatever corner it took.
    axes[0].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
    if stds.size:
        for c in range(stds.shape[1]):
            axes[1].hist(stds[:, c], bins=_HIST_BINS, histtype="step", linewidth=1.5, label=f"channel {c}")
        axes[1].axvline(1.0, color="#27ae60", linestyle="--")
        axes[1].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4, frameon=False)
    axes[1].set_xlabel("std of one latent's channel")
    axes[1].set_ylabel("latents")
    axes[1].set_title("per-latent channel std")
    return _figure_png(fig)


# --- the page ----------------------------------------------------------------------------------

_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f; margin: 0; background: #f5f5f7; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 28px 60px; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 34px 0 10px; }
.sub { color: #555; margin: 0 0 18px; word-break: break-all; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 16px 0; }
.card { background: #fff; border-radius: 10px; padding: 12px 16px; min-width: 170px; border-left: 6px solid #27ae60;
        box-shadow: 0 1px 2px rgba(0,0,0,.08); }
.card.warn { border-left-color: #e67e22; } .card.bad { border-left-color: #c0392b; }
.card .v { font-size: 22px; font-weight: 600; } .card .l { color: #555; font-size: 13px; }
table { border-collapse: collapse; background: #fff; border-radius: 8px; overflow: hidden; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
td, th { padding: 6px 12px; text-align: left; border-bottom: 1px solid #eee; vertical-align: top; font-size: 14px; }
th { background: #fafafa; font-weight: 600; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
img.plot { max-width: 100%; background: #fff; border-radius: 8px; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
.sheet { display: grid; grid-template-columns: repeat(auto-fill, minmax(380px, 1fr)); gap: 14px; }
figure { margin: 0; background: #fff; border-radius: 8px; padding: 8px; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
figure img { width: 100%; image-rendering: auto; display: block; }
figcaption { font-size: 13px; margin-top: 6px; word-break: break-all; } figcaption b { font-weight: 600; }
.legend { color: #555; font-size: 13px; margin: 4px 0 10px; } code { font-size: 13px; }
.warnbox { background: #fff4e5; border: 1px solid #f0c36d; padding: 10px 14px; border-radius: 8px; }
"""


def _card(value: str, label: str, level: str = "") -> str:
    return f'<div class="card {level}"><div class="v">{html.escape(value)}</div><div class="l">{html.escape(label)}</div></div>'


def _fmt(value: float | None, digits: int = 2, unit: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _sheet(items: list[dict], prefix: str) -> str:
    if not items:
        return "<p>No latent could be shown.</p>"
    figures = []
    for i, row in enumerate(items):
        flip = " (flipped)" if row["flipped"] else ""
        scores = ("not scored: non-finite" if row["psnr"] is None else
                  f"PSNR <b>{row['psnr']:.2f} dB</b> · SSIM <b>{row['ssim']:.3f}</b> · MAE {row['mae']:.1f}")
        figures.append(f'<figure><img src="images/{prefix}-{i:03d}.png" alt="{html.escape(row["key"])}">'
                       f'<figcaption><b>{html.escape(row["key"])}</b>{flip} · shard {html.escape(row["shard"])}'
                       f'<br>{scores}</figcaption></figure>')
    return f'<div class="sheet">{"".join(figures)}</div>'


def _page(s: Mapping[str, Any]) -> str:
    q, vae, c = s["quality"], s["vae"], s["completeness"]
    psnr_mean = q["psnr"]["mean"]
    gate = s.get("fail_under_psnr")
    psnr_level = "" if psnr_mean is None or gate is None or psnr_mean >= gate else "bad"
    if psnr_mean is not None and gate is None and psnr_mean < 20:
        psnr_level = "warn"
    scale_level = "" if s["latents"]["scaling_ok"] else "bad"
    nonfinite = s["flags"]["latent_non_finite"] + s["flags"]["output_non_finite"]
    missing = c["missing"]
    cards = "".join([
        _card(_fmt(psnr_mean, 2, " dB"), "mean PSNR" + (f" (gate {gate:g} dB)" if gate is not None else ""), psnr_level),
        _card(_fmt(q["ssim"]["mean"], 3), "mean SSIM"),
        _card(_fmt(s["latents"]["std_rms"], 3), f"latent std (expected {LATENT_STD_BAND[0]}-{LATENT_STD_BAND[1]})",
              scale_level),
        _card(str(nonfinite), "non-finite latents or outputs", "bad" if nonfinite else ""),
        _card(str(s["flags"]["saturated"]),
              f"saturated outputs (> {SATURATED_FRACTION:.0%} of values over {CLIP_MARGIN:g} beyond ±1)",
              "warn" if s["flags"]["saturated"] else ""),
        _card(str(missing), "source keys missing from the cache", "bad" if missing else ""),
    ])
    random_note = ('<p class="warnbox"><b>This VAE has random weights</b>: reconstructions are noise. Such '
                   'latents are for tests only.</p>' if vae.get("random_weights") else "")
    scaling_note = "" if s["latents"]["scaling_ok"] else (
        f'<p class="warnbox"><b>Latent scaling looks wrong</b>: the scaled latents have a per-channel std of '
        f'{_fmt(s["latents"]["std_rms"], 3)}, outside {LATENT_STD_BAND}. A correctly scaled latent has a std near 1: '
        f'the scaling factor {vae["scaling_factor"]} (preset {html.escape(str(vae["preset"]))}) is likely not the '
        'one this VAE needs, or the latents were made with another VAE.</p>')
    summary = _table([
        ("latents", ", ".join(s["latents"]["inputs"])),
        ("VAE", f"{vae['source']} (preset {vae['preset']}, fingerprint {vae['fingerprint']})"),
        ("scaling", f"{LatentScaling.from_metadata(vae).describe()}; compute {vae['compute_dtype']}"),
        ("audited", f"{s['audited']['latents']} latents of {s['audited']['keys']} keys"
                    + (f" (a seeded sample of {s['audited']['sample']}, seed {s['audited']['seed']})"
                       if s["audited"]["sample"] else " (every latent)")),
        ("PSNR dB", " · ".join(f"{k} {_fmt(v)}" for k, v in q["psnr"].items())),
        ("SSIM", " · ".join(f"{k} {_fmt(v, 3)}" for k, v in q["ssim"].items())),
        ("MAE (0-255)", " · ".join(f"{k} {_fmt(v)}" for k, v in q["mae"].items())),
        ("latent mean per channel", ", ".join(f"{v:.3f}" for v in s["latents"]["channel_mean"])),
        ("latent std per channel", ", ".join(f"{v:.3f}" for v in s["latents"]["channel_std"])),
        ("flags", f"{s['flags']['latent_non_finite']} non-finite latent(s), {s['flags']['output_non_finite']} "
                  f"non-finite output(s), {s['flags']['saturated']} saturated output(s)"),
        ("completeness", f"{c['source_samples']} source samples: {c['latents']} with latents, "
                         f"{c['encode_errors'] if c['encode_errors'] is not None else 'unknown'} recorded as encode "
                         f"errors, {c['missing']} missing"),
        ("not scored", ", ".join(f"{n} {stage}" for stage, n in sorted(s["not_scored"].items())) or "none"),
    ])
    missing_list = ""
    if c["missing_examples"]:
        items = "".join(f"<li><code>{html.escape(e['key'])}</code> in {html.escape(e['shard'])}</li>"
                        for e in c["missing_examples"])
        missing_list = f"<h2>Source keys missing from the cache</h2><ul>{items}</ul>"
    legend = (f'<p class="legend">Each picture: source as the encoder saw it | reconstruction | |difference| '
              f'heat map (inferno, 0 to {HEAT_MAX:g} of 255).</p>')
    title = f"latentcache audit: {_fmt(psnr_mean, 2, ' dB')} mean PSNR"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body><main>
<h1>Latent cache audit</h1>
<p class="sub">{html.escape(", ".join(s["latents"]["inputs"]))} · VAE {html.escape(vae["source"])} · {html.escape(s["created"])}</p>
{random_note}{scaling_note}
<div class="cards">{cards}</div>
<h2>Summary</h2>{summary}
<p class="legend">Machine-readable: <a href="summary.json">summary.json</a> · one row per latent:
<a href="metrics.parquet">metrics.parquet</a> · errors of the audit: <code>.latentcache/errors.parquet</code></p>
<h2>Reconstruction quality</h2><img class="plot" src="images/quality.png" alt="PSNR and SSIM histograms">
<h2>Latent statistics</h2><img class="plot" src="images/latents.png" alt="per-channel latent mean and std">
<h2>Worst {len(s["worst"])} reconstructions</h2>{legend}{_sheet(s["worst"], "worst")}
<h2>A random {len(s["random"])} (seed {s["audited"]["seed"]})</h2>{legend}{_sheet(s["random"], "random")}
{missing_list}
<p class="legend">latentcache {html.escape(__version__)} · report written {html.escape(s["created"])}</p>
</main></body></html>
"""


# --- writing ---------------------------------------------------------------------------------


def _previews(ledger: Ledger, data_files: Mapping[str, str], chosen: list[dict],
              role: str) -> dict[tuple[str, str, bool], bytes]:
    """The preview PNGs of `chosen` rows, read from their parts (shard name -> data file)."""
    out: dict[tuple[str, str, bool], bytes] = {}
    for shard in sorted({row["shard"] for row in chosen}):
        with ledger.fs.open(join(ledger.root, data_files[shard]), "rb") as f:
            table = pq.ParquetFile(f).read(columns=["key", "flipped", "role", "preview"])
        table = table.filter(pc.equal(table.column("role"), role))
        for row in table.to_pylist():
            out[(shard, row["key"], row["flipped"])] = row["preview"]
    return out


def write_report(cfg: AuditConfig, plan: JobPlan, ledger: Ledger) -> dict[str, Any]:
    """Write metrics.parquet, summary.json, images/ and report.html from the committed parts; returns
    the headline figures (mean PSNR, the report's URL, ...) for the job summary."""
    fs, root = ledger.fs, ledger.root
    tmp = join(root, CURRENT.tmp)
    records = ledger.job_records()
    totals = _Totals(k=cfg.worst)
    schema = pa.schema([PART_SCHEMA.field(n) for n in METRIC_COLUMNS])

    def merge(f: Any) -> None:
        with pq.ParquetWriter(f, schema, compression="zstd") as writer:
            for record in records:
                with fs.open(join(root, record.data_file), "rb") as part:
                    table = pq.ParquetFile(part).read(columns=[*METRIC_COLUMNS, "pick", "role"])
                table = table.filter(pc.equal(table.column("role"), "metrics"))
                totals.add(table)
                writer.write_table(table.select(METRIC_COLUMNS))

    write_atomically(fs, tmp, join(root, "metrics.parquet"), merge)

    psnr = np.concatenate(totals.psnr) if totals.psnr else np.zeros(0, np.float32)
    ssim = np.concatenate(totals.ssim) if totals.ssim else np.zeros(0, np.float32)
    mae = np.concatenate(totals.mae) if totals.mae else np.zeros(0, np.float32)
    stds = np.stack(totals.stds) if totals.stds else np.zeros((0, 0), np.float32)
    channel_mean, channel_std = totals.channel_stats()
    std_rms = float(np.sqrt(np.mean(np.square(channel_std)))) if channel_std else None
    counters: dict[str, int] = {}
    for r in records:
        for k, v in r.counters.items():
            counters[k] = counters.get(k, 0) + v
    errors = [e for r in records for e in r.errors]
    not_scored: dict[str, int] = {}
    for e in errors:
        if e.stage != "missing":
            not_scored[e.stage] = not_scored.get(e.stage, 0) + 1
    missing = [e for e in errors if e.stage == "missing"]
    errors_known = all(s.get("latents") for s in plan.worker_args["shards"].values())
    worst, random_pick = totals.worst.items(), totals.random.items()
    identity, provenance = plan.identity, plan.provenance
    summary: dict[str, Any] = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": __version__,
        "vae": {"source": provenance.get("vae_source"), "random_weights": bool(provenance.get("vae_random_weights")),
                "fingerprint": identity["vae_fingerprint"], "preset": identity["preset"],
                **LatentScaling.from_metadata(identity, where="the audit's identity").identity(),
                "compute_dtype": identity["compute_dtype"]},
        "audited": {"latents": totals.rows, "scored": int(psnr.size), "keys": sum(r.samples_written for r in records),
                    "sample": cfg.samples, "seed": cfg.seed},
        "quality": {"psnr": _stats(psnr), "ssim": _stats(ssim), "mae": _stats(mae)},
        "latents": {"inputs": list(cfg.input), "channel_mean": channel_mean, "channel_std": channel_std,
                    "std_rms": std_rms, "expected_std_band": list(LATENT_STD_BAND),
                    "scaling_ok": std_rms is not None and LATENT_STD_BAND[0] <= std_rms <= LATENT_STD_BAND[1]},
        "flags": totals.flags,
        "not_scored": not_scored,
        "completeness": {"source_samples": counters.get("source_samples", 0), "latents": counters.get("latents", 0),
                         "encode_errors": counters.get("encode_errors", 0) if errors_known else None,
                         "missing": len(missing),
                         "missing_examples": [{"key": e.key, "shard": e.shard} for e in missing[:50]]},
        "fail_under_psnr": cfg.fail_under_psnr,
        "passed": None if cfg.fail_under_psnr is None else bool(psnr.size and psnr.mean() >= cfg.fail_under_psnr),
        "worst": [{k: row[k] for k in ("key", "shard", "flipped", "psnr", "ssim", "mae")} for row in worst],
        "random": [{k: row[k] for k in ("key", "shard", "flipped", "psnr", "ssim", "mae")} for row in random_pick],
    }
    images = {"images/quality.png": _quality_plot(psnr, ssim, cfg.fail_under_psnr),
              "images/latents.png": _latent_plot(channel_mean, channel_std, stds)}
    for role, chosen in (("worst", worst), ("random", random_pick)):
        found = _previews(ledger, {r.name: r.data_file for r in records}, chosen, role)
        for i, row in enumerate(chosen):
            images[f"images/{role}-{i:03d}.png"] = found[(row["shard"], row["key"], row["flipped"])]
    for rel, data in images.items():
        write_bytes_atomically(fs, tmp, join(root, rel), data)
    write_bytes_atomically(fs, tmp, join(root, "summary.json"), json.dumps(summary, indent=1).encode())
    # The page last: a report.html that exists has every file it links to.
    write_bytes_atomically(fs, tmp, join(root, "report.html"), _page(summary).encode("utf-8"))
    report = fs.unstrip_protocol(join(root, "report.html"))
    log.info("audit report: %s", report)
    return {"report": report, "psnr_mean": summary["quality"]["psnr"]["mean"],
            "ssim_mean": summary["quality"]["ssim"]["mean"], "scaling_ok": summary["latents"]["scaling_ok"],
            "missing": len(missing), "non_finite": totals.flags["latent_non_finite"] + totals.flags["output_non_finite"]}


__all__ = ["write_report", "LATENT_STD_BAND"]

"""Train the `tiny` VAE on the real photos shipped inside installed packages, for the demo.

The demo's random-weights VAE decodes latents into noise; these weights make decoded demo images
recognisable. Everything comes from files already on disk (scikit-image's and matplotlib's sample
photos), nothing is downloaded, and the run is deterministic given --seed as long as it finishes
its --steps inside --minutes.

    .venv/bin/python jobs/train_demo_vae.py --out vae/weights/tiny-demo

Writes a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors) that
`vae.load_vae` and `diffusers.AutoencoderKL.from_pretrained` both read, and training.json with the
run's settings and reconstruction PSNRs on training and held-out photos.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root

from pipeline.demo import bundled_photos
from pipeline.transforms import to_model_input
from vae.model import AutoencoderKL, DiagonalGaussian
from vae.presets import PRESETS
from vae.weights import to_diffusers_layout

PRESET = PRESETS["tiny"]
# Held out to measure generalisation: a cat, a drink and a face, unlike anything trained on.
HELD_OUT = ("chelsea", "coffee", "grace_hopper")
EVAL_SIZE = 256
# Short sides the training crops are cut from: the eval scale and a range around it, so the
# model sees both fine detail (large) and whole-object structure (small).
PYRAMID_SHORT_SIDES = (128, 160, 192, 224, 256, 320, 384, 448, 512)
# SD's VAE weight on KL against a summed reconstruction loss; both are per pixel value here.
KL_WEIGHT = 1e-6
CHANNEL_ORDERS = ([0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0])
# Mean absolute deviation from grey (0..255) below which an "RGB" file is really greyscale.
MIN_COLOURFULNESS = 1.0


@dataclass(frozen=True)
class Photo:
    """A colour photo read from an installed package: its name, path and RGB pixels."""

    name: str
    path: Path
    image: Image.Image


def colourfulness(image: Image.Image) -> float:
    """Mean absolute deviation of the RGB channels from their per-pixel mean (0 for grey)."""
    a = np.asarray(image, dtype=np.float32)
    return float(np.abs(a - a.mean(axis=2, keepdims=True)).mean())


def load_colour(name: str, path: Path) -> Photo | None:
    """The photo at `path` as RGB, or None when it is greyscale or has an alpha channel (logos)."""
    with Image.open(path) as img:
        if img.mode != "RGB":
            return None
        rgb = img.convert("RGB")
    return Photo(name, path, rgb) if colourfulness(rgb) >= MIN_COLOURFULNESS else None


def find_photos() -> list[Photo]:
    """Colour photos from `bundled_photos()`, plus other colour RGB images in skimage's data folder."""
    paths = dict(bundled_photos())
    skimage_data = next((p.parent for p in paths.values() if p.parent.name == "data"), None)
    if skimage_data is not None:
        known = {p.resolve() for p in paths.values()}
        for path in sorted(skimage_data.glob("*")):
            # Read straight from the package folder: skimage.data's fetchers may go to the network.
            if path.suffix.lower() in (".png", ".jpg", ".jpeg") and path.resolve() not in known:
                paths[path.stem] = path
    photos = [p for p in (load_colour(n, path) for n, path in sorted(paths.items())) if p is not None]
    missing = sorted(set(HELD_OUT) - {p.name for p in photos})
    if missing:
        raise RuntimeError(f"held-out photos {missing} not found among the installed sample photos")
    return photos


def resize_short_side(image: Image.Image, short: int) -> Image.Image:
    """`image` resized with LANCZOS so that its shorter side is `short` pixels."""
    w, h = image.size
    s = short / min(w, h)
    return image.resize((max(short, round(w * s)), max(short, round(h * s))), Image.Resampling.LANCZOS)


def centre_crop(image: Image.Image, size: int) -> np.ndarray:
    """The short side resized to `size`, then the central size x size square, as uint8 (H, W, 3)."""
    img = resize_short_side(image, size)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)


def build_pyramid(photos: list[Photo], crop: int) -> list[list[torch.Tensor]]:
    """Each training photo at each pyramid short side from `crop` up to its own size, as uint8
    (3, H, W); resampled once here so each step only cuts crops."""
    pyramid = []
    for photo in photos:
        native = min(photo.image.size)
        sides = {s for s in PYRAMID_SHORT_SIDES if crop <= s <= native} | {max(crop, min(native, EVAL_SIZE))}
        pyramid.append([torch.from_numpy(np.array(resize_short_side(photo.image, s), dtype=np.uint8))
                        .permute(2, 0, 1).contiguous() for s in sorted(sides)])
    return pyramid


def sample_batch(pyramid: list[list[torch.Tensor]], batch: int, crop: int,
                 gen: torch.Generator) -> torch.Tensor:
    """`batch` random crops (random photo, then pyramid level, position, horizontal flip and
    channel order) in [-1, 1]; photos are equally likely whatever their size."""
    out = torch.empty(batch, 3, crop, crop)
    for i in range(batch):
        levels = pyramid[int(torch.randint(len(pyramid), (1,), generator=gen))]
        img = levels[int(torch.randint(len(levels), (1,), generator=gen))]
        _, h, w = img.shape
        y = int(torch.randint(h - crop + 1, (1,), generator=gen))
        x = int(torch.randint(w - crop + 1, (1,), generator=gen))
        patch = img[:, y:y + crop, x:x + crop]
        if bool(torch.randint(2, (1,), generator=gen)):
            patch = patch.flip(-1)
        # Most training photos are red-orange (retina, ihc, astronaut): without shuffled channels
        # the model learns that prior and tints every held-out photo red.
        patch = patch[CHANNEL_ORDERS[int(torch.randint(len(CHANNEL_ORDERS), (1,), generator=gen))]]
        out[i] = patch.float() / 127.5 - 1.0
    return out.contiguous(memory_format=torch.channels_last)


def kl_per_value(posterior: DiagonalGaussian, values: int) -> torch.Tensor:
    """KL(posterior || N(0, 1)) summed over the latent, per image and per pixel value, averaged
    over the batch: the same ratio to a per-value reconstruction loss as SD's summed losses."""
    kl = 0.5 * (posterior.mean.pow(2) + posterior.logvar.exp() - 1.0 - posterior.logvar)
    return kl.flatten(1).sum(dim=1).mean() / values


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to 2% of it at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * t)))


def train(model: AutoencoderKL, pyramid: list[list[torch.Tensor]], *, steps: int, batch: int, crop: int,
          lr: float, l1: float, seed: int, minutes: float) -> tuple[int, float, list[float]]:
    """Train in place; returns (steps run, seconds, loss every 50 steps). Stops early at `minutes`."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99))
    model.train().to(memory_format=torch.channels_last)  # ~10% faster convolutions on the CPU
    warmup = min(100, steps // 10)
    losses: list[float] = []
    start = time.perf_counter()
    window = 0.0
    steps_run = steps
    for step in range(steps):
        if time.perf_counter() - start > minutes * 60:
            print(f"WARNING: stopped at step {step}/{steps}: --minutes {minutes} reached; the result is "
                  "not the deterministic one for these settings", file=sys.stderr)
            steps_run = step
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        x = sample_batch(pyramid, batch, crop, gen)
        posterior = model.encode(x)
        recon = model.decode(posterior.sample(noise))
        rec = F.mse_loss(recon, x)
        loss = rec + l1 * F.l1_loss(recon, x) + KL_WEIGHT * kl_per_value(posterior, x[0].numel())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window += rec.item()
        if (step + 1) % 50 == 0:
            losses.append(window / 50)
            psnr = 10 * math.log10(4.0 / max(window / 50, 1e-12))
            print(f"step {step + 1:5d}/{steps}  mse {window / 50:.5f} (~{psnr:.1f} dB)  "
                  f"lr {opt.param_groups[0]['lr']:.2e}  {time.perf_counter() - start:.0f}s", flush=True)
            window = 0.0
    model.eval().to(memory_format=torch.contiguous_format)
    return steps_run, time.perf_counter() - start, losses


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoder output in [-1, 1] -> uint8 (N, H, W, 3), as `pipeline.jobs.decode.to_uint8` does it."""
    pixels = ((images.float() + 1.0) * 127.5).clamp_(0, 255).round_().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


@torch.inference_mode()
def evaluate(model: AutoencoderKL, photos: list[Photo]) -> dict[str, float]:
    """PSNR (dB, data_range 255) of decode(posterior mean) on each photo's 256 px centre crop."""
    from skimage.metrics import peak_signal_noise_ratio

    out = {}
    for photo in photos:
        pixels = centre_crop(photo.image, EVAL_SIZE)
        recon = to_uint8(model.decode(model.encode(to_model_input([pixels])).mean))[0]
        out[photo.name] = round(float(peak_signal_noise_ratio(pixels, recon, data_range=255)), 3)
    return out


@torch.inference_mode()
def latent_stats(model: AutoencoderKL, photos: list[Photo]) -> tuple[float, list[float], list[float]]:
    """Overall std, and per-channel means and stds, of the posterior means of 256 px centre crops."""
    means = torch.cat([model.encode(to_model_input([centre_crop(p.image, EVAL_SIZE)])).mean for p in photos])
    per_channel = means.transpose(0, 1).flatten(1)
    return (float(means.std()), [round(float(v), 5) for v in per_channel.mean(dim=1)],
            [round(float(v), 5) for v in per_channel.std(dim=1)])


def write_folder(out: Path, model: AutoencoderKL, scaling_factor: float, record: dict[str, Any]) -> None:
    """config.json, diffusion_pytorch_model.safetensors and training.json into `out`."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "AutoencoderKL", **PRESET.diffusers_config(), "sample_size": EVAL_SIZE,
              "scaling_factor": scaling_factor}
    # diffusers_config() writes shift_factor 0 as null, which preset_from_diffusers_config reads as 0.0.
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    weights = out / "diffusion_pytorch_model.safetensors"
    state = to_diffusers_layout(model.state_dict(), len(model.arch.block_out_channels))
    save_file(state, str(weights), metadata={"format": "pt"})
    # safetensors creates the file 0600; the shipped weights must be as readable as the configs.
    weights.chmod((out / "config.json").stat().st_mode & 0o777)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="diffusers folder to write")
    p.add_argument("--seed", type=int, default=0)
    # On 2 CPU cores throughput is ~0.3 Mpixel/s whatever the crop, so small crops buy the most
    # optimiser steps; at equal time 64 px x 8 beat 96 x 4 and 128 x 8, and lr 1e-3 beat 2e-3
    # (which learnt luminance but not yet colour). 3200 steps take ~6 minutes.
    p.add_argument("--steps", type=int, default=3200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crop", type=int, default=64, help="training crop side, a multiple of 8")
    p.add_argument("--lr", type=float, default=1e-3, help="peak Adam learning rate")
    p.add_argument("--l1", type=float, default=0.0, help="weight of an L1 term added to the MSE loss")
    p.add_argument("--minutes", type=float, default=7.5,
                   help="wall-time cap on the training loop; stopping early breaks determinism")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.crop % PRESET.arch.downsample_factor or args.crop < 64:
        p.error(f"--crop {args.crop} must be a multiple of {PRESET.arch.downsample_factor} and >= 64")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    begin = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    photos = find_photos()
    held_out = [p for p in photos if p.name in HELD_OUT]
    training = [p for p in photos if p.name not in HELD_OUT]
    print(f"training on {len(training)} photos: {', '.join(p.name for p in training)}")
    print(f"held out:   {', '.join(p.name for p in held_out)}")
    pyramid = build_pyramid(training, args.crop)

    torch.manual_seed(args.seed)
    model = AutoencoderKL(PRESET.arch)
    steps_run, seconds, losses = train(model, pyramid, steps=args.steps, batch=args.batch, crop=args.crop,
                                       lr=args.lr, l1=args.l1, seed=args.seed, minutes=args.minutes)

    std, ch_mean, ch_std = latent_stats(model, training)
    scaling_factor = round(1.0 / std, 5)
    held = evaluate(model, held_out)
    train_psnr = evaluate(model, training)
    record = {
        "preset": PRESET.name,
        "seed": args.seed, "steps": steps_run, "steps_requested": args.steps, "batch": args.batch,
        "crop": args.crop, "lr": args.lr, "lr_schedule": "linear warm-up, cosine to 2%",
        "loss": f"mse + {args.l1} * l1 (decode(posterior sample) vs x) + {KL_WEIGHT} * KL per pixel value",
        "train_seconds": round(seconds, 1), "seconds": round(time.perf_counter() - begin, 1),
        "training_photos": {p.name: p.path.name for p in training},
        "held_out_photos": {p.name: p.path.name for p in held_out},
        "eval": f"PSNR of decode(mean), uint8, {EVAL_SIZE}x{EVAL_SIZE} centre crop after LANCZOS short side",
        "held_out_psnr": held, "held_out_psnr_mean": round(float(np.mean(list(held.values()))), 3),
        "train_psnr": train_psnr, "train_psnr_mean": round(float(np.mean(list(train_psnr.values()))), 3),
        "latent_std": round(std, 5), "latent_channel_mean": ch_mean, "latent_channel_std": ch_std,
        "scaling_factor": scaling_factor, "shift_factor": 0.0,
        "loss_every_50_steps": [round(v, 5) for v in losses],
        "torch": torch.__version__,
    }
    write_folder(args.out, model, scaling_factor, record)
    print(json.dumps({k: record[k] for k in ("steps", "seconds", "held_out_psnr", "held_out_psnr_mean",
                                             "train_psnr_mean", "scaling_factor")}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

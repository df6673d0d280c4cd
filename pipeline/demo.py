"""Built-in demo data: real photos that scikit-image and matplotlib ship, no download."""

from __future__ import annotations

import importlib.util
import io
import tarfile
from pathlib import Path
from typing import Iterable

from PIL import Image

# Colour photographs shipped inside the packages (never fetched): name -> (package, relative path).
_PHOTOS = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "retina": ("skimage", "data/retina.jpg"),
    "hubble": ("skimage", "data/hubble_deep_field.jpg"),
    "ihc": ("skimage", "data/ihc.png"),
    "camera": ("skimage", "data/camera.png"),
    "coins": ("skimage", "data/coins.png"),
    "moon": ("skimage", "data/moon.png"),
    "brick": ("skimage", "data/brick.png"),
    "grass": ("skimage", "data/grass.png"),
    "gravel": ("skimage", "data/gravel.png"),
    "page": ("skimage", "data/page.png"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}


def bundled_photos() -> dict[str, Path]:
    """Paths of the real photos available from installed packages (scikit-image, matplotlib)."""
    found = {}
    for name, (package, rel) in _PHOTOS.items():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(list(spec.submodule_search_locations)[0]) / rel
        if path.is_file():
            found[name] = path
    if not found:
        raise RuntimeError("no bundled photos found: the demo reads them from scikit-image or matplotlib; "
                           "reinstall latentcache (scikit-image is one of its dependencies)")
    return found


def write_tar(path: str | Path, members: Iterable[tuple[str, bytes]]) -> Path:
    """A WebDataset tar of (member name, bytes) in the given order, e.g. ("cat.jpg", ...)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return Path(path)


def build_demo_shards(folder: str | Path, *, per_shard: int = 4) -> list[Path]:
    """WebDataset tar shards of the bundled photos (`<key>.jpg` + `<key>.txt` caption), plus one
    deliberately broken sample, so the demo shows errors being recorded rather than fatal."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted(bundled_photos().items())
    samples: list[tuple[str, bytes, bytes]] = []
    for name, path in photos:
        img = Image.open(path)
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=92)
        samples.append((name, buf.getvalue(), f"a photo: {name}".encode()))
    samples.append(("broken_jpeg", b"this is not a jpeg", b"a broken sample"))
    return [
        write_tar(folder / f"demo-{i // per_shard:06d}.tar",
                  [(f"{key}.{ext}", data) for key, image, caption in samples[i:i + per_shard]
                   for ext, data in (("jpg", image), ("txt", caption))])
        for i in range(0, len(samples), per_shard)
    ]


DEMO_VAE = "builtin:tiny-demo"


def run_demo(workdir: str | Path = "latentcache-demo", *, vae: str = DEMO_VAE, resolution: int = 256,
             actors: int = 2) -> Path:
    """Build demo shards, encode them with VAE actors on a local Ray, decode the latents back into
    WebDataset image shards, and audit them against the photos; returns the audit report's path.

    The default VAE is the tiny one trained on these photos (jobs/train_demo_vae.py), shipped with
    the package; `random:PRESET` runs a random-weights VAE of any preset (its images are noise)."""
    import ray

    from .config import AuditConfig, DecodeConfig, EncodeConfig, PreprocessConfig, VAEConfig
    from .jobs import run

    workdir = Path(workdir).resolve()
    shards = build_demo_shards(workdir / "shards")
    out, decoded, audited = workdir / "latents", workdir / "decoded", workdir / "audit"
    print(f"built {len(shards)} shard(s) of bundled photos in {workdir / 'shards'}")
    cfg = EncodeConfig(
        input=(str(workdir / "shards"),), output=str(out), vae=VAEConfig(source=vae, dtype="float32"),
        preprocess=PreprocessConfig(resolution=resolution), actors=actors, batch_size=4,
        min_samples_for_error_rate=1000,  # the demo's one broken sample must not stop it
    )
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", include_dashboard=False)
    try:
        summary = run(cfg)
        print(f"\nencoded {summary.samples_written} images ({summary.samples_errored} recorded as errors) "
              f"into {summary.total_shards} shard(s) with the VAE {vae} at "
              f"{summary.steady_images_per_second:.1f} img/s once the VAE was loaded")
        back = run(DecodeConfig(input=(str(out),), output=str(decoded), actors=actors, batch_size=4))
        print(f"decoded {back.samples_written} latents back into images in {back.total_shards} WebDataset shard(s)")
        audit = run(AuditConfig(input=(str(out),), output=str(audited), actors=actors, batch_size=4, worst=6))
    finally:
        if started:
            ray.shutdown()
    r = audit.result
    noise = " (RANDOM WEIGHTS: the reconstructions are noise)" if summary.random_weights else ""
    print(f"audited {audit.samples_written} latents against their photos: mean PSNR {r['psnr_mean']:.2f} dB, "
          f"mean SSIM {r['ssim_mean']:.3f}, latent scaling {'ok' if r['scaling_ok'] else 'SUSPECT'}, "
          f"{r['missing']} missing{noise}")
    print(f"vae:     {vae}")
    print(f"latents: {out}")
    print(f"images:  {decoded}")
    print(f"errors:  {out / '.latentcache' / 'errors.parquet'}   status: latentcache status {out}")
    report = audited / "report.html"
    print(f"report:  {report}")
    return report

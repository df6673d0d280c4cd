"""A dataset made the way users make theirs: img2dataset downloads a url list from an HTTP server,
here one on 127.0.0.1 that serves real photos (tests/imagedata.py), images in awkward modes, broken
images and 404s, with captions in CJK, emoji and Arabic. Not a test module: tests/test_interop.py
imports it.

- `ImageServer`: a ThreadingHTTPServer on 127.0.0.1 (port 0) in a thread of this process, stopped
  by its own handle; it counts the requests it answers.
- `url_list()`: the routes for such a server and the rows (url, caption) of a url list.
- `run_img2dataset()`: img2dataset's own command line, in a process of its own, with no proxy and
  nothing that reaches past loopback (no wandb, no albumentations update check).
- `I2DFolder`: what img2dataset wrote (NNNNN.tar, NNNNN.parquet, NNNNN_stats.json), read with
  tarfile and pyarrow, not with latentcache.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import pyarrow.parquet as pq

from tests import imagedata

CAPTIONS = (
    "一只橘猫坐在窗台上，看着外面的雨。",  # Chinese
    "猫が窓辺で雨を眺めている",  # Japanese
    "비 오는 날 창가에 앉은 고양이",  # Korean
    "قطة تجلس على حافة النافذة وتنظر إلى المطر",  # Arabic, right to left
    "🐱🚀✨ a cat, a rocket and 👩🏽‍🚀 (ZWJ sequence) 🇯🇵",  # emoji, skin tone, flag
    "mixed: 中文 + العربية + emoji 🎉, quotes \"double\" 'single', tab\tand\nnewline",
    "",  # no caption at all
    "A" * 10_000 + " 長いキャプション " + "ب" * 10_000 + " 🐈" * 2_000,  # a long one (26,000 characters)
)


class Route(NamedTuple):
    status: int
    content_type: str
    body: bytes


class ImageServer:
    """An HTTP server on 127.0.0.1 in a thread of this process: `routes` maps a path to what it
    answers; any other path is a 404. `close()` (or leaving the `with`) stops it."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.requests: Counter[str] = Counter()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.requests[self.path] += 1
                route = server.routes.get(self.path, Route(404, "text/plain", b"not found\n"))
                self.send_response(route.status)
                self.send_header("Content-Type", route.content_type)
                self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                self.wfile.write(route.body)

            def log_message(self, *args: object) -> None:  # one line per request otherwise
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="image-server", daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def __enter__(self) -> "ImageServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Images in the modes real crawls hold; the bomb headers of imagedata.odd_images() are left out.
_ODD = ("gray_l", "rgba_transparent", "palette_transparent", "cmyk_jpeg", "gray16_png", "exif_rotated_jpeg",
        "webp", "bmp", "tiny")
_MIME = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp", "bmp": "image/bmp", "gif": "image/gif"}


def url_list() -> tuple[dict[str, Route], list[dict[str, str]]]:
    """(routes, rows): 33 urls. 18 real photos (each as JPEG and PNG), 9 odd modes, 3 broken images
    served as image/jpeg (truncated JPEG, garbage, no bytes) and 3 paths the server answers 404.
    Each row has a url path (the server's base is put in front by `write_url_list`) and a caption;
    the order interleaves the kinds, so that each img2dataset shard gets some of each."""
    routes: dict[str, Route] = {}
    good, odd, bad = [], [], []
    for name, img in imagedata.real_photos(max_side=128):
        for fmt, ext in (("JPEG", "jpg"), ("PNG", "png")):
            routes[f"/photo/{name}.{ext}"] = Route(200, _MIME[ext], imagedata.encode(img, fmt))
            good.append(f"/photo/{name}.{ext}")
    for name, enc in imagedata.odd_images().items():
        if name in _ODD:
            routes[f"/odd/{name}.{enc.ext}"] = Route(200, _MIME.get(enc.ext, "application/octet-stream"), enc.data)
            odd.append(f"/odd/{name}.{enc.ext}")
    corrupt = imagedata.corrupt_images()
    for name in ("truncated_jpeg", "text_named_jpg", "zero_bytes"):
        routes[f"/broken/{name}.jpg"] = Route(200, "image/jpeg", corrupt[name].data)
        bad.append(f"/broken/{name}.jpg")
    bad += ["/missing/gone.jpg", "/missing/never-was.png", "/missing/%E7%8C%AB.jpg"]  # 404s, one with a percent-escape
    paths = []
    while good or odd or bad:
        for pool, take in ((good, 2), (odd, 1), (bad, 1)):
            paths += pool[:take]
            del pool[:take]
    rows = [{"url": path, "caption": CAPTIONS[i % len(CAPTIONS)] if i % 5 else f"photo {i}: {CAPTIONS[i % 4]}"}
            for i, path in enumerate(paths)]
    return routes, rows


def write_url_list(path: Path, base: str, rows: list[dict[str, str]]) -> Path:
    """The url list as the Parquet table img2dataset reads (`--input_format parquet`)."""
    import pyarrow as pa

    pq.write_table(pa.table({"url": [base + r["url"] for r in rows], "caption": [r["caption"] for r in rows]}),
                   str(path))
    return path


def img2dataset_command() -> str:
    """The `img2dataset` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "img2dataset"
    if not script.exists():
        raise FileNotFoundError(f"{script}: img2dataset is not installed here; `make test-interop` installs it "
                                "(`make setup-interop`)")
    return str(script)


def loopback_env() -> dict[str, str]:
    """This environment with nothing that would send img2dataset's requests past 127.0.0.1: no
    proxy, no albumentations update check (it asks the internet at import otherwise), no wandb."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost", NO_ALBUMENTATIONS_UPDATE="1",
               WANDB_MODE="disabled", WANDB_SILENT="true")
    return env


def run_img2dataset(url_list_path: Path, output_folder: Path, *, log: Path, timeout: float = 240,
                    **options: object) -> None:
    """img2dataset's command line on a Parquet url list (url, caption) into `output_folder`, as
    webdataset shards of 10 samples, 2 processes of 4 threads; `options` add or override flags
    (`disable_all_reencoding=True`). Its output goes to `log`; a non-zero exit raises with its tail."""
    flags: dict[str, object] = dict(
        url_list=str(url_list_path), input_format="parquet", url_col="url", caption_col="caption",
        output_format="webdataset", output_folder=str(output_folder), image_size=64, resize_mode="border",
        processes_count=2, thread_count=4, number_sample_per_shard=10, distributor="multiprocessing",
        timeout=10, retries=0, enable_wandb=False)
    flags.update(options)
    argv = [img2dataset_command()] + [f"--{k}={v}" for k, v in flags.items()]
    with open(log, "w") as out:
        # Its own session, so that a timeout stops its worker processes too, not only the parent.
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=loopback_env(), start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"img2dataset ran past {timeout} s: {' '.join(argv)}\n{log.read_text()[-4000:]}")
    said = log.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"img2dataset exited {proc.returncode}: {' '.join(argv)}\n{said[-4000:]}")
    if "check for updates" in said or "new version of Albumentations" in said:
        raise RuntimeError(f"albumentations asked the internet for updates (NO_ALBUMENTATIONS_UPDATE unset?): {log}")


class I2DFolder:
    """An img2dataset output folder, read with the standard library and pyarrow."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def shards(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.tar"))

    def stats(self) -> dict[str, dict]:
        return {p.name[: -len("_stats.json")]: json.loads(p.read_text()) for p in sorted(self.root.glob("*_stats.json"))}

    def table(self, shard: str) -> list[dict]:
        """img2dataset's per-shard Parquet table: one row per url (key, url, caption, status, ...)."""
        return pq.read_table(str(self.root / f"{shard}.parquet")).to_pylist()

    def rows(self) -> list[dict]:
        return [dict(row, shard=shard) for shard in self.shards for row in self.table(shard)]

    def successes(self) -> dict[str, dict]:
        """key -> its Parquet row, for each row whose status is "success"."""
        return {r["key"]: r for r in self.rows() if r["status"] == "success"}

    def samples(self, shard: str | None = None) -> dict[str, dict[str, bytes]]:
        """key -> {ext: member bytes} of the tars (or one), read with tarfile."""
        out: dict[str, dict[str, bytes]] = {}
        for name in [shard] if shard else self.shards:
            with tarfile.open(self.root / f"{name}.tar") as tf:
                for member in tf.getmembers():
                    if member.isfile():
                        key, _, ext = member.name.partition(".")
                        out.setdefault(key, {})[ext] = tf.extractfile(member).read()
        return out

    def digests(self) -> dict[str, str]:
        """Every file under the folder (relative path) -> its sha256."""
        return imagedata.digests(self.root)


def tar_members(data: bytes) -> list[tarfile.TarInfo]:
    """The members of a tar held in memory (to cut it inside one)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return tf.getmembers()

"""Checks made before Ray starts or a model loads onto a device, so that a mistake costs seconds,
not an actor start on a cluster. Each failure is one line: the thing, what was expected, and the
flag or config key that sets it.

The other checks live where their work is done, and run before Ray too: the inputs list
(`JobKind.inputs`), the weights resolve and their keys fit the preset (`vae.inspect_vae`, from the
state dict's shapes, on the meta device), the config is valid (its dataclasses).
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Mapping

from pipeline.core.storage import ensure_dir, output_fs


class PreflightError(ValueError):
    """A check before the job failed: the message names the thing and the flag or key to change."""


def local_nodes() -> list[dict[str, float]]:
    """The resources a local Ray started by this command will have: this machine's CPUs and GPUs."""
    import torch

    return [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]


def check_device(requested: str, *, local: bool) -> None:
    """A CUDA device named in the config must exist where the actors run (on this machine for a
    local Ray; on a cluster, placement says whether any node has a GPU)."""
    if not local or not requested.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise PreflightError(f"vae.device={requested}: this machine has no CUDA device (torch {torch.__version__}, "
                             "CUDA build: {}); set --device auto or cpu".format(torch.version.cuda or "no"))
    index = int(requested.split(":", 1)[1]) if ":" in requested else 0
    if index >= count:
        raise PreflightError(f"vae.device={requested}: this machine has {count} CUDA device(s), cuda:0 to "
                             f"cuda:{count - 1}; set --device cuda or cuda:N with N < {count}")


def _storage_reason(e: BaseException) -> str:
    name = type(e).__name__
    text = " ".join(str(e).split())[:300]
    if name in ("NoCredentialsError", "PartialCredentialsError") or "Unable to locate credentials" in text:
        return ("no credentials were found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
                "use an instance role, or set storage_options)")
    if isinstance(e, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return f"not allowed to write there ({text or name})"
    if isinstance(e, FileNotFoundError) or "NoSuchBucket" in text:
        return f"its bucket or folder does not exist ({text or name})"
    return f"{name}: {text}"


def check_output_writable(url: str, storage_options: Mapping[str, Any] | None) -> None:
    """Write a probe object into the output folder and remove it: the folder (bucket) exists,
    credentials resolve, and this client may write there."""
    fs, root = output_fs(url, storage_options)
    probe = f"{root.rstrip('/')}/.latentcache-probe-{uuid.uuid4().hex[:12]}"
    local = "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol))
    created = local and not fs.exists(root)
    try:
        ensure_dir(fs, root)
        fs.pipe_file(probe, b"latentcache write probe\n")
    except Exception as e:  # noqa: BLE001 - every failure here is reported as one line, never swallowed
        raise PreflightError(f"output {url}: cannot write a probe object there: {_storage_reason(e)}; "
                             "choose another --output") from e
    try:
        fs.rm_file(probe)
    except Exception as e:  # noqa: BLE001
        raise PreflightError(f"output {url}: wrote a probe object but cannot delete it ({_storage_reason(e)}); "
                             f"latentcache needs delete rights there (remove {probe} by hand)") from e
    if created:
        fs.rmdir(root)  # the job makes it again once every check passed; a refused job leaves nothing


__all__ = ["PreflightError", "check_device", "check_output_writable", "local_nodes"]

"""Finding, reading and mapping VAE weights; strict loading; the weights fingerprint.

Sources: a `.safetensors`/`.ckpt`/`.pt`/`.pth`/`.bin` file (local path or any fsspec URL), a
diffusers model folder (`config.json` + weights, or a pipeline folder with `vae/`), or a Hugging
Face repo id (`org/name`, optionally `org/name/subfolder`) through huggingface_hub's cache.

Key layouts: the original CompVis one (also inside a full SD checkpoint under `first_stage_model.`)
is the model's own; the diffusers one (old and new attention names, linear- or conv-shaped
attention weights) is mapped onto it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping

import fsspec
import fsspec.implementations.local
import torch
from torch import nn

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_DIFFUSERS_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
)
_FULL_CHECKPOINT_PREFIXES = ("first_stage_model.", "vae.")


class WeightsError(ValueError):
    """Weights that cannot be found, read, or matched to the architecture."""


@dataclass(frozen=True)
class ResolvedSource:
    """Where the weights are: one weights file, and the diffusers config beside it if any."""

    weights_url: str
    config: Mapping[str, Any] | None


# --- finding ------------------------------------------------------------------------------------


def _looks_like_repo_id(source: str) -> bool:
    """`org/name` or `org/name/subfolder`; a missing local file such as `weights/vae.safetensors`
    is not one, so it gets a "not found" error rather than a hub error."""
    return ("://" not in source and not os.path.exists(source) and not source.startswith((".", "/", "~"))
            and not source.endswith(WEIGHT_SUFFIXES)
            and bool(re.fullmatch(r"[\w.-]+/[\w.-]+(/[\w./-]+)?", source)))


def _resolve_folder(fs: fsspec.AbstractFileSystem, folder: str, protocol_prefix: str) -> ResolvedSource:
    for candidate in (folder, f"{folder.rstrip('/')}/vae"):
        config_path = f"{candidate.rstrip('/')}/config.json"
        if not fs.exists(config_path):
            continue
        for name in _DIFFUSERS_WEIGHT_FILES:
            weights = f"{candidate.rstrip('/')}/{name}"
            if fs.exists(weights):
                with fs.open(config_path, "r") as f:
                    config = json.load(f)
                return ResolvedSource(protocol_prefix + weights, config)
        raise WeightsError(f"diffusers folder {protocol_prefix + candidate} has config.json but none of "
                           f"{list(_DIFFUSERS_WEIGHT_FILES)}")
    raise WeightsError(f"folder {protocol_prefix + folder} is not a diffusers VAE folder: expected "
                       f"config.json and {_DIFFUSERS_WEIGHT_FILES[0]} in it or in its vae/ subfolder")


def _resolve_hub(repo: str) -> ResolvedSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    parts = repo.split("/")
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    prefix = f"{subfolder}/" if subfolder else ""
    patterns = [f"{prefix}config.json", f"{prefix}diffusion_pytorch_model.safetensors",
                "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        path = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline)
    except LocalEntryNotFoundError as e:
        raise WeightsError(
            f"Hugging Face repo {repo_id!r} is not in the local cache and the hub cannot be reached "
            f"(offline); missing {patterns[:2]}. Download it once where there is network "
            "(`huggingface-cli download ...`) or pass a local path") from e
    except Exception as e:  # the hub client raises many types; all mean "not available"
        raise WeightsError(f"could not fetch Hugging Face repo {repo_id!r}: {type(e).__name__}: {e}") from e
    folder = os.path.join(path, subfolder) if subfolder else path
    return _resolve_folder(fsspec.filesystem("file"), folder, "")


BUILTIN_PREFIX = "builtin:"
BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


def builtin_weights() -> list[str]:
    """The VAEs shipped inside this package (`builtin:NAME` sources): diffusers folders under vae/weights/."""
    if not os.path.isdir(BUILTIN_DIR):
        return []
    return sorted(n for n in os.listdir(BUILTIN_DIR) if os.path.isfile(os.path.join(BUILTIN_DIR, n, "config.json")))


def resolve_source(source: str, storage_options: Mapping[str, Any] | None = None) -> ResolvedSource:
    """Find the weights file (and config) that `source` names."""
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        if name not in builtin_weights():
            raise WeightsError(f"no built-in VAE {name!r}; expected one of {builtin_weights()}")
        return _resolve_folder(fsspec.filesystem("file"), os.path.join(BUILTIN_DIR, name), "")
    if _looks_like_repo_id(source):
        return _resolve_hub(source)
    fs, path = fsspec.core.url_to_fs(source, **(storage_options or {}))
    prefix = "" if "://" not in source else source.split("://")[0] + "://"
    if not fs.exists(path):
        raise WeightsError(f"VAE weights not found at {source!r}: expected a weights file "
                           f"{list(WEIGHT_SUFFIXES)}, a diffusers folder, or a Hugging Face repo id")
    if fs.isdir(path):
        return _resolve_folder(fs, path, prefix)
    if not path.endswith(WEIGHT_SUFFIXES):
        raise WeightsError(f"{source!r} has an unknown weights suffix; expected one of {list(WEIGHT_SUFFIXES)}")
    return ResolvedSource(source, None)


# --- reading ------------------------------------------------------------------------------------


def _vae_keys(keys: list[str]) -> list[str]:
    """The keys worth reading: only the VAE's when the file is a full Stable Diffusion checkpoint."""
    for prefix in _FULL_CHECKPOINT_PREFIXES:
        picked = [k for k in keys if k.startswith(prefix)]
        if picked:
            return picked
    return keys


def _read_local(path: str) -> Any:
    # A full checkpoint is several GB of UNet and text encoder around a 330 MB VAE: read only the
    # VAE's tensors (safetensors) or map the file instead of copying it (torch.load).
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in _vae_keys(list(f.keys()))}
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _read_remote(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "rb") as f:
        data = f.read()
    if path.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        return load_safetensors(data)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def read_state_dict(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Read a weights file into a flat dict of tensors on the CPU (no pickle code execution)."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
    try:
        state = _read_local(path) if local else _read_remote(fs, path)
    except Exception as e:  # corrupt files raise library-specific types; name the file either way
        raise WeightsError(f"cannot read weights {url!r}: {type(e).__name__}: {e}") from e
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise WeightsError(f"{url!r} holds a {type(state).__name__}, expected a dict of tensors")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


# --- mapping ------------------------------------------------------------------------------------

_DIFFUSERS_ATTN = {
    "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
    "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out",
}
# The names today's diffusers writes (the older query/key/value ones are only read).
_ATTN_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def is_diffusers_layout(state: Mapping[str, torch.Tensor]) -> bool:
    return any(".down_blocks." in k or ".mid_block." in k or ".up_blocks." in k for k in state)


def strip_checkpoint_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep only the VAE of a full Stable Diffusion checkpoint, without its prefix."""
    for prefix in _FULL_CHECKPOINT_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def _diffusers_key_to_compvis(key: str, num_levels: int) -> str:
    k = key
    for side in ("encoder", "decoder"):
        k = re.sub(rf"^{side}\.mid_block\.resnets\.0\.", f"{side}.mid.block_1.", k)
        k = re.sub(rf"^{side}\.mid_block\.resnets\.1\.", f"{side}.mid.block_2.", k)
        m = re.match(rf"^{side}\.mid_block\.attentions\.0\.(.+)$", k)
        if m:
            rest = m.group(1)
            for old, new in _DIFFUSERS_ATTN.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            k = f"{side}.mid.attn_1.{rest}"
        k = re.sub(rf"^{side}\.conv_norm_out\.", f"{side}.norm_out.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)

    def up(m: re.Match) -> str:
        return f"decoder.up.{num_levels - 1 - int(m.group(1))}.{m.group(2)}"

    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.(resnets\.\d+\.|upsamplers\.0\.)", up, k)
    k = re.sub(r"(decoder\.up\.\d+\.)resnets\.(\d+)\.", r"\1block.\2.", k)
    k = re.sub(r"(decoder\.up\.\d+\.)upsamplers\.0\.", r"\1upsample.", k)
    k = k.replace(".conv_shortcut.", ".nin_shortcut.")
    return k


def to_model_layout(state: Mapping[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """Any supported layout -> this package's (CompVis names, linear attention weights)."""
    state = strip_checkpoint_prefix(state)
    if is_diffusers_layout(state):
        state = {_diffusers_key_to_compvis(k, num_levels): v for k, v in state.items()}
    out = {}
    for k, v in state.items():
        # Original checkpoints store attention projections as 1x1 convolutions.
        if re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", k) and v.ndim == 4:
            v = v[:, :, 0, 0]
        out[k] = v
    return out


def _compvis_key_to_diffusers(key: str, num_levels: int) -> str:
    """The inverse of `_diffusers_key_to_compvis`: one name of this package's layout in diffusers'."""
    k = key.replace(".nin_shortcut.", ".conv_shortcut.")
    k = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", k)
    k = re.sub(r"^(encoder|decoder)\.mid\.block_1\.", r"\1.mid_block.resnets.0.", k)
    k = re.sub(r"^(encoder|decoder)\.mid\.block_2\.", r"\1.mid_block.resnets.1.", k)
    m = re.match(r"^(encoder|decoder)\.mid\.attn_1\.([a-z_]+)\.(.+)$", k)
    if m:
        k = f"{m.group(1)}.mid_block.attentions.0.{_ATTN_TO_DIFFUSERS[m.group(2)]}.{m.group(3)}"
    k = re.sub(r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2.", k)
    k = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", k)
    # diffusers numbers decoder levels from the deepest up; CompVis by resolution.
    k = re.sub(r"^decoder\.up\.(\d+)\.block\.(\d+)\.",
               lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.resnets.{m.group(2)}.", k)
    k = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
               lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.upsamplers.0.", k)
    return k


def to_diffusers_layout(state: Mapping[str, torch.Tensor], num_levels: int) -> dict[str, torch.Tensor]:
    """This package's layout -> diffusers' AutoencoderKL names (attention as linear weights, as
    diffusers has them); checked to map back exactly, so a saved folder loads as it was trained."""
    own = {k: v.detach().contiguous() for k, v in state.items()}
    out = {_compvis_key_to_diffusers(k, num_levels): v for k, v in own.items()}
    back = to_model_layout(out, num_levels)
    if set(back) != set(own) or any(not torch.equal(back[k], own[k]) for k in own):
        raise WeightsError(f"diffusers names do not map back onto the model: {sorted(set(back) ^ set(own))[:8]}")
    return out


def to_compvis_layout(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This package's layout -> the original CompVis one (conv-shaped attention weights)."""
    return {
        k: (v[:, :, None, None] if re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", k) and v.ndim == 2 else v)
        for k, v in state.items()
    }


def _summarise(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def check_fits(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Raise WeightsError unless `state` has exactly `expected`'s keys and shapes (only shapes are
    read: `expected` may be a model's state dict on the meta device)."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(state[k].shape)}"
        for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_summarise(mismatched)}")
    if problems:
        raise WeightsError(f"weights {source!r} do not match the architecture; " + "; ".join(problems))


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load `state` (already in model layout) strictly: every key present, none extra, shapes equal."""
    expected = model.state_dict()
    check_fits(expected, state, source=source)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def fingerprint(model: nn.Module) -> str:
    """A stable hash of the weights: same tensors in any layout or file dtype-upcast -> same value."""
    return fingerprint_state(model.state_dict())


def fingerprint_state(state: Mapping[str, torch.Tensor]) -> str:
    """`fingerprint` of a state dict in the model's layout (see `to_model_layout`), without a model."""
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]

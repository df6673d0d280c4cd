"""Stable Diffusion's AutoencoderKL, top to bottom: blocks, attention, Encoder, Decoder, posterior.

Parameter names follow the original CompVis `ldm` layout (`encoder.down.0.block.0.conv1`, ...), so
original checkpoints load as they are; `vae.weights` maps the diffusers layout onto it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VAEArchitecture:
    """Shape of an AutoencoderKL. `block_out_channels[i]` is the width of resolution level i."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_attention: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if not self.block_out_channels:
            raise ValueError("block_out_channels must name at least one level, got ()")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} are not divisible by norm_num_groups="
                             f"{self.norm_num_groups}")
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along each side (8 for every Stable Diffusion VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout GroupNorm's output gets: channels_last for a channels_last input, else NCHW."""
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


@torch.library.custom_op("latentcache::group_norm", mutates_args=())
def _group_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
                   silu: bool) -> torch.Tensor:
    """GroupNorm (then SiLU in place) as one opaque op for torch.compile, run by ATen's own kernels.

    Inductor's generated CPU code for GroupNorm on channels_last activations with few channels per
    group (4 in SD's first level) loops over the groups serially and reads the whole tensor once per
    group: up to ~30x slower than ATen's kernel at 256 px, which made compiled codecs slower than eager.
    """
    # ATen decides the output layout from the strides; pinning it keeps this op and its fake alike.
    y = F.group_norm(x, groups, weight, bias, eps).contiguous(memory_format=_memory_format(x))
    return F.silu(y, inplace=True) if silu else y


@_group_norm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float,
      silu: bool) -> torch.Tensor:
    return torch.empty_like(x, memory_format=_memory_format(x))


def _group_norm(norm: nn.GroupNorm, x: torch.Tensor, *, silu: bool) -> torch.Tensor:
    """norm(x), followed by silu when asked, with the SiLU applied in place on the fresh output.

    On a CPU every full-size temporary is a fresh allocation (large ones are mmapped, page-faulted
    and unmapped by glibc's malloc each time), so one tensor instead of two saves a pass over memory
    and its page faults. GroupNorm's backward needs its input, not its output, so this stays
    differentiable in eager mode. Under torch.compile on a CPU (inference) it goes through
    `_group_norm_op`; on GPUs inductor's own fused GroupNorm + SiLU is kept.
    """
    if torch.compiler.is_compiling() and x.device.type == "cpu":
        return _group_norm_op(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu)
    y = norm(x)
    return F.silu(y, inplace=True) if silu else y


def _norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return _group_norm(norm, x, silu=True)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric padding, as in the original: the trained weights depend on it.
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class ResnetBlock(nn.Module):
    def __init__(self, *, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_norm_silu(self.norm1, x))
        h = self.conv2(_norm_silu(self.norm2, h))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        # In place on the fresh conv output (no new full-size tensor); a conv's backward needs its
        # input and weight, not its output.
        return h.add_(skip)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels. Projections are linear layers (the original's 1×1
    convolutions, same weights reshaped) so attention runs on (B, HW, C) without extra copies."""

    def __init__(self, *, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = _group_norm(self.norm, x, silu=False).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        out = self.proj_out(out).transpose(1, 2).reshape(b, c, h, w)
        # Not in place on `out`: for B = 1 this view of a (B, HW, C) buffer has strides that the next
        # GroupNorm does not take for channels_last, so it would return NCHW and the convs after it
        # would run on another layout. x + out takes x's layout; at the lowest resolution the
        # extra tensor costs nothing.
        return x + out


class MidBlock(nn.Module):
    def __init__(self, *, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(in_channels=channels, out_channels=channels, groups=groups)
        self.attn_1 = AttnBlock(channels=channels, groups=groups) if attention else None
        self.block_2 = ResnetBlock(in_channels=channels, out_channels=channels, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


class _Level(nn.Module):
    """One resolution level: a stack of ResnetBlocks and an optional resampler."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, resample_name: str) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        setattr(self, resample_name, resample)
        self._resample_name = resample_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        resample = getattr(self, self._resample_name)
        return x if resample is None else resample(x)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2 * latent_channels, H/f, W/f)."""

    def __init__(self, arch: VAEArchitecture) -> None:
        super().__init__()
        widths, g = arch.block_out_channels, arch.norm_num_groups
        self.conv_in = nn.Conv2d(arch.in_channels, widths[0], kernel_size=3, stride=1, padding=1)
        levels = []
        in_ch = widths[0]
        for i, out_ch in enumerate(widths):
            blocks = []
            for _ in range(arch.layers_per_block):
                blocks.append(ResnetBlock(in_channels=in_ch, out_channels=out_ch, groups=g))
                in_ch = out_ch
            last = i == len(widths) - 1
            levels.append(_Level(blocks, None if last else Downsample(out_ch), "downsample"))
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(channels=in_ch, groups=g, attention=arch.mid_block_attention)
        self.norm_out = _norm(in_ch, g)
        self.conv_out = nn.Conv2d(in_ch, 2 * arch.latent_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(_norm_silu(self.norm_out, h))


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f)."""

    def __init__(self, arch: VAEArchitecture) -> None:
        super().__init__()
        widths, g = arch.block_out_channels, arch.norm_num_groups
        in_ch = widths[-1]
        self.conv_in = nn.Conv2d(arch.latent_channels, in_ch, kernel_size=3, stride=1, padding=1)
        self.mid = MidBlock(channels=in_ch, groups=g, attention=arch.mid_block_attention)
        # Built from the deepest level up, but stored by level index as in the original layout.
        levels: list[_Level] = []
        for i in reversed(range(len(widths))):
            out_ch = widths[i]
            blocks = []
            for _ in range(arch.layers_per_block + 1):
                blocks.append(ResnetBlock(in_channels=in_ch, out_channels=out_ch, groups=g))
                in_ch = out_ch
            levels.insert(0, _Level(blocks, Upsample(out_ch) if i != 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(in_ch, g)
        self.conv_out = nn.Conv2d(in_ch, arch.out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(_norm_silu(self.norm_out, h))


@dataclass(frozen=True)
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)), unscaled."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussian":
        mean, logvar = torch.chunk(moments, 2, dim=1)
        # The same clamp as the original, so extreme moments give the same variance.
        return cls(mean=mean, logvar=torch.clamp(logvar, -30.0, 20.0))

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder of Stable Diffusion (encode -> posterior, decode -> image)."""

    def __init__(self, arch: VAEArchitecture) -> None:
        super().__init__()
        self.arch = arch
        self.encoder = Encoder(arch)
        self.decoder = Decoder(arch)
        c = arch.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, kernel_size=1) if arch.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, kernel_size=1) if arch.use_post_quant_conv else None

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, 2 * latent_channels, H/f, W/f): mean and log-variance, stacked."""
        moments = self.encoder(x)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian.from_moments(self.moments(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x).mean)

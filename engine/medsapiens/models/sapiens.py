"""Sapiens ViT backbone and heatmap head, with the module tree of the official checkpoints.

Parameter names follow mmpretrain's VisionTransformer and mmpose's HeatmapHead as used by Sapiens, so that
official state dicts load with no renaming: `backbone.patch_embed.projection`, `backbone.layers.{i}.ln1`,
`.attn.qkv`, `.attn.proj`, `.ln2`, `.ffn.layers.0.0`, `.ffn.layers.1`, `backbone.ln1`, `head.deconv_layers.{0,3}`,
`head.conv_layers.{0,3}`, `head.final_layer`. No I/O here (see checkpoints.py).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .attention import scaled_dot_product_attention


@dataclass(frozen=True)
class Arch:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    head_channels: int = 768


# The official sizes, then small ones with the same code for CPU training and tests.
ARCHS: dict[str, Arch] = {
    "sapiens_0.3b": Arch(1024, 24, 16, 4096),
    "sapiens_0.6b": Arch(1280, 32, 16, 5120),
    "sapiens_1b": Arch(1536, 40, 24, 6144),
    "sapiens_2b": Arch(1920, 48, 32, 7680),
    "small": Arch(384, 12, 6, 1536, 256),
    "tiny": Arch(192, 12, 3, 768, 128),
    "micro": Arch(64, 2, 2, 128, 32),
}

PATCH = 16
PATCH_PADDING = 2
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def grid_size(input_hw: tuple[int, int]) -> tuple[int, int]:
    """Token grid of the padded 16 x 16 patch embedding (1024 x 768 -> 64 x 48)."""
    return tuple((s + 2 * PATCH_PADDING - PATCH) // PATCH + 1 for s in input_hw)


def resize_pos_embed(pos_embed: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a (1, h*w, C) position embedding, in float32 and align_corners=False as mmpretrain."""
    if tuple(src) == tuple(dst):
        return pos_embed
    c = pos_embed.shape[-1]
    grid = pos_embed.reshape(1, src[0], src[1], c).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=dst, mode="bicubic", align_corners=False)
    return grid.flatten(2).transpose(1, 2).to(pos_embed.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.projection = nn.Conv2d(3, dim, PATCH, PATCH, padding=PATCH_PADDING)

    def forward(self, x):
        x = self.projection(x)
        return x.flatten(2).transpose(1, 2), x.shape[-2:]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.GELU()), nn.Linear(hidden, dim))

    def forward(self, x):
        return self.layers(x)


class Block(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        self.ln1 = nn.LayerNorm(arch.embed_dim, eps=1e-6)
        self.attn = Attention(arch.embed_dim, arch.num_heads)
        self.ln2 = nn.LayerNorm(arch.embed_dim, eps=1e-6)
        self.ffn = FFN(arch.embed_dim, arch.mlp_dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class SapiensViT(nn.Module):
    """Pre-norm ViT without cls token; returns the (B, C, h, w) feature map after the final `ln1`."""

    def __init__(self, arch: Arch, pos_grid: tuple[int, int] = (64, 48)):
        super().__init__()
        self.pos_grid = tuple(pos_grid)
        self.patch_embed = PatchEmbed(arch.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_grid[0] * pos_grid[1], arch.embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.layers = nn.ModuleList(Block(arch) for _ in range(arch.depth))
        self.ln1 = nn.LayerNorm(arch.embed_dim, eps=1e-6)

    def forward_tokens(self, x, start: int = 0, stop: int | None = None):
        """Run blocks [start, stop); start=0 takes an image, otherwise tokens from an earlier call."""
        if start == 0:
            x, hw = self.patch_embed(x)
            x = x + resize_pos_embed(self.pos_embed, self.pos_grid, tuple(hw))
        for layer in self.layers[start:stop]:
            x = layer(x)
        return x

    def forward(self, x):
        b, _, h, w = x.shape
        gh, gw = grid_size((h, w))
        x = self.ln1(self.forward_tokens(x))
        return x.transpose(1, 2).reshape(b, -1, gh, gw)


class PointwiseConv(nn.Conv2d):
    """nn.Conv2d(c_in, c_out, 1) computed as one matrix product per image: the same parameters, and in bf16 on
    CPUs faster than oneDNN's 1 x 1 convolution (about a third less time at the 0.3b head's size on a Zen 4)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 1)

    def forward(self, x):
        b, _, h, w = x.shape
        weight = self.weight.flatten(1).expand(b, -1, -1)
        return torch.baddbmm(self.bias[:, None], weight, x.flatten(2)).view(b, -1, h, w)


class HeatmapHead(nn.Module):
    """2 x [deconv 4/2, InstanceNorm, SiLU], 2 x [1x1 conv, InstanceNorm, SiLU], 1x1 conv to K heatmaps (stride 4)."""

    def __init__(self, in_channels: int, num_keypoints: int, channels: int = 768):
        super().__init__()

        def stage(layer):
            return [layer, nn.InstanceNorm2d(channels), nn.SiLU()]

        self.deconv_layers = nn.Sequential(
            *stage(nn.ConvTranspose2d(in_channels, channels, 4, 2, 1, bias=False)),
            *stage(nn.ConvTranspose2d(channels, channels, 4, 2, 1, bias=False)),
        )
        self.conv_layers = nn.Sequential(*stage(PointwiseConv(channels, channels)),
                                         *stage(PointwiseConv(channels, channels)))
        self.final_layer = PointwiseConv(channels, num_keypoints)

    def forward(self, x):
        return self.final_layer(self.conv_layers(self.deconv_layers(x)))


class SapiensPose(nn.Module):
    """Backbone + heatmap head: (B, 3, H, W) normalised image -> (B, K, H/4, W/4) heatmaps."""

    def __init__(self, arch: str, num_keypoints: int, pos_grid: tuple[int, int] = (64, 48),
                 head_channels: int | None = None):
        super().__init__()
        self.arch_name = arch
        self.arch = replace(ARCHS[arch], head_channels=head_channels or ARCHS[arch].head_channels)
        self.backbone = SapiensViT(self.arch, pos_grid)
        self.head = HeatmapHead(self.arch.embed_dim, num_keypoints, self.arch.head_channels)

    @property
    def num_keypoints(self) -> int:
        return self.head.final_layer.out_channels

    def forward(self, x):
        return self.head(self.backbone(x))

    def config(self) -> dict:
        return {"arch": self.arch_name, **asdict(self.arch), "num_keypoints": self.num_keypoints,
                "pos_grid": list(self.backbone.pos_grid)}


def arch_name_for(embed_dim: int, depth: int) -> str:
    """The registered architecture with this backbone width and depth (the head's width is the model's own)."""
    for name, a in ARCHS.items():
        if a.embed_dim == embed_dim and a.depth == depth:
            return name
    known = ", ".join(f"{n} ({a.embed_dim} x {a.depth})" for n, a in ARCHS.items())
    raise KeyError(f"no architecture with embedding width {embed_dim} and depth {depth}; known: {known}")

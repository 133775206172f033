"""Scaled dot-product attention for the ViT blocks, by the kernel that is fastest for the device and dtype.

PyTorch's CPU flash kernel (`_scaled_dot_product_flash_attention_for_cpu`) runs bf16 attention far below the
CPU's bf16 matrix-multiply rate (issue 12: ~130 GFLOP/s against 700-830 on a 2-core Zen 5), and attention is
half of the 0.3b's work at 1024 x 768 (3072 tokens). `blocked_attention` spends the same arithmetic in large
bf16 GEMMs instead, one block of queries at a time:

    S = (Q_block * scale) K^T      bf16 GEMM, fp32 accumulation (S rounded to bf16)
    P = softmax(S)                 computed in fp32 (PyTorch's CPU softmax upcasts bf16), P rounded to bf16
    O_block = P V                  bf16 GEMM, fp32 accumulation

With a few thousand tokens a block's full score rows fit in memory, so no online (flash) softmax is needed.

The choice is a fixed rule per (device, dtype), measured by `benchmarks/detect_speed.py` (which times both kernels
in each precision and prints whether the rule still picks the faster): blocked for bf16 inference on CPUs, PyTorch's
SDPA elsewhere (fp32 on CPU, CUDA, and training, whose backward pass SDPA provides). A rule rather than a timing at
first use keeps the landmarks of a given image, model and precision reproducible from run to run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

QUERY_BLOCK = 128  # queries per block: 16 heads x 128 x 3072 bf16 scores = 12.6 MB at 1024 x 768


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = QUERY_BLOCK) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V for (..., heads, n, d) tensors, `block` queries at a time (no mask, no dropout).

    Returns (..., heads, n, d) like F.scaled_dot_product_attention, as a view of a (..., n, heads, d) buffer so
    that merging the heads afterwards costs no copy.
    """
    *lead, heads, n, d = q.shape
    out = q.new_empty(*lead, n, heads, d).transpose(-3, -2)
    kt, v = k.contiguous().transpose(-2, -1), v.contiguous()  # the heads of a fused qkv are strided views
    scale = d ** -0.5
    for start in range(0, n, block):
        rows = slice(start, start + block)
        scores = torch.matmul(q[..., rows, :] * scale, kt)
        out[..., rows, :] = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out


def use_blocked(q: torch.Tensor) -> bool:
    """The rule: blocked for bf16 inference on CPU (see the module docstring for the measurement behind it)."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and not (torch.is_grad_enabled() and q.requires_grad)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v) (no mask, no dropout) by the kernel the rule picks."""
    if use_blocked(q):
        return blocked_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)

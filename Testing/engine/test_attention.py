"""The blocked attention kernel against PyTorch's SDPA, and the rules that pick kernel and precision."""
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from medsapiens.detectors.heatmap import HeatmapDetector, cpu_has_native_bf16, pick_precision
from medsapiens.models.attention import blocked_attention, use_blocked
from medsapiens.models.sapiens import SapiensPose


def qkv(n, heads=3, d=32, batch=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, heads, n, d, generator=g) * 1.5).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("n", [1, 5, 64, 200, 513])
def test_blocked_matches_sdpa_in_fp32(n):
    q, k, v = qkv(n)
    out = blocked_attention(q, k, v, block=64)  # 200 and 513 end in a partial block
    assert out.shape == q.shape
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("n", [5, 200, 513])
def test_blocked_bf16_error_is_bf16_sized(n):
    """Against an fp64 reference, the bf16 kernel errs about as much as PyTorch's own bf16 SDPA (which keeps the
    scores in fp32): within 3x its mean error, and within a few bf16 steps of the outputs' size at worst."""
    q, k, v = qkv(n)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    q16, k16, v16 = (t.bfloat16() for t in (q, k, v))
    ours = (blocked_attention(q16, k16, v16, block=64).double() - exact).abs()
    theirs = (F.scaled_dot_product_attention(q16, k16, v16).double() - exact).abs()
    assert ours.mean() < 3 * theirs.mean(), (ours.mean(), theirs.mean())
    assert ours.max() < 8 * 2 ** -8 * exact.abs().max(), ours.max()


def test_the_rule_picks_blocked_only_for_bf16_inference_on_cpu():
    q32, _, _ = qkv(8)
    q16 = q32.bfloat16()
    assert use_blocked(q16) and not use_blocked(q32)
    with torch.inference_mode():
        assert use_blocked(q16)
    assert not use_blocked(q16.clone().requires_grad_())  # training: SDPA, which has a backward
    with torch.no_grad():
        assert use_blocked(q16.clone().requires_grad_())


def ops_called(model, x) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x)
    return {e.key for e in prof.key_averages()}


def test_vit_blocks_use_the_kernel_the_rule_picks_and_keep_training_gradients():
    torch.manual_seed(0)
    model = SapiensPose("micro", 4, (8, 6))
    x = torch.randn(1, 3, 128, 96)
    with torch.inference_mode():
        fp32 = ops_called(model.eval(), x)
        out32 = model(x)
        bf16_model = SapiensPose("micro", 4, (8, 6)).eval()
        bf16_model.load_state_dict(model.state_dict())
        bf16_model.bfloat16()
        bf16 = ops_called(bf16_model, x.bfloat16())
        out16 = bf16_model(x.bfloat16()).float()
    assert "aten::scaled_dot_product_attention" in fp32 and "aten::_softmax" not in fp32
    assert "aten::scaled_dot_product_attention" not in bf16 and "aten::_softmax" in bf16
    assert (out16 - out32).abs().max() < 0.05 * out32.abs().max()
    model.train()
    assert "aten::scaled_dot_product_attention" in ops_called(model, x)
    model(x).square().mean().backward()
    assert model.backbone.layers[0].attn.qkv.weight.grad.abs().sum() > 0


def cpuinfo_flags() -> set[str]:
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        pytest.skip("no /proc/cpuinfo to check the CPU's flags against")
    return {f for line in path.read_text().splitlines() if line.startswith("flags") for f in line.split()[2:]}


def test_auto_precision_follows_the_rule():
    """bf16 exactly where the CPU lists native bf16 instructions and bf16 products measure faster; explicit
    precisions are kept; the detector (and so load_detector, whose default is auto) uses the choice."""
    native = bool(cpuinfo_flags() & {"avx512_bf16", "amx_bf16"})
    assert cpu_has_native_bf16() == native
    cpu = torch.device("cpu")
    if native:
        n = 1024
        a, b = torch.randn(n, n), torch.randn(n, n)
        seconds = {}
        for dtype in (torch.float32, torch.bfloat16) * 3:
            x, w = a.to(dtype), b.to(dtype)
            F.linear(x, w)
            t = time.perf_counter()
            F.linear(x, w)
            seconds[dtype] = min(seconds.get(dtype, float("inf")), time.perf_counter() - t)
        expected = "bf16" if seconds[torch.bfloat16] < seconds[torch.float32] else "fp32"
    else:
        expected = "fp32"
    assert pick_precision("auto", cpu) == expected
    assert pick_precision("fp32", cpu) == "fp32" and pick_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        pick_precision("fp16", cpu)
    detector = HeatmapDetector(SapiensPose("micro", 2, (4, 3)), ["a", "b"], (64, 48), device="cpu")
    assert detector.precision == expected
    assert detector.model.head.final_layer.weight.dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[expected]

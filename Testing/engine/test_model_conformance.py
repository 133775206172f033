"""The module tree and parameter shapes of the official Sapiens pose checkpoints, for every official size."""
import pytest
import torch
from medsapiens.models.sapiens import ARCHS, SapiensPose, grid_size

# From the reference (shared/reference/sapiens.md): width, depth, MLP hidden per size.
OFFICIAL = {"sapiens_0.3b": (1024, 24, 4096), "sapiens_0.6b": (1280, 32, 5120),
            "sapiens_1b": (1536, 40, 6144), "sapiens_2b": (1920, 48, 7680)}


def reference_shapes(c, depth, mlp, k):
    shapes = {
        "backbone.patch_embed.projection.weight": (c, 3, 16, 16), "backbone.patch_embed.projection.bias": (c,),
        "backbone.pos_embed": (1, 3072, c), "backbone.ln1.weight": (c,), "backbone.ln1.bias": (c,),
        "head.deconv_layers.0.weight": (c, 768, 4, 4), "head.deconv_layers.3.weight": (768, 768, 4, 4),
        "head.conv_layers.0.weight": (768, 768, 1, 1), "head.conv_layers.0.bias": (768,),
        "head.conv_layers.3.weight": (768, 768, 1, 1), "head.conv_layers.3.bias": (768,),
        "head.final_layer.weight": (k, 768, 1, 1), "head.final_layer.bias": (k,),
    }
    for i in range(depth):
        p = f"backbone.layers.{i}."
        shapes |= {p + "ln1.weight": (c,), p + "ln1.bias": (c,), p + "ln2.weight": (c,), p + "ln2.bias": (c,),
                   p + "attn.qkv.weight": (3 * c, c), p + "attn.qkv.bias": (3 * c,),
                   p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,),
                   p + "ffn.layers.0.0.weight": (mlp, c), p + "ffn.layers.0.0.bias": (mlp,),
                   p + "ffn.layers.1.weight": (c, mlp), p + "ffn.layers.1.bias": (c,)}
    return shapes


@pytest.mark.parametrize("arch", list(OFFICIAL))
def test_state_dict_matches_reference(arch):
    c, depth, mlp = OFFICIAL[arch]
    with torch.device("meta"):
        model = SapiensPose(arch, 308)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == reference_shapes(c, depth, mlp, 308)


def test_grid_and_output_stride():
    assert grid_size((1024, 768)) == (64, 48)
    model = SapiensPose("micro", 5, (16, 12)).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 256, 192)).shape == (1, 5, 64, 48)
        # another input size: the position embedding is resized to the new grid
        assert model(torch.zeros(1, 3, 128, 96)).shape == (1, 5, 32, 24)


def test_parameter_count_of_0_3b():
    with torch.device("meta"):
        model = SapiensPose("sapiens_0.3b", 19)
    backbone = sum(p.numel() for p in model.backbone.parameters())
    assert 300e6 < backbone < 310e6  # ~0.3 b as the name says
    assert ARCHS["sapiens_0.3b"].num_heads == 16

"""LoRA on the backbone's attention through peft, as MedSapiens: qkv rank 4 / alpha 4, proj rank 8 / alpha 8.

MedSapiens (mmpretrain's LoRAModel) stores `backbone.module.layers.{i}.attn.qkv.lora_down.weight` /
`lora_up.weight`; peft calls the same matrices `lora_A` / `lora_B` (scaling alpha / rank = 1 in both), so the
conversion is a renaming. Keys in this module use peft's names without the adapter name:
`backbone.layers.{i}.attn.qkv.lora_A.weight`.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import InputError, describe_mismatch

RANKS = {"qkv": 4, "proj": 8}  # alpha equals the rank
DROPOUT = 0.1
ADAPTER = "default"
_MEDSAPIENS_KEY = re.compile(r"^backbone\.module\.(layers\.\d+\.attn\.(?:qkv|proj))\.lora_(down|up)\.weight$")


def add_lora(model: nn.Module, blocks=None, dropout: float = DROPOUT) -> nn.Module:
    """Wrap `attn.qkv` and `attn.proj` of the backbone's blocks (all, or the indices in `blocks`) with peft LoRA.

    B starts at zero, so the wrapped model computes what it did before.
    """
    from peft import (  # heavy import, only when LoRA is used
        LoraConfig,
        inject_adapter_in_model,
    )

    which = r"\d+" if blocks is None else "|".join(str(int(b)) for b in blocks)
    config = LoraConfig(r=RANKS["qkv"], lora_alpha=RANKS["qkv"], lora_dropout=dropout,
                        target_modules=rf"layers\.({which})\.attn\.(qkv|proj)",
                        rank_pattern={"proj": RANKS["proj"]}, alpha_pattern={"proj": RANKS["proj"]})
    inject_adapter_in_model(config, model.backbone, adapter_name=ADAPTER)
    return model


def has_lora(model: nn.Module) -> bool:
    return any(".lora_A." in k for k in model.state_dict())


def lora_blocks(tensors) -> list[int]:
    """Indices of the blocks that LoRA keys (peft names) refer to."""
    return sorted({int(m.group(1)) for k in tensors if (m := re.search(r"layers\.(\d+)\.attn\..*lora_[AB]", k))})


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA matrices under peft's names, without the adapter name."""
    tag = f".{ADAPTER}."
    return {k.replace(tag, "."): v.detach().clone() for k, v in model.state_dict().items()
            if ".lora_A." in k or ".lora_B." in k}


def load_lora(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load LoRA matrices (peft names) into a model that went through add_lora; every matrix must be given."""
    expected = {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}
    given = {k.replace(".lora_A.", f".lora_A.{ADAPTER}.").replace(".lora_B.", f".lora_B.{ADAPTER}."): v
             for k, v in tensors.items()}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(k for k in set(given) & set(expected) if given[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        shapes = [f"{k} {tuple(given[k].shape)} != {tuple(expected[k].shape)}" for k in wrong]
        raise InputError(describe_mismatch("LoRA weights do not fit the model", missing, unexpected, shapes))
    model.load_state_dict(given, strict=False)


def is_medsapiens_key(key: str) -> bool:
    return _MEDSAPIENS_KEY.match(key) is not None


def from_medsapiens(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MedSapiens `backbone.module...lora_down/up` keys -> peft `backbone...lora_A/B` keys (LoRA keys only)."""
    out = {}
    for k, v in state.items():
        m = _MEDSAPIENS_KEY.match(k)
        if m:
            out[f"backbone.{m.group(1)}.lora_{'A' if m.group(2) == 'down' else 'B'}.weight"] = v
    return out


def to_medsapiens(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of from_medsapiens."""
    out = {}
    for k, v in tensors.items():
        m = re.match(r"^backbone\.(.+)\.lora_([AB])\.weight$", k)
        if m:
            out[f"backbone.module.{m.group(1)}.lora_{'down' if m.group(2) == 'A' else 'up'}.weight"] = v
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base Linear and remove the wrappers (for inference speed)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(adapter_names=[ADAPTER])
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    return model


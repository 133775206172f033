"""How a few-shot fine-tune spends its time budget on this device: LoRA blocks, cached blocks, head width, views.

The MedSapiens recipe (LoRA on every block, the architecture's 768-channel head) takes several seconds a step for
the 0.3b base at 256 x 192, batch 8, on 2 CPU cores (docs/benchmarks.md): a 5-minute budget ends after a few
dozen steps, and such an adapter has learned nothing. So where the recipe cannot make `min_steps` steps within the budget, the plan
measures what one block and one head step cost here, and takes the most LoRA blocks (the last ones) for which
the training views, one pass of the frozen blocks below them per view (cached) and `min_steps` steps fit in
the budget. A head the base does not bring is made narrower until it fits; fewer views per case come last.
On a GPU, and wherever it fits, the recipe stays.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..models.sapiens import Arch, Block, HeatmapHead, grid_size

LORA_CHOICES = (8, 4, 2, 1, 0)     # LoRA blocks tried below "all", most first
HEAD_CHOICES = (256, 128)          # widths tried for a fresh head below the architecture's
MIN_VIEWS_PER_CASE = 16
SHARE_FOR_STEPS = 0.8              # the rest of the budget is kept for the views and their cached tokens
RECIPE_SHARE = 0.5                 # the recipe stays if it makes this share of min_steps (see `choose`)


@dataclass(frozen=True)
class Plan:
    lora_blocks: int            # LoRA on the last N blocks (0: the head alone); the blocks below are cached
    head_channels: int          # the head's width
    views_per_case: int
    step_seconds: float         # estimated seconds per optimiser step (0 where not measured: the recipe)
    view_seconds: float         # estimated seconds per view for its cached tokens

    def describe(self, depth: int) -> str:
        blocks = "every block" if self.lora_blocks >= depth else (
            f"the last {self.lora_blocks} blocks" if self.lora_blocks else "no block (head only)")
        text = f"LoRA on {blocks}, head {self.head_channels} channels, {self.views_per_case} views per case"
        if self.step_seconds:
            text += f"; about {self.step_seconds:.2f} s per step and {self.view_seconds:.2f} s per view here"
        return text


@dataclass(frozen=True)
class Costs:
    """Seconds measured on this device: one block's forward for one view, and one head training step."""
    block_forward: float
    head_step: Callable[[int], float]   # head width -> seconds per step at the training batch


def choose(arch: Arch, fresh_head: bool, cases: int, views_per_case: int, batch: int, budget: float,
           min_steps: int, costs: Costs) -> Plan:
    """The plan for `budget` seconds: the most LoRA blocks, then the widest head, then the most views.

    fresh_head: the head is new (the base brings none), so its width may be chosen. A step with LoRA
    on n blocks costs about 3 x batch x n block forwards (forward and backward) plus the head's step; a view
    costs (depth - n) block forwards once. The recipe stays where it makes at least half of `min_steps`: on
    the small base trained with medsapiens it made 333 steps in 300 s on 2 cores, and caching the lower blocks for more
    steps was measured not to pay (docs/benchmarks.md, "Few-shot choices"). If nothing fits, the
    cheapest plan is returned (the budget then stops it early, and the caller says so).
    """
    depth = arch.depth
    recipe = Plan(depth, arch.head_channels, views_per_case,
                  3 * batch * depth * costs.block_forward + costs.head_step(arch.head_channels), 0.0)
    if RECIPE_SHARE * min_steps * recipe.step_seconds <= SHARE_FOR_STEPS * budget:
        return recipe
    widths = [arch.head_channels] + ([w for w in HEAD_CHOICES if w < arch.head_channels]
                                     if fresh_head else [])
    candidates = []
    for n in [n for n in LORA_CHOICES if n < depth]:  # the recipe (every block) did not fit even half way
        lora_step = 3 * batch * n * costs.block_forward
        if min_steps * lora_step > SHARE_FOR_STEPS * budget and n > 0:
            continue  # too slow whatever the head (whose step is only measured where it may matter)
        for width in widths:
            views = views_per_case
            while True:
                plan = Plan(n, width, views, lora_step + costs.head_step(width), (depth - n) * costs.block_forward)
                candidates.append(plan)
                if (min_steps * plan.step_seconds <= SHARE_FOR_STEPS * budget
                        and cases * views * plan.view_seconds + min_steps * plan.step_seconds <= budget):
                    return plan
                if views // 2 < MIN_VIEWS_PER_CASE:
                    break
                views //= 2
    return min(candidates, key=lambda p: cases * p.views_per_case * p.view_seconds + min_steps * p.step_seconds)


def measure(arch: Arch, input_hw: tuple[int, int], num_keypoints: int, batch: int, device, cache_precision: str,
            train_precision: str) -> Costs:
    """Time one block (per view, from a batch, no gradient, as the cached tokens are made) and a head's training
    step (the training batch; only for the widths a plan asks about)."""
    tokens = grid_size(input_hw)[0] * grid_size(input_hw)[1]
    block = Block(arch).to(device).eval()
    x = torch.randn(batch, tokens, arch.embed_dim, device=device)  # a batch: one view's time is mostly latency
    with torch.no_grad(), _autocast(device, cache_precision):
        block_forward = _fastest(lambda: block(x), device) / batch
    heads: dict[int, float] = {}

    def head_step(width: int) -> float:
        if width not in heads:
            head = HeatmapHead(arch.embed_dim, num_keypoints, width).to(device)
            feats = torch.randn(batch, arch.embed_dim, *grid_size(input_hw), device=device)

            def step():
                with _autocast(device, train_precision):
                    out = head(feats)
                out.float().square().mean().backward()

            heads[width] = _fastest(step, device, repeats=1)
        return heads[width]

    return Costs(block_forward, head_step)


def _autocast(device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _fastest(fn, device, repeats: int = 2) -> float:
    fn()  # warm-up: allocations and kernel selection
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return min(times)

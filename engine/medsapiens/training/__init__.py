"""Few-shot fine-tuning (on top of the atlas, or LoRA adapters on a base) and whole-model training."""
from .loops import FINETUNE_DEFAULTS, Cancelled, FinetuneSettings, Progress, Settings, finetune, train
from .refine import REFINE_DEFAULTS, FinetuneResult, NotBetter, RefineSettings, finetune_on_atlas

__all__ = ["FINETUNE_DEFAULTS", "REFINE_DEFAULTS", "Cancelled", "FinetuneResult", "FinetuneSettings", "NotBetter",
           "Progress", "RefineSettings", "Settings", "finetune", "finetune_on_atlas", "train"]

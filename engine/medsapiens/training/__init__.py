"""Few-shot adapter fine-tuning and whole-model training (specialist, generalist, DDP), with augmentation."""
from .loops import FINETUNE_DEFAULTS, Cancelled, FinetuneSettings, Progress, Settings, finetune, train

__all__ = ["FINETUNE_DEFAULTS", "Cancelled", "FinetuneSettings", "Progress", "Settings", "finetune", "train"]

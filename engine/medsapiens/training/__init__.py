"""Few-shot fine-tuning (on top of the atlas, or LoRA adapters on a base) and whole-model training."""

"""Network definitions and their weights: Sapiens ViT + heatmap head, LoRA, heatmap codec, checkpoint layouts, catalogue."""

"""Small, tested building blocks of the DreamBooth trainer (train_scripts/train_dreambooth_gralora_sdxl.py)."""

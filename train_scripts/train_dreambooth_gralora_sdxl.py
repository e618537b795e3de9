#!/usr/bin/env python
"""DreamBooth training of a GraLoRA adapter for Stable Diffusion XL.

    accelerate launch train_scripts/train_dreambooth_gralora_sdxl.py \
        --pretrained_model_name_or_path=stabilityai/stable-diffusion-xl-base-1.0 \
        --instance_data_dir=dog --instance_prompt="a photo of sks dog" --output_dir=sks-dog \
        --rank=32 --resolution=1024 --train_batch_size=1 --gradient_accumulation_steps=4 \
        --learning_rate=1e-4 --max_train_steps=500 --mixed_precision=bf16

The flags are those of diffusers' train_dreambooth_lora_sdxl.py (``--rank`` is the GraLoRA rank) plus
``--gralora_k``, ``--hybrid_r``, ``--alpha`` and kohya-style extras; ``--help`` lists them. The loop lives in
``gralora_diffusion.training.dreambooth`` (also installed as the ``gralora-train-sdxl`` command).
"""

import sys

from gralora_diffusion.training.dreambooth import main

if __name__ == "__main__":
    sys.exit(main())

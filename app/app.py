#!/usr/bin/env python
"""GraLoRA studio: load several GraLoRA adapters, blend them with sliders, generate.

    python app/app.py --base stabilityai/stable-diffusion-xl-base-1.0 --adapters ./adapters --port 7860
    python app/app.py --adapters ./adapters        # offline toy base, starts on a fresh machine

Also installed as the ``gralora-app`` command. Binds to 127.0.0.1 unless --listen; --share and --auth are opt-in.
The layout is in ``gralora_diffusion.ui``; generation and adapter handling in ``gralora_diffusion.studio``.
"""

from gralora_diffusion.ui import main

if __name__ == "__main__":
    main()

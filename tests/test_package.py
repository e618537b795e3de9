"""Importing the package is cheap and has no side effects."""

from __future__ import annotations

import subprocess
import sys


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


def test_import_loads_neither_torch_nor_peft():
    out = run_python(
        "import sys, gralora_diffusion, gralora_diffusion.world; print('torch' in sys.modules, 'peft' in sys.modules)"
    )
    assert out.split() == ["False", "False"]


def test_no_patching_of_peft_and_no_logging_configuration():
    out = run_python(
        "import logging, gralora_diffusion as gd\n"
        "import gralora_diffusion.training.dreambooth, gralora_diffusion.studio\n"
        "gd.load_gralora_weights, gd.export_lora\n"
        "from peft.tuners.gralora.layer import GraloraLayer, Linear\n"
        "hooks = ('set_scale', 'scale_layer', 'unscale_layer')\n"
        "print(any(hasattr(c, n) for c in (GraloraLayer, Linear) for n in hooks), len(logging.getLogger().handlers))"
    )
    assert out.split() == ["False", "0"]


def test_lazy_names_resolve_to_the_defining_modules():
    import gralora_diffusion as gd

    for name in gd.__all__:
        assert getattr(gd, name) is not None, name
    assert gd.load_gralora_weights.__module__ == "gralora_diffusion.adapters"
    assert gd.GraloraLinear.__module__ == "gralora_diffusion.layers"

"""ComfyUI, from the unmodified snapshot beside the project, for tests: import it on a CPU and build an SDXL model
patcher and CLIP from a state dict in the original single-file layout, with ComfyUI's own code.

ComfyUI only auto-detects published architectures; a tiny SDXL-shaped model is built the way its loader would build
a recognised one (``detect_unet_config`` on the state dict, ``supported_models.SDXL``, the checkpoint's CLIP state
dict converted by ``SDXL.process_clip_state_dict``), with the toy's sizes given where ComfyUI hard-codes SDXL's.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types
from pathlib import Path

import pytest
import torch


def _snapshot() -> Path:
    """$GRALORA_COMFYUI, else ``shared/third_party/ComfyUI`` beside the repository (this project's layout)."""
    if os.environ.get("GRALORA_COMFYUI"):
        return Path(os.environ["GRALORA_COMFYUI"])
    return Path(__file__).resolve().parents[2] / "shared" / "third_party" / "ComfyUI"


SNAPSHOT = _snapshot()
NEEDED = ("einops", "torchsde", "scipy", "sentencepiece", "psutil", "yaml", "aiohttp", "alembic", "sqlalchemy")


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """An empty ``torchvision`` package: ComfyUI imports it at import time for models SDXL does not use, and the
    torchvision wheels for this CPU torch fail to load."""

    def find_spec(self, name, path, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def import_comfyui():
    """ComfyUI's ``comfy`` package (``--cpu``), or skip the test when the snapshot or its packages are missing."""
    if not (SNAPSHOT / "comfy" / "sd.py").exists():
        pytest.skip(f"no ComfyUI snapshot at {SNAPSHOT} (set GRALORA_COMFYUI)")
    for name in NEEDED:
        pytest.importorskip(name, reason="ComfyUI's packages are not installed (.ci/run installs them)")
    if "comfy.sd" not in sys.modules:
        # transformers and diffusers decide once whether torchvision is installed: let them decide before the
        # stand-in exists, and remove it once ComfyUI has imported (its modules keep their references to it).
        import diffusers  # noqa: F401
        from transformers.utils import import_utils

        import_utils.is_torchvision_available()
        stand_in = None
        try:
            import torchvision  # noqa: F401
        except Exception:
            sys.modules.pop("torchvision", None)
            stand_in = _TorchvisionStandIn()
            sys.meta_path.insert(0, stand_in)
        sys.path.insert(0, str(SNAPSHOT))
        argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
        try:
            import comfy.options

            comfy.options.enable_args_parsing()
            import comfy.lora  # noqa: F401
            import comfy.model_detection  # noqa: F401
            import comfy.model_patcher  # noqa: F401
            import comfy.sd  # noqa: F401
            import comfy.supported_models  # noqa: F401
            import comfy.utils  # noqa: F401
        finally:
            sys.argv = argv
            if stand_in is not None:
                sys.meta_path.remove(stand_in)
                for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
                    del sys.modules[name]
    return sys.modules["comfy"]


def clip_config(encoder) -> dict:
    """ComfyUI's CLIP config for a transformers CLIP text encoder (its hidden size, depth, vocabulary)."""
    c = encoder.config
    return {
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers,
        "vocab_size": c.vocab_size,
        "projection_dim": getattr(c, "projection_dim", c.hidden_size),
        "hidden_act": c.hidden_act,
    }


def comfy_sdxl(state_dict: dict[str, torch.Tensor], pipe, head_channels: int):
    """(ModelPatcher, CLIP) built by ComfyUI from an SDXL state dict in the original layout."""
    comfy = import_comfyui()
    state_dict = dict(state_dict)  # ComfyUI's loaders pop what they take
    cpu = torch.device("cpu")
    prefix = "model.diffusion_model."
    unet_config = comfy.model_detection.detect_unet_config(state_dict, prefix)
    unet_config["num_head_channels"] = head_channels  # SDXL's 64 is hard-coded where the toy's heads are smaller
    model_config = comfy.supported_models.SDXL(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model(state_dict, prefix, device=cpu)
    model.load_model_weights(state_dict, prefix)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    options = {
        "clip_l_model_config": clip_config(pipe.text_encoder),
        "clip_g_model_config": clip_config(pipe.text_encoder_2),
        "load_device": cpu,
        "offload_device": cpu,
        "initial_device": cpu,
        "dtype": torch.float32,
    }
    clip = comfy.sd.CLIP(model_config.clip_target(state_dict=state_dict), model_options=options)
    missing, unexpected = clip.load_sd(model_config.process_clip_state_dict(state_dict), full_model=True)
    return patcher, clip, unet_config, (missing, unexpected)

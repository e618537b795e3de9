"""Shared fixtures: the toy SDXL pipeline (fresh per test: tests change it) and read-only adapter files made on it
(once per session). Helper functions live in helpers.py."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*requires torchvision.*")

from helpers import make_adapter_file  # noqa: E402

from gralora_diffusion.toy import build_toy_sd15_pipeline, build_toy_sdxl_pipeline  # noqa: E402


@pytest.fixture
def sdxl():
    """A fresh toy SDXL pipeline (seed 0) per test."""
    return build_toy_sdxl_pipeline(0)


@pytest.fixture
def sd15():
    return build_toy_sd15_pipeline(0)


@pytest.fixture(scope="session")
def adapter_files(tmp_path_factory):
    """Two SDXL adapters: 'a' on UNet + both text encoders, 'b' on the UNet only (k=4, rank 16). Read-only, shared
    by the whole session."""
    folder = tmp_path_factory.mktemp("adapters")
    a = make_adapter_file(folder / "a.safetensors", seed=1)
    b = make_adapter_file(folder / "b.safetensors", seed=2, rank=16, gralora_k=4, text_encoders=())
    return a, b

"""The ``gralora`` command line, run in-process (plus one run of the installed console script)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import explicit_gralora_delta, make_adapter_file, text_out, unet_out
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import gralora_diffusion as gd
from gralora_diffusion import cli
from gralora_diffusion.toy import build_toy_sd15_pipeline, build_toy_sdxl_pipeline, toy_sdxl_base_dir


@pytest.fixture(autouse=True)
def toy_cache(tmp_path_factory, monkeypatch):
    """The toy base that commands use without --base, built once per test session outside the user's cache."""
    cache = tmp_path_factory.getbasetemp() / "toy-cache"
    monkeypatch.setenv("GRALORA_DIFFUSION_CACHE", str(cache))
    return cache


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """``gralora ARGV`` in-process: (exit status, stdout, stderr); argparse's own exits count too."""
    capsys.readouterr()  # drop what the test's own setup printed
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def parse_table(text: str) -> dict[str, dict]:
    """The per-component lines ``export`` prints: component, layers, rank, relative error, worst layer."""
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0] in ("unet", "text_encoder", "text_encoder_2"):
            layers, rank, error, worst = int(parts[1]), parts[2], float(parts[3]), float(parts[4])
            rows[parts[0]] = {"layers": layers, "rank": rank, "error": error, "worst": worst}
    return rows


# --- export ------------------------------------------------------------------------------------------------------


def test_export_prints_the_rank_and_the_error_of_each_component(adapter_files, tmp_path, capsys):
    a, _ = adapter_files  # r=8, k=2 on the UNet and both text encoders
    out = tmp_path / "a-r4.safetensors"
    code, stdout, err = run(["export", str(a), "--to", "diffusers", "--rank", "4", "-o", str(out)], capsys)
    assert code == 0 and err == ""
    rows = parse_table(stdout)
    adapter, lora = gd.read_adapter(a), load_file(str(out))
    assert set(rows) == set(adapter.components)
    for component, row in rows.items():
        cfg, sd = adapter.configs[component], adapter.state_dicts[component]
        num = den = 0.0
        for module in adapter.module_names(component):
            delta = explicit_gralora_delta(sd[f"{module}.gralora_A"], sd[f"{module}.gralora_B"], cfg.alpha / cfg.r)
            a_ = lora[f"{component}.{module}.lora_A.weight"].double()
            b_ = lora[f"{component}.{module}.lora_B.weight"].double()
            num, den = num + ((delta - b_ @ a_) ** 2).sum().item(), den + (delta**2).sum().item()
        assert row["rank"] == "4" and row["layers"] == len(adapter.module_names(component))
        assert row["error"] == pytest.approx(math.sqrt(num / den), rel=2e-3)  # printed with 4 significant digits
        assert row["error"] <= row["worst"]
    assert f"wrote {out} (diffusers layout)" in stdout


def test_export_exact_kohya_prints_the_lossless_rank(adapter_files, tmp_path, capsys):
    a, _ = adapter_files
    out = tmp_path / "a-kohya.safetensors"
    code, stdout, _ = run(["export", str(a), "--to", "kohya", "--exact", "-o", str(out)], capsys)
    assert code == 0
    rows = parse_table(stdout)
    assert {c: r["rank"] for c, r in rows.items()} == {"unet": "16", "text_encoder": "16", "text_encoder_2": "16"}
    assert all(r["error"] < 1e-5 for r in rows.values())
    # the recorded toy id resolves through the base registry to the saved toy SDXL, whose UNet names the blocks
    assert re.search(r"UNet blocks named for \S*toy-sdxl-seed0\)", stdout)
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
        assert f.metadata()["ss_network_dim"] == "16"
    assert all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in keys)


# --- bad input ---------------------------------------------------------------------------------------------------


def _lora_file(tmp_path: Path, adapter: Path) -> list[str]:
    path = tmp_path / "plain_lora.safetensors"
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 4), "unet.x.lora_B.weight": torch.zeros(4, 2)}, str(path))
    return ["export", str(path), "--exact"]


def _pickle_file(tmp_path: Path, adapter: Path) -> list[str]:
    path = tmp_path / "adapter.ckpt"
    path.write_bytes(b"not to be unpickled")
    return ["export", str(path), "--exact"]


def _garbage_file(tmp_path: Path, adapter: Path) -> list[str]:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x00" * 5)
    return ["export", str(path), "--exact"]


def _sd15_adapter(tmp_path: Path) -> Path:
    path = tmp_path / "sd15.safetensors"
    return make_adapter_file(path, seed=3, text_encoders=(), pipeline_builder=build_toy_sd15_pipeline)


def _sd3_adapter(tmp_path: Path) -> Path:
    from gralora_diffusion.toy import build_toy_sd3_pipeline

    path = tmp_path / "sd3.safetensors"
    return make_adapter_file(path, seed=3, text_encoders=(), pipeline_builder=build_toy_sd3_pipeline)


BAD_INPUT = {
    "a LoRA, not GraLoRA": (_lora_file, "is a LoRA adapter, not GraLoRA"),
    "a pickle file": (_pickle_file, "reads only .safetensors"),
    "a broken file": (_garbage_file, "is not a readable safetensors file"),
    "rank 0": (lambda t, a: ["export", str(a), "--rank", "0"], "--rank must be a positive integer"),
    "rank above the layer": (lambda t, a: ["export", str(a), "--rank", "33"], "is larger than"),
    "energy above 1": (lambda t, a: ["export", str(a), "--energy", "1.5"], "--energy must be in (0, 1]"),
    "no method": (lambda t, a: ["export", str(a)], "Choose exactly one of --rank N, --energy F or --exact"),
    "comfyui with a method": (
        lambda t, a: ["export", str(a), "--to", "comfyui", "--exact"],
        "writes the GraLoRA factors as they are",
    ),
    "comfyui for SD3": (
        lambda t, a: ["export", str(_sd3_adapter(t)), "--to", "comfyui"],
        "exists for SD 1.x and SDXL only, not sd3",
    ),
    "comfyui to another base": (
        lambda t, a: ["export", str(_sd15_adapter(t)), "--to", "comfyui", "--base", str(toy_sdxl_base_dir())],
        "trained on another base model",
    ),
    "output is the input": (lambda t, a: ["export", str(a), "--exact", "-o", str(a)], "is the adapter itself"),
    "export to another base": (
        lambda t, a: ["export", str(_sd15_adapter(t)), "--exact", "--to", "kohya", "--base", str(toy_sdxl_base_dir())],
        "trained on another base model",
    ),
    "merge into another base": (lambda t, a: ["merge", str(_sd15_adapter(t))], "trained on another base model"),
    "merge a missing file": (lambda t, a: ["merge", str(t / "missing.safetensors")], "does not exist"),
    "merge from a missing base": (lambda t, a: ["merge", "--base", str(t / "no-base"), str(a)], "does not exist"),
    "generate with another base's adapter": (
        lambda t, a: ["generate", "--adapter", str(_sd15_adapter(t)), "--prompt", "a dog"],
        "trained on another base model",
    ),
    "generate with a bad size": (
        lambda t, a: ["generate", "--adapter", str(a), "--prompt", "a dog", "--size", "60"],
        "multiple of 8",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_gets_one_line_and_writes_nothing(case, adapter_files, tmp_path, capsys, monkeypatch):
    make_args, expected = BAD_INPUT[case]
    a, _ = adapter_files
    args = make_args(tmp_path, a)
    command = args[0]
    output = {"export": tmp_path / "out" / "lora.safetensors", "merge": tmp_path / "out" / "merged",
              "generate": tmp_path / "out" / "image.png"}[command]  # fmt: skip
    if "-o" not in args:
        args += ["-o", str(output)]
    output.parent.mkdir(exist_ok=True)

    def no_model_load(*_, **__):
        raise AssertionError("the base model was loaded before the input was checked")

    monkeypatch.setattr(cli, "_load_pipeline", no_model_load)
    before = sorted(tmp_path.rglob("*"))
    code, stdout, stderr = run(args, capsys)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], stderr
    assert list(output.parent.iterdir()) == []  # no output, no temporary file
    assert sorted(tmp_path.rglob("*")) == before


# --- merge -------------------------------------------------------------------------------------------------------


def test_merge_saves_a_plain_pipeline_equal_to_the_fused_one(adapter_files, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    a, b = adapter_files
    out = tmp_path / "merged"
    code, stdout, _ = run(["merge", f"{a}:0.7", f"{b}:-0.4", "-o", str(out)], capsys)  # default base: the toy
    assert code == 0 and f"into {out}" in stdout
    merged = StableDiffusionXLPipeline.from_pretrained(out)
    assert not list(gd.layers.gralora_layers(merged.unet)) and not hasattr(merged.unet, "peft_config")
    assert all(p.suffix != ".bin" for p in out.rglob("*"))  # safetensors only
    record = json.loads((out / "gralora_merge.json").read_text())
    assert [(x["file"], x["weight"]) for x in record["adapters"]] == [("a.safetensors", 0.7), ("b.safetensors", -0.4)]

    fused = build_toy_sdxl_pipeline(0)
    gd.load_gralora_weights(fused, a)
    gd.load_gralora_weights(fused, b)
    gd.set_gralora_adapters(fused, ["a", "b"], [0.7, -0.4])
    gd.fuse_gralora(fused)
    base = build_toy_sdxl_pipeline(0)
    assert (unet_out(fused) - unet_out(base)).abs().max() > 1e-2
    assert (unet_out(merged) - unet_out(fused)).abs().max() <= 1e-5
    for te in ("text_encoder", "text_encoder_2"):
        assert (text_out(fused, te) - text_out(base, te)).abs().max() > 1e-2
        assert (text_out(merged, te) - text_out(fused, te)).abs().max() <= 1e-5


# --- generate ----------------------------------------------------------------------------------------------------


def test_generate_takes_unset_settings_from_the_base(tmp_path, capsys, monkeypatch):
    from gralora_diffusion import bases

    out = tmp_path / "out.png"
    code, _, _ = run(["generate", "--prompt", "a red circle", "--seed", "1", "-o", str(out)], capsys)
    assert code == 0
    params = Image.open(out).info["parameters"]
    assert "Size: 64x64" in params and "CFG scale: 5" in params and "Steps: 25" in params  # the toy SDXL's own
    monkeypatch.setitem(bases._BASE_DEFAULTS, "toy", {"guidance_scale": 3.0, "steps": 2})  # as toy-world has
    code, _, _ = run(["generate", "--base", "toy", "--prompt", "a red circle", "--steps", "3", "-o", str(out)], capsys)
    params = Image.open(out).info["parameters"]
    assert code == 0 and "CFG scale: 3" in params and "Steps: 3" in params  # a given flag wins


def test_generate_writes_the_pipelines_image_and_its_settings(adapter_files, tmp_path, capsys):
    a, b = adapter_files
    out = tmp_path / "out.png"
    argv = ["generate", "--adapter", f"{a}:0.7", "--adapter", f"{b}:-0.5", "--prompt", "a photo of sks dog",
            "--steps", "2", "--seed", "11", "--guidance_scale", "4.5", "-o", str(out)]  # fmt: skip
    code, stdout, _ = run(argv, capsys)
    assert code == 0 and f"wrote {out}" in stdout
    image = Image.open(out)
    params = image.info["parameters"]
    assert params.startswith("a photo of sks dog\n")
    for part in ("Steps: 2", "CFG scale: 4.5", "Seed: 11", "Size: 64x64", "Model: toy-sdxl", "Sampler: Euler",
                 "a:unet=0.7/text_encoder=0.7/text_encoder_2=0.7", "b:unet=-0.5"):  # fmt: skip
        assert part in params
    record = json.loads(image.info["gralora"])
    assert record["seed"] == 11 and record["base"] == "toy-sdxl" and record["adapters"]["b"] == {"unet": -0.5}

    pipe = build_toy_sdxl_pipeline(0)  # the same image made directly with the public API and diffusers
    gd.load_gralora_weights(pipe, a)
    gd.load_gralora_weights(pipe, b)
    gd.set_gralora_adapters(pipe, ["a", "b"], [0.7, -0.5])
    gd.fuse_gralora(pipe)
    expected = pipe(
        "a photo of sks dog", num_inference_steps=2, guidance_scale=4.5, width=64, height=64,
        generator=torch.Generator().manual_seed(11),
    ).images[0]  # fmt: skip
    difference = np.abs(np.asarray(image.convert("RGB"), dtype=int) - np.asarray(expected, dtype=int))
    assert difference.max() <= 1


# --- inspect -----------------------------------------------------------------------------------------------------


@pytest.fixture
def described_adapter(tmp_path):
    return make_adapter_file(
        tmp_path / "sks.safetensors", seed=5, rank=8, gralora_k=2, hybrid_r=2, text_encoders=("text_encoder",),
        metadata={"trigger_prompt": "a photo of sks dog", "steps": "750"},
    )  # fmt: skip


def test_inspect_json_describes_the_file(described_adapter, capsys):
    code, stdout, _ = run(["inspect", str(described_adapter), "--json"], capsys)
    assert code == 0
    info = json.loads(stdout)
    with safe_open(str(described_adapter), "pt") as f:
        header = f.metadata()
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    configs = json.loads(header["gralora_config"])
    assert info["size_bytes"] == os.path.getsize(described_adapter)
    assert info["parameters"] == sum(math.prod(s) for s in shapes.values())
    assert (info["base_model"], info["trigger_prompt"], info["steps"]) == (
        "gralora-diffusion/toy-sdxl",
        "a photo of sks dog",
        "750",
    )
    assert set(info["components"]) == {"unet", "text_encoder"}
    for component, c in info["components"].items():
        modules = {k.split(".", 1)[1].rsplit(".gralora_", 1)[0] for k in shapes if k.startswith(f"{component}.")}
        assert c["target_modules"] == len(modules)
        assert (
            (c["r"], c["k"], c["alpha"], c["hybrid_r"])
            == (8, 2, 16, 2)
            == tuple(configs[component][key] for key in ("r", "gralora_k", "alpha", "hybrid_r"))
        )
        assert c["parameters"] == sum(math.prod(s) for k, s in shapes.items() if k.startswith(f"{component}."))
        assert c["exact_lora_rank"] == 2 * 8 + 2


def test_inspect_text_names_everything_a_person_asks_for(described_adapter, capsys):
    code, stdout, _ = run(["inspect", str(described_adapter)], capsys)
    assert code == 0
    assert "base model: gralora-diffusion/toy-sdxl" in stdout
    assert "trigger prompt: a photo of sks dog" in stdout and "training steps: 750" in stdout
    unet_line = next(line for line in stdout.splitlines() if line.strip().startswith("unet"))
    assert "r=8 k=2 alpha=16 hybrid_r=2" in unet_line and "lossless LoRA rank 18" in unet_line


# --- help and the console script -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command,flags",
    [
        ("export", ["--to", "--rank", "--energy", "--exact", "--output", "--base", "--dtype"]),
        ("merge", ["ADAPTER[:WEIGHT]", "--base", "--output"]),
        ("generate", ["--adapter", "--prompt", "--seed", "--steps", "--guidance_scale", "--size", "--base"]),
        ("inspect", ["--json"]),
    ],
)
def test_every_subcommand_has_help(command, flags, capsys):
    code, stdout, _ = run([command, "--help"], capsys)
    assert code == 0 and stdout.startswith(f"usage: gralora {command}")
    assert all(flag in stdout for flag in flags)


def test_the_console_script_runs(described_adapter, toy_cache):
    script = Path(sys.executable).parent / "gralora"
    env = {**os.environ, "GRALORA_DIFFUSION_CACHE": str(toy_cache)}
    result = subprocess.run([str(script), "inspect", str(described_adapter), "--json"], capture_output=True,
                            text=True, env=env, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == cli.adapter_summary(described_adapter)

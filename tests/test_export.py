"""LoRA export and the gralora command line, checked against diffusers' own LoRA loader and dense deltas."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys

import pytest
import torch
from conftest import explicit_gralora_delta, make_adapter_file, text_out, unet_out
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import gralora_diffusion as gd
from gralora_diffusion import cli
from gralora_diffusion.export import diffusers_to_sgm, export_lora
from gralora_diffusion.toy import build_toy_sdxl_pipeline, save_toy_sdxl_pipeline


@pytest.fixture
def wide_adapter(tmp_path):
    """r=16, k=4 on the wide UNet preset and both text encoders: exact rank 64, capped at 32 on the text encoders."""
    return make_adapter_file(tmp_path / "wide.safetensors", seed=4, rank=16, gralora_k=4, unet_targets="unet-wide",
                             b_scale=0.2)  # fmt: skip


def gralora_pipe(path, weight=1.0):
    pipe = build_toy_sdxl_pipeline(0)
    gd.load_gralora_weights(pipe, path)
    gd.set_gralora_adapters(pipe, [path.stem], weight)
    return pipe


def lora_pipe(path, caplog):
    pipe = build_toy_sdxl_pipeline(0)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(path))
    problems = [r.getMessage() for r in caplog.records if "unexpected" in r.getMessage().lower()]
    assert not problems, problems
    return pipe


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_exact_export_reproduces_outputs_in_diffusers(wide_adapter, tmp_path, caplog, layout):
    out = tmp_path / f"{layout}.safetensors"
    reports = export_lora(wide_adapter, out, layout, exact=True)
    assert all(r.relative_error < 1e-5 for r in reports)
    assert {r.component: r.rank_text for r in reports} == {
        "unet": "64",
        "text_encoder": "32",
        "text_encoder_2": "32",
    }
    ours, theirs = gralora_pipe(wide_adapter), lora_pipe(out, caplog)
    assert (unet_out(ours) - unet_out(theirs)).abs().max() <= 1e-4
    for te in ("text_encoder", "text_encoder_2"):
        assert (text_out(ours, te) - text_out(theirs, te)).abs().max() <= 1e-4


def test_truncated_export_reports_the_error_it_makes(wide_adapter, tmp_path):
    out = tmp_path / "r4.safetensors"
    reports = {r.component: r for r in export_lora(wide_adapter, out, "diffusers", rank=4)}
    lora = load_file(str(out))
    adapter = gd.read_adapter(wide_adapter)
    for component, report in reports.items():
        cfg = adapter.configs[component]
        sd = adapter.state_dicts[component]
        num = den = 0.0
        for module in adapter.module_names(component):
            delta = explicit_gralora_delta(sd[f"{module}.gralora_A"], sd[f"{module}.gralora_B"], cfg.alpha / cfg.r)
            a = lora[f"{component}.{module}.lora_A.weight"].double()
            b = lora[f"{component}.{module}.lora_B.weight"].double()
            assert a.shape[0] == 4
            num += ((delta - b @ a) ** 2).sum().item()
            den += (delta**2).sum().item()
        assert report.relative_error == pytest.approx(math.sqrt(num / den), rel=1e-4)
        assert 0.05 < report.relative_error < 1  # truncation at rank 4 of a rank-32+ delta loses something real


def test_energy_export_keeps_the_asked_share(wide_adapter, tmp_path):
    reports = export_lora(wide_adapter, tmp_path / "e.safetensors", "diffusers", energy=0.9)
    for r in reports:
        assert r.relative_error <= math.sqrt(0.1) + 1e-6  # 90% of the energy kept per layer -> error <= sqrt(0.1)
        assert max(r.ranks) < 64


def test_kohya_names_map_back_to_every_adapted_module(wide_adapter, tmp_path):
    out = tmp_path / "k.safetensors"
    export_lora(wide_adapter, out, "kohya", exact=True)
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    adapter = gd.read_adapter(wide_adapter)
    expected = set()
    for module in adapter.module_names("unet"):
        expected.add("lora_unet_" + diffusers_to_sgm(module, layers_per_block=1).replace(".", "_"))
    for component, prefix in (("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        expected |= {prefix + m.replace(".", "_") for m in adapter.module_names(component)}
    assert {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys} == expected
    for name in expected:
        down, up, alpha = (tensors[f"{name}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha"))
        assert alpha.item() == down.shape[0] == up.shape[1]
    assert any(k.startswith("lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q") for k in keys)
    assert any(k.startswith("lora_unet_output_blocks_0_1_") for k in keys) and any("middle_block_1" in k for k in keys)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)


def test_sgm_mapping_matches_sdxl_layout():
    assert diffusers_to_sgm("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 2).startswith(
        "input_blocks.4.1."
    )
    assert diffusers_to_sgm("down_blocks.2.attentions.1.proj_in", 2) == "input_blocks.8.1.proj_in"
    assert (
        diffusers_to_sgm("mid_block.attentions.0.transformer_blocks.3.ff.net.2", 2)
        == "middle_block.1.transformer_blocks.3.ff.net.2"
    )
    assert diffusers_to_sgm("up_blocks.0.attentions.2.transformer_blocks.9.attn2.to_out.0", 2).startswith(
        "output_blocks.2.1."
    )
    assert diffusers_to_sgm("up_blocks.1.attentions.0.proj_out", 2) == "output_blocks.3.1.proj_out"


# --- the command line -------------------------------------------------------------------------------------------


def test_cli_export_prints_ranks_and_errors(wide_adapter, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert cli.main(["export", str(wide_adapter), "--to", "kohya", "--rank", "8", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "unet" in printed and "rank 8" in printed and "relative error" in printed and out.exists()


@pytest.mark.parametrize(
    "args,match",
    [
        (["--rank", "0"], "--rank must be at least 1"),
        (["--rank", "4096"], "is larger than"),
    ],
)
def test_cli_export_bad_rank(wide_adapter, tmp_path, capsys, args, match):
    out = tmp_path / "bad.safetensors"
    assert cli.main(["export", str(wide_adapter), *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0]
    assert list(tmp_path.glob("bad*")) == [] and list(tmp_path.glob(".bad*")) == []


def test_cli_export_refuses_a_lora_file(tmp_path, capsys):
    lora = tmp_path / "plain_lora.safetensors"
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 4)}, str(lora))
    assert cli.main(["export", str(lora), "--exact", "-o", str(tmp_path / "o.safetensors")]) == 2
    assert "is a LoRA adapter, not GraLoRA" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_merge_equals_the_fused_pipeline(tmp_path, adapter_files):
    from diffusers import StableDiffusionXLPipeline

    a, b = adapter_files
    base = save_toy_sdxl_pipeline(tmp_path / "base")
    out = tmp_path / "merged"
    assert cli.main(["merge", "--base", str(base), f"{a}:0.7", f"{b}:-0.4", "-o", str(out)]) == 0
    merged = StableDiffusionXLPipeline.from_pretrained(out)
    assert not list(gd.layers.gralora_layers(merged.unet))  # a plain pipeline, no adapter code needed
    fused = build_toy_sdxl_pipeline(0)
    gd.load_gralora_weights(fused, a)
    gd.load_gralora_weights(fused, b)
    gd.set_gralora_adapters(fused, ["a", "b"], [0.7, -0.4])
    gd.fuse_gralora(fused)
    assert (unet_out(merged) - unet_out(fused)).abs().max() <= 1e-5
    assert (text_out(merged) - text_out(fused)).abs().max() <= 1e-5


def test_cli_merge_with_another_base_fails_cleanly(tmp_path, capsys):
    sd15_adapter = make_adapter_file(
        tmp_path / "sd15.safetensors", seed=3, text_encoders=(), pipeline_builder=gd.toy.build_toy_sd15_pipeline
    )
    base = save_toy_sdxl_pipeline(tmp_path / "base")
    out = tmp_path / "merged"
    assert cli.main(["merge", "--base", str(base), str(sd15_adapter), "-o", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "trained on another base model" in err[0]  # (other stderr lines: diffusers' loading)
    assert not out.exists() and not list(tmp_path.glob(".merged*"))


def test_cli_generate_writes_settings_into_the_png(tmp_path, adapter_files, monkeypatch):
    a, b = adapter_files
    monkeypatch.setenv("GRALORA_DIFFUSION_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out.png"
    code = cli.main(
        ["generate", "--adapter", f"{a}:0.7", "--adapter", f"{b}:-0.5", "--prompt", "a photo of sks dog",
         "--steps", "2", "--seed", "11", "-o", str(out)]
    )  # fmt: skip
    assert code == 0
    params = Image.open(out).info["parameters"]
    assert "Steps: 2" in params and "Seed: 11, Size: 64x64" in params
    assert "a:unet=0.7/text_encoder=0.7/text_encoder_2=0.7" in params and "b:unet=-0.5" in params


def test_cli_inspect_json(wide_adapter, capsys):
    assert cli.main(["inspect", str(wide_adapter), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["components"]["unet"]["r"] == 16 and info["components"]["unet"]["k"] == 4
    assert info["parameters"] == gd.read_adapter(wide_adapter).num_parameters()
    assert info["base_model"] == "gralora-diffusion/toy-sdxl"


def test_console_script_help_on_every_subcommand():
    for sub in ("export", "merge", "generate", "inspect"):
        result = subprocess.run(
            [sys.executable, "-m", "gralora_diffusion.cli", sub, "--help"], capture_output=True, text=True
        )
        assert result.returncode == 0 and f"usage: gralora {sub}" in result.stdout

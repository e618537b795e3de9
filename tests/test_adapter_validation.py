"""Damaged adapter files never get through: one table of cases, each refused with one sentence by the API and by the
``gralora`` command, with the pipeline unchanged and nothing written.

Each case rewrites a valid adapter with ``safetensors`` directly (bypassing the package's writer, as another tool
or a damaged disk would) and names the part of the message that says what is wrong.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import assert_same_snapshot, snapshot, unet_out
from safetensors import safe_open
from safetensors.torch import save_file

import gralora_diffusion as gd
from gralora_diffusion import cli
from gralora_diffusion.io import check_tensor_values
from gralora_diffusion.toy import build_toy_sdxl_pipeline


def _first(tensors, suffix):
    return next(k for k in tensors if k.endswith(suffix))


def nan_in_b(tensors, config):
    tensors[_first(tensors, ".gralora_B")][0, 0, 0] = float("nan")


def inf_in_a(tensors, config):
    tensors[_first(tensors, ".gralora_A")][0, 0, 0] = float("-inf")


def int_tensor(tensors, config):
    key = _first(tensors, ".gralora_A")
    tensors[key] = tensors[key].round().to(torch.int32)


def bool_tensor(tensors, config):
    key = _first(tensors, ".gralora_B")
    tensors[key] = tensors[key] > 0


def alpha_string(tensors, config):
    config["unet"]["alpha"] = "16"


def alpha_nan(tensors, config):
    config["unet"]["alpha"] = math.nan  # json writes NaN, and Python's json reads it back


def alpha_negative(tensors, config):
    config["text_encoder"]["alpha"] = -16


def null_component_config(tensors, config):
    config["text_encoder_2"] = None


def config_not_an_object(tensors, config):
    config.clear()
    config["__list__"] = True


def rank_zero(tensors, config):
    config["unet"]["r"] = 0


def rank_float(tensors, config):
    config["unet"]["r"] = 8.0


def k_not_dividing_r(tensors, config):
    config["unet"]["gralora_k"] = 3


def dropout_out_of_range(tensors, config):
    config["unet"]["gralora_dropout"] = 1.5


CASES = {
    "nan_in_b": (nan_in_b, "holds NaN or infinite values"),
    "inf_in_a": (inf_in_a, "holds NaN or infinite values"),
    "int_tensor": (int_tensor, "is torch.int32, not floating point"),
    "bool_tensor": (bool_tensor, "is torch.bool, not floating point"),
    "alpha_string": (alpha_string, "alpha='16', which must be a positive finite number"),
    "alpha_nan": (alpha_nan, "alpha=nan, which must be a positive finite number"),
    "alpha_negative": (alpha_negative, "alpha=-16, which must be a positive finite number"),
    "null_component_config": (null_component_config, "'text_encoder_2' is NoneType, not an object"),
    "config_not_an_object": (config_not_an_object, "is not a JSON object"),
    "rank_zero": (rank_zero, "r=0, which must be a positive integer"),
    "rank_float": (rank_float, "r=8.0, which must be a positive integer"),
    "k_not_dividing_r": (k_not_dividing_r, "not divisible by gralora_k=3"),
    "dropout_out_of_range": (dropout_out_of_range, "gralora_dropout=1.5, which must be a number in [0, 1)"),
}


@pytest.fixture(scope="module")
def damaged(adapter_files, tmp_path_factory):
    """Case name -> a damaged copy of adapter 'a' (UNet and both text encoders)."""
    folder = tmp_path_factory.mktemp("damaged")
    with safe_open(str(adapter_files[0]), "pt") as f:
        original = {k: f.get_tensor(k) for k in f.keys()}
        header = dict(f.metadata())
    files = {}
    for name, (damage, _) in CASES.items():
        tensors = {k: v.clone() for k, v in original.items()}
        config = json.loads(header["gralora_config"])
        damage(tensors, config)
        payload = [] if "__list__" in config else config
        path = folder / f"{name}.safetensors"
        save_file(tensors, str(path), metadata={**header, "gralora_config": json.dumps(payload)})
        files[name] = path
    return files


@pytest.mark.parametrize("case", list(CASES))
def test_the_api_refuses_with_one_sentence_and_changes_nothing(case, damaged, adapter_files, sdxl):
    _, expected = CASES[case]
    gd.load_gralora_weights(sdxl, adapter_files[1])  # something loaded and active, which must stay so
    gd.set_gralora_adapters(sdxl, "b", 0.7)
    before, out_before = snapshot(sdxl), unet_out(sdxl)
    with pytest.raises(gd.AdapterFileError) as err:
        gd.load_gralora_weights(sdxl, damaged[case])
    message = str(err.value)
    assert expected in message and damaged[case].name in message and "\n" not in message
    assert_same_snapshot(before, snapshot(sdxl))
    assert torch.equal(unet_out(sdxl), out_before)


@pytest.mark.parametrize("case", ["nan_in_b", "alpha_string", "null_component_config", "int_tensor"])
@pytest.mark.parametrize("command", ["inspect", "export", "merge"])
def test_the_command_refuses_with_one_line_and_writes_nothing(case, command, damaged, tmp_path, capsys):
    out = tmp_path / "out"
    argv = {
        "inspect": ["inspect", "--json", str(damaged[case])],
        "export": ["export", str(damaged[case]), "--exact", "-o", str(out / "lora.safetensors")],
        "merge": ["merge", str(damaged[case]), "-o", str(out / "merged")],
    }[command]
    capsys.readouterr()
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 2
    assert CASES[case][1] in captured.err and len(captured.err.strip().splitlines()) == 1
    assert "Traceback" not in captured.err and captured.out == ""
    assert not out.exists() or not any(out.rglob("*"))


def test_an_adapter_built_by_hand_is_checked_too(adapter_files):
    adapter = gd.read_adapter(adapter_files[1])
    key = next(iter(adapter.state_dicts["unet"]))
    adapter.state_dicts["unet"][key] = torch.full_like(adapter.state_dicts["unet"][key], float("inf"))
    pipe = build_toy_sdxl_pipeline(0)
    with pytest.raises(gd.AdapterFileError, match="holds NaN or infinite values"):
        gd.load_gralora_weights(pipe, adapter)
    assert gd.get_gralora_adapters(pipe) == {}
    with pytest.raises(gd.AdapterFileError, match="holds NaN or infinite values"):
        gd.save_adapter_file(adapter_files[1].parent / "never.safetensors", adapter)  # nothing non-finite is written
    assert not (adapter_files[1].parent / "never.safetensors").exists()
    check_tensor_values(gd.read_adapter(adapter_files[0]))  # the intact file passes

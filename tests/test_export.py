"""LoRA export, checked against diffusers' own LoRA loaders, dense deltas computed here and SVDs of them."""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import contextmanager

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from helpers import explicit_gralora_delta, make_adapter_file, text_out, unet_out
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file

import gralora_diffusion as gd
from gralora_diffusion import export
from gralora_diffusion.bases import resolve_base
from gralora_diffusion.export import SDXL_UNET_CONFIG, ExportError, SgmNaming, export_lora, kohya_module_name
from gralora_diffusion.families import UNET_WIDE as UNET_WIDE_TARGETS
from gralora_diffusion.names import resolve_module_name
from gralora_diffusion.toy import build_toy_sd15_pipeline, build_toy_sdxl_pipeline

# Every kind of linear layer of an SDXL UNet: attention blocks, resnet time projections, time / added embeddings.
ALL_UNET_LINEARS = [*UNET_WIDE_TARGETS, "time_emb_proj", "linear_1", "linear_2"]
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def hybrid_adapter(tmp_path_factory):
    """r=8, k=4, hybrid_r=4 on every UNet linear and both text encoders: lossless rank 36, capped at 32 on the
    32-wide layers, so one component mixes ranks 32 and 36. Read-only, shared by the module."""
    return make_adapter_file(
        tmp_path_factory.mktemp("hybrid") / "hybrid.safetensors",
        seed=4, rank=8, gralora_k=4, hybrid_r=4, unet_targets=ALL_UNET_LINEARS,
        b_scale=0.2,
    )  # fmt: skip


@contextmanager
def diffusers_messages():
    """Everything diffusers logs (its logger does not propagate, so caplog would miss it) and every Python warning."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield records
        records += [str(w.message) for w in caught if "torchvision" not in str(w.message)]
    finally:
        logger.removeHandler(handler)


def gralora_pipe(path, builder=build_toy_sdxl_pipeline):
    pipe = builder(0)
    gd.load_gralora_weights(pipe, path)
    return pipe


def lora_pipe(path, builder=build_toy_sdxl_pipeline):
    """The toy pipeline with the LoRA file loaded by diffusers' own ``load_lora_weights``; fails on any warning."""
    pipe = builder(0)
    with diffusers_messages() as messages:
        pipe.load_lora_weights(str(path))
    assert messages == []
    return pipe


def dense_pipe(lora: dict[str, torch.Tensor], modules: dict[str, tuple[str, str]] | None = None):
    """The toy pipeline with every LoRA delta of a file added to its plain weights (no LoRA code involved).

    Diffusers-layout keys name their module; kohya keys are looked up in ``modules`` (kohya name -> (component,
    module)) and scaled by alpha / rank.
    """
    pipe = build_toy_sdxl_pipeline(0)
    for key in [k for k in lora if k.endswith(("lora_A.weight", "lora_down.weight"))]:
        if key.endswith("lora_A.weight"):
            component, module = key.removesuffix(".lora_A.weight").split(".", 1)
            a, b, scale = lora[key], lora[key.replace("lora_A", "lora_B")], 1.0
        else:
            name = key.removesuffix(".lora_down.weight")
            component, module = modules[name]
            a, b = lora[key], lora[f"{name}.lora_up.weight"]
            scale = lora[f"{name}.alpha"].item() / a.shape[0]
        named = dict(getattr(pipe, component).named_modules())
        with torch.no_grad():
            named[resolve_module_name(named, module)].weight += (scale * b.double() @ a.double()).float()
    return pipe


def toy_unet_config():
    return build_toy_sdxl_pipeline(0).unet.config


def reference_delta(adapter, component: str, module: str) -> torch.Tensor:
    """The dense GraLoRA delta of one layer, written out block by block in tests/helpers.py (not PEFT's code)."""
    cfg, sd = adapter.configs[component], adapter.state_dicts[component]
    return explicit_gralora_delta(
        sd[f"{module}.gralora_A"],
        sd[f"{module}.gralora_B"],
        cfg.alpha / (cfg.r + cfg.hybrid_r),
        sd.get(f"{module}.gralora_A_general.weight"),
        sd.get(f"{module}.gralora_B_general.weight"),
    )


def layer_sizes(adapter, component: str, module: str) -> tuple[int, int]:
    a, b = adapter.state_dicts[component][f"{module}.gralora_A"], adapter.state_dicts[component][f"{module}.gralora_B"]
    return a.shape[0] * a.shape[1], b.shape[0] * b.shape[2]


def kohya_file_modules(lora: dict[str, torch.Tensor], unet_config, pipeline_cls=StableDiffusionXLPipeline):
    """Component -> diffusers module names of a kohya file, as diffusers' own kohya converter reads them."""
    converted, _ = pipeline_cls.lora_state_dict(dict(lora), unet_config=unet_config)
    out = {}
    for component in ("unet", *TEXT_ENCODERS):
        part = {k.removeprefix(f"{component}."): v for k, v in converted.items() if k.startswith(f"{component}.")}
        if not part:
            continue
        if component == "unet":
            peft_sd = convert_unet_state_dict_to_peft(part)
        else:
            peft_sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        out[component] = {k.rsplit(".lora_", 1)[0] for k in peft_sd}
    return out


def assert_same_outputs(reference, other, base=None, tol: float = 1e-4) -> None:
    for name, fn in (("unet", unet_out), *((te, lambda p, te=te: text_out(p, te)) for te in TEXT_ENCODERS)):
        ref = fn(reference)
        if base is not None:  # the adapter must change the output by far more than the tolerance
            assert (ref - fn(base)).abs().max() > 100 * tol, f"{name}: the adapter changes nothing measurable"
        assert (ref - fn(other)).abs().max() <= tol, name


# --- exact export -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_exact_export_reproduces_the_adapter_in_diffusers(hybrid_adapter, tmp_path, layout):
    out = tmp_path / f"{layout}.safetensors"
    result = export_lora(hybrid_adapter, out, layout, exact=True, base=resolve_base("toy"))
    adapter = gd.read_adapter(hybrid_adapter)
    for report in result.components:
        cfg = adapter.configs[report.component]
        expected = [
            min(cfg.gralora_k * cfg.r + cfg.hybrid_r, *layer_sizes(adapter, report.component, m))
            for m in adapter.module_names(report.component)
        ]
        assert report.ranks == expected
        assert report.relative_error < 1e-5 and report.worst_layer_error < 1e-5
    assert {r.component: set(r.ranks) for r in result.components} == {
        "unet": {32, 36},
        "text_encoder": {32},
        "text_encoder_2": {32},
    }
    assert_same_outputs(gralora_pipe(hybrid_adapter), lora_pipe(out), base=build_toy_sdxl_pipeline(0))


# --- truncated export ------------------------------------------------------------------------------------------


def test_truncated_export_reports_the_error_it_makes(hybrid_adapter, tmp_path):
    out = tmp_path / "r4.safetensors"
    reports = {r.component: r for r in export_lora(hybrid_adapter, out, "diffusers", rank=4).components}
    lora = load_file(str(out))
    adapter = gd.read_adapter(hybrid_adapter)
    for component, report in reports.items():
        num = den = best = 0.0
        worst = 0.0
        for module in adapter.module_names(component):
            delta = reference_delta(adapter, component, module)
            a = lora[f"{component}.{module}.lora_A.weight"].double()
            b = lora[f"{component}.{module}.lora_B.weight"].double()
            assert a.shape[0] == b.shape[1] == 4
            err, norm = ((delta - b @ a) ** 2).sum().item(), (delta**2).sum().item()
            num, den, worst = num + err, den + norm, max(worst, math.sqrt(err / norm))
            best += (torch.linalg.svdvals(delta)[4:] ** 2).sum().item()  # Eckart-Young: the best rank-4 error
        assert report.relative_error == pytest.approx(math.sqrt(num / den), rel=1e-4)
        assert report.worst_layer_error == pytest.approx(worst, rel=1e-4)
        assert num == pytest.approx(best, rel=1e-3)  # the truncation is the optimal one
        assert 0.05 < report.relative_error < 1  # rank 4 of a rank-32+ delta loses something real


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_energy_export_picks_ranks_by_energy_and_loads_as_written(hybrid_adapter, tmp_path, layout):
    out = tmp_path / f"e-{layout}.safetensors"
    result = export_lora(hybrid_adapter, out, layout, energy=0.9, base=resolve_base("toy"))
    lora = load_file(str(out))
    adapter = gd.read_adapter(hybrid_adapter)
    for report in result.components:
        for module, rank in zip(adapter.module_names(report.component), report.ranks):
            energy = torch.linalg.svdvals(reference_delta(adapter, report.component, module)) ** 2
            kept = torch.cumsum(energy, 0) / energy.sum()
            assert rank == int((kept < 0.9 - 1e-9).sum()) + 1  # the smallest rank keeping 90% of the energy
        assert report.relative_error <= math.sqrt(0.1) + 1e-6
        assert len(set(report.ranks)) > 1  # mixed ranks: the per-layer scale must survive loading
    naming = SgmNaming.from_unet_config(toy_unet_config())
    modules = {
        kohya_module_name(component, module, naming): (component, module)
        for component in adapter.components
        for module in adapter.module_names(component)
    }
    assert_same_outputs(dense_pipe(lora, modules), lora_pipe(out), base=build_toy_sdxl_pipeline(0))


def test_diffusers_metadata_gives_every_layer_scale_one(hybrid_adapter, tmp_path):
    """diffusers builds its LoraConfig from ``lora_adapter_metadata`` when present (older diffusers mis-scale
    mixed-rank files without alphas); injected by PEFT, that config must give each layer the file's rank and scale 1,
    on CLIP with and without the ``text_model`` wrapper."""
    import json

    out = tmp_path / "e.safetensors"
    export_lora(hybrid_adapter, out, "diffusers", energy=0.9)
    with safe_open(str(out), "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
        lora = {k: f.get_tensor(k) for k in f.keys()}
    pipe = build_toy_sdxl_pipeline(0)
    assert not hasattr(pipe.text_encoder, "text_model") and hasattr(pipe.text_encoder_2, "text_model")
    for component in ("unet", *TEXT_ENCODERS):
        kwargs = {k.removeprefix(f"{component}."): v for k, v in metadata.items() if k.startswith(f"{component}.")}
        model = getattr(pipe, component)
        inject_adapter_in_model(LoraConfig(**kwargs), model)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
        file_ranks = {
            k.removeprefix(f"{component}.").removesuffix(".lora_A.weight"): v.shape[0]
            for k, v in lora.items()
            if k.startswith(f"{component}.") and k.endswith("lora_A.weight")
        }
        assert len(layers) == len(file_ranks)
        for name, layer in layers.items():
            canonical = name if component == "unet" or name.startswith("text_model.") else f"text_model.{name}"
            assert layer.r["default"] == file_ranks[canonical]
            assert layer.scaling["default"] == 1.0


# --- kohya names -------------------------------------------------------------------------------------------------


def test_kohya_keys_map_back_to_every_adapted_module(hybrid_adapter, tmp_path):
    out = tmp_path / "k.safetensors"
    export_lora(hybrid_adapter, out, "kohya", rank=8, base=resolve_base("toy"))
    lora = load_file(str(out))
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in lora}
    for name in names:
        down, up, alpha = (lora[f"{name}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha"))
        assert alpha.item() == down.shape[0] == up.shape[1] == 8  # alpha equals rank
    assert all(n.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for n in names)
    # The toy UNet has layers_per_block=1: down_blocks.1.attentions.0 is SGM input block 1 + 2*1 + 0 = 3.
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_output_blocks_0_0_emb_layers_1" in names and "lora_unet_label_emb_0_0" in names
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj" in names
    adapter = gd.read_adapter(hybrid_adapter)
    read_back = kohya_file_modules(lora, toy_unet_config())
    assert read_back == {c: set(adapter.module_names(c)) for c in adapter.components}
    assert len(names) == sum(len(adapter.module_names(c)) for c in adapter.components)


def sdxl_unet_on_meta():
    """SDXL's UNet (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json) with no weights."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10), down_block_types=SDXL_UNET_CONFIG["down_block_types"],
            up_block_types=SDXL_UNET_CONFIG["up_block_types"], attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )  # fmt: skip


def test_sgm_names_on_sdxl_round_trip_through_diffusers_kohya_converter():
    unet = sdxl_unet_on_meta()
    naming = SgmNaming.from_unet_config(unet.config)
    assert naming == SgmNaming.from_unet_config(SDXL_UNET_CONFIG)
    expected = {  # SDXL's original UNet layout, as in kohya SDXL LoRAs
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks_4_1_transformer_blocks_0_attn1_to_q",  # noqa: E501
        "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2": "input_blocks_8_1_transformer_blocks_9_ff_net_2",
        "mid_block.attentions.0.proj_in": "middle_block_1_proj_in",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": "output_blocks_0_1_transformer_blocks_0_attn2_to_k",
        "up_blocks.1.attentions.2.proj_out": "output_blocks_5_1_proj_out",
        "down_blocks.0.resnets.0.time_emb_proj": "input_blocks_1_0_emb_layers_1",
        "mid_block.resnets.1.time_emb_proj": "middle_block_2_emb_layers_1",
        "up_blocks.2.resnets.2.time_emb_proj": "output_blocks_8_0_emb_layers_1",
        "add_embedding.linear_1": "label_emb_0_0",
        "time_embedding.linear_2": "time_embed_2",
    }
    for module, name in expected.items():
        assert kohya_module_name("unet", module, naming) == f"lora_unet_{name}"
    linears = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    lora = {}
    for module in linears:
        key = kohya_module_name("unet", module, naming)
        lora.update({f"{key}.lora_down.weight": torch.zeros(1, 2), f"{key}.lora_up.weight": torch.zeros(2, 1)})
        lora[f"{key}.alpha"] = torch.tensor(1.0)
    assert kohya_file_modules(lora, unet.config) == {"unet": linears}  # all 743 linear layers of SDXL's UNet
    missing = (
        "down_blocks.0.attentions.0.proj_in",
        "down_blocks.1.attentions.2.proj_in",
        "up_blocks.3.resnets.0.time_emb_proj",
    )
    for module in missing:
        with pytest.raises(export.NotInUNetLayout):
            naming.name(module)


def test_sd15_kohya_export_keeps_diffusers_block_names(tmp_path):
    """kohya's SD 1.x LoRAs use diffusers' UNet names and ``lora_te_``; the toy SD 1.5 adapter's recorded base
    selects that naming, and diffusers' SD 1.5 kohya loader reproduces the adapter."""
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "time_emb_proj", "linear_1"]
    path = make_adapter_file(tmp_path / "sd15.safetensors", seed=3, text_encoders=("text_encoder",),
                             unet_targets=targets, b_scale=0.2, pipeline_builder=build_toy_sd15_pipeline)  # fmt: skip
    out = tmp_path / "sd15-kohya.safetensors"
    result = export_lora(path, out, "kohya", exact=True, base=resolve_base(gd.read_adapter(path).base_model))
    assert "toy-sd15" in result.unet_naming
    lora = load_file(str(out))
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in lora
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in lora
    ours, theirs = gralora_pipe(path, build_toy_sd15_pipeline), lora_pipe(out, build_toy_sd15_pipeline)
    base = build_toy_sd15_pipeline(0)
    assert (unet_out(ours) - unet_out(base)).abs().max() > 1e-2
    assert (unet_out(ours) - unet_out(theirs)).abs().max() <= 1e-4
    assert (text_out(ours) - text_out(theirs)).abs().max() <= 1e-4


def _sd15_width_pipeline(seed: int = 0):
    """The toy SD 1.5 pipeline with SD 1.5's text width: a 768-wide text encoder and cross-attention reading it."""
    from transformers import CLIPTextModel

    from gralora_diffusion.toy import _text_encoder_config, _toy_unet

    pipe = build_toy_sd15_pipeline(seed)
    torch.manual_seed(seed)
    pipe.unet = _toy_unet(cross_attention_dim=768)
    torch.manual_seed(seed + 1)
    vocab = pipe.text_encoder.config.vocab_size
    pipe.text_encoder = CLIPTextModel(_text_encoder_config(vocab, projection=False, width=768, layers=2))
    return pipe


def test_kohya_export_without_a_readable_base_tells_sd1_by_the_cross_attention_width(tmp_path):
    """No --base and a recorded base that cannot be read: an adapter whose cross-attention reads SD 1.x's 768-wide
    text embedding is named as kohya's SD 1.x LoRAs (diffusers' block names, ``lora_te_``), not by SDXL's layout, and
    diffusers' SD 1.5 kohya loader reproduces it."""
    from gralora_diffusion.export import family_from_tensors

    path = make_adapter_file(
        tmp_path / "sd15.safetensors", seed=3, text_encoders=("text_encoder",), b_scale=0.2,
        pipeline_builder=_sd15_width_pipeline, metadata={"base_model": "nowhere/sd15"},
    )  # fmt: skip
    assert family_from_tensors(gd.read_adapter(path)) == "sd1"
    out = tmp_path / "sd15-kohya.safetensors"
    result = export_lora(path, out, "kohya", exact=True)
    assert result.unet_naming.startswith("SD 1.x / 2.x")
    lora = load_file(str(out))
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.alpha" in lora
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in lora
    assert not any(key.startswith(("lora_te1_", "lora_unet_input_blocks")) for key in lora)
    ours, theirs = gralora_pipe(path, _sd15_width_pipeline), lora_pipe(out, _sd15_width_pipeline)
    assert (unet_out(ours) - unet_out(_sd15_width_pipeline(0))).abs().max() > 1e-2
    assert (text_out(ours) - text_out(_sd15_width_pipeline(0))).abs().max() > 1e-2  # two layers: [-2] is adapted
    assert (unet_out(ours) - unet_out(theirs)).abs().max() <= 1e-4
    assert (text_out(ours) - text_out(theirs)).abs().max() <= 1e-4


def test_kohya_export_of_an_sd1_text_encoder_alone_gets_sd1_names(tmp_path, capsys):
    """An adapter on an SD 1.x-width text encoder only, with no readable base: kohya's SD 1.x name ``lora_te_`` (it
    was SDXL's ``lora_te1_``), and diffusers' SD 1.5 kohya loader reproduces the text encoder's output."""
    from gralora_diffusion.export import family_from_tensors
    from gralora_diffusion.io import save_adapter_file

    both = make_adapter_file(
        tmp_path / "both.safetensors", seed=4, text_encoders=("text_encoder",), b_scale=0.2,
        pipeline_builder=_sd15_width_pipeline, metadata={"base_model": "nowhere/sd15"},
    )  # fmt: skip
    adapter = gd.read_adapter(both)
    for part in (adapter.state_dicts, adapter.configs):
        part.pop("unet")
    path = save_adapter_file(tmp_path / "te.safetensors", adapter)
    adapter = gd.read_adapter(path)
    assert set(adapter.components) == {"text_encoder"} and family_from_tensors(adapter) == "sd1"
    out = tmp_path / "te-kohya.safetensors"
    from gralora_diffusion import cli

    capsys.readouterr()
    assert cli.main(["export", str(path), "--to", "kohya", "--exact", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "names for SD 1.x / 2.x (told by the width of the adapter's one text encoder" in printed
    assert "UNet" not in printed  # it adapts no UNet
    lora = load_file(str(out))
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in lora
    assert not any(key.startswith(("lora_te1_", "lora_unet")) for key in lora)
    theirs = _sd15_width_pipeline(0)
    with diffusers_messages() as messages:
        theirs.load_lora_weights(str(out))
    assert all("No LoRA keys associated to UNet2DConditionModel" in m for m in messages)  # none meant for it
    ours = gralora_pipe(path, _sd15_width_pipeline)
    assert (text_out(ours) - text_out(_sd15_width_pipeline(0))).abs().max() > 1e-2
    assert (text_out(ours) - text_out(theirs)).abs().max() <= 1e-4


def test_family_from_tensors_reads_sdxl_and_sd3_and_stays_silent_when_unsure(tmp_path):
    from gralora_diffusion.export import family_from_tensors
    from gralora_diffusion.toy import build_toy_sd3_pipeline

    sdxl = gd.read_adapter(make_adapter_file(tmp_path / "xl.safetensors", seed=1))  # both text encoders
    assert family_from_tensors(sdxl) == "sdxl"
    sd3 = gd.read_adapter(make_adapter_file(tmp_path / "sd3.safetensors", seed=1, text_encoders=(),
                                            pipeline_builder=build_toy_sd3_pipeline))  # fmt: skip
    assert family_from_tensors(sd3) == "sd3"
    toy_unet_only = gd.read_adapter(make_adapter_file(tmp_path / "u.safetensors", seed=1, text_encoders=()))
    assert family_from_tensors(toy_unet_only) is None  # a 64-wide toy cross-attention is no published base's
    from gralora_diffusion.io import AdapterFile

    def cross_attention_reading(width: int, k: int = 2, r: int = 4) -> AdapterFile:
        module = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
        tensors = {f"{module}.gralora_A": torch.zeros(k, width // k, r), f"{module}.gralora_B": torch.zeros(k, r, 8)}
        return AdapterFile(state_dicts={"unet": tensors}, configs={})

    # SDXL's two encoders side by side, SD 2.x's OpenCLIP-H, SD 1.x's CLIP-L, the SDXL refiner's 1280 (not told)
    assert [family_from_tensors(cross_attention_reading(w)) for w in (2048, 1024, 768, 1280)] == [
        "sdxl", "sd1", "sd1", None]  # fmt: skip

    def text_encoder_alone(width: int, projection: str, k: int = 2, r: int = 4) -> AdapterFile:
        module = f"text_model.encoder.layers.0.{projection}"
        tensors = {f"{module}.gralora_A": torch.zeros(k, width // k, r), f"{module}.gralora_B": torch.zeros(k, r, 8)}
        return AdapterFile(state_dicts={"text_encoder": tensors}, configs={})

    # one text encoder alone: CLIP-L's 768 or OpenCLIP-H's 1024 by any projection reading the hidden width; a toy's
    # 32 and a projection reading fc1's 3072 outputs (fc2) tell nothing
    cases = [(768, "self_attn.v_proj"), (1024, "mlp.fc1"), (768, "self_attn.out_proj"), (32, "self_attn.q_proj"),
             (3072, "mlp.fc2")]  # fmt: skip
    assert [family_from_tensors(text_encoder_alone(w, p)) for w, p in cases] == ["sd1", "sd1", "sd1", None, None]


# --- failures --------------------------------------------------------------------------------------------------


def test_a_failed_write_leaves_no_file(hybrid_adapter, tmp_path, monkeypatch):
    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_lora(hybrid_adapter, tmp_path / "out" / "lora.safetensors", "diffusers", rank=2)
    assert list((tmp_path / "out").iterdir()) == []


def test_kohya_export_refuses_a_module_outside_the_unet_layout(tmp_path):
    """An SD 1.5-shaped adapter recorded with no readable base falls back to SDXL's layout, which has no attention
    in its first down block: refused with a pointer to --base, nothing written."""
    path = make_adapter_file(
        tmp_path / "sd15.safetensors", seed=3, text_encoders=(), pipeline_builder=build_toy_sd15_pipeline,
        metadata={"base_model": "nowhere/sd15"},
    )  # fmt: skip
    adapter = gd.read_adapter(path)
    renamed = {k.replace("down_blocks.1.", "down_blocks.0."): v for k, v in adapter.state_dicts["unet"].items()}
    adapter.state_dicts["unet"] = renamed
    with pytest.raises(ExportError, match=r"does not exist in the UNet of SDXL.*pass the adapter's base model"):
        export_lora(adapter, tmp_path / "k.safetensors", "kohya", exact=True)
    assert not (tmp_path / "k.safetensors").exists()


@pytest.fixture(scope="module")
def conv_adapter(tmp_path_factory):
    """r=4, k=2, hybrid_r=2 on the attention projections and every ResNet block's conv1 / conv2 (LoCon-style)."""
    return make_adapter_file(
        tmp_path_factory.mktemp("conv") / "conv.safetensors",
        seed=6, rank=4, gralora_k=2, hybrid_r=2, unet_targets="unet-attention-conv", b_scale=0.2,
    )  # fmt: skip


# without --base the kernels come from diffusers' UNet layout (kohya needs the base for the toy's block names anyway)
@pytest.mark.parametrize("layout,with_base", [("diffusers", True), ("diffusers", False), ("kohya", True)])
def test_exact_export_of_convolutions_is_a_locon_diffusers_loads(conv_adapter, tmp_path, layout, with_base):
    out = tmp_path / f"{layout}.safetensors"
    base = resolve_base("toy") if with_base else None
    result = export_lora(conv_adapter, out, layout, exact=True, base=base)
    assert max(r.relative_error for r in result.components) < 1e-5
    lora = load_file(out)
    downs = {k: v for k, v in lora.items() if k.endswith(("lora_A.weight", "lora_down.weight")) and "unet" in k}
    convs = {k: v for k, v in downs.items() if v.ndim == 4}
    conv1 = [k for k in downs if "conv1" in k or "in_layers" in k]
    assert conv1 and len(convs) == 2 * len(conv1)  # conv1 and conv2 of every ResNet block, and nothing else
    for key, down in convs.items():
        up = lora[key.replace("lora_A", "lora_B").replace("lora_down", "lora_up")]
        assert down.shape[2:] == (3, 3) and up.shape[2:] == (1, 1) and up.shape[1] == down.shape[0]
    reference = gralora_pipe(conv_adapter)
    assert (unet_out(reference) - unet_out(build_toy_sdxl_pipeline(0))).abs().max() > 1e-2
    torch.testing.assert_close(unet_out(lora_pipe(out)), unet_out(reference), atol=1e-4, rtol=1e-4)

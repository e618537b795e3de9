"""GraLoRA on 2-D convolutions (``GraloraConv2d``, LoCon-style) against an explicit computation: the paper's block
delta built by hand (``explicit_gralora_delta``) over the conv weight flattened to [out, in * kh * kw], applied with
``F.conv2d``."""

from __future__ import annotations

import pytest
import torch
from helpers import apply_explicit_blend, make_adapter_file, unet_out
from peft import GraloraConfig
from torch import nn

import gralora_diffusion as gd
from gralora_diffusion.config import GraloraConfigError, check_gralora_fits, make_gralora_config
from gralora_diffusion.layers import GraloraConv2d, base_scaling, inject_gralora, set_adapter_weight
from gralora_diffusion.toy import build_toy_sdxl_pipeline


class OneConv(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


def random_adapter(conv: nn.Conv2d, r: int = 4, k: int = 2, seed: int = 0) -> OneConv:
    """``conv`` in a model with one GraLoRA adapter whose A and B are both random (B is not zero)."""
    torch.manual_seed(seed)
    model = OneConv(conv)
    config = GraloraConfig(r=r, alpha=2 * r, gralora_k=k, target_modules=["conv"])
    config.init_weights = False
    inject_gralora(model, config)
    return model


def explicit_forward(layer: GraloraConv2d, x: torch.Tensor, weights: dict[str, float]) -> torch.Tensor:
    """conv2d with the base weight plus each adapter's hand-built delta (differentiable in A, B and x)."""
    from helpers import explicit_gralora_delta

    base = layer.get_base_layer()
    weight = base.weight.double()
    for name, w in weights.items():
        ag, bg = layer.gralora_A_general[name], layer.gralora_B_general[name]
        delta = explicit_gralora_delta(layer.gralora_A[name], layer.gralora_B[name], w * base_scaling(layer, name),
                                       getattr(ag, "weight", None), getattr(bg, "weight", None))  # fmt: skip
        weight = weight + delta.reshape(weight.shape)
    return nn.functional.conv2d(x.double(), weight, base.bias.double(), base.stride, base.padding, base.dilation)


@pytest.mark.parametrize(
    "c_in,c_out,kernel,stride,padding,dilation,r,k,hybrid_r",
    [
        (8, 12, 3, 1, 1, 1, 4, 2, 0),  # a ResNet block's 3x3 convolution
        (16, 8, 3, 2, 1, 1, 8, 4, 2),  # strided (a downsampler), k = 4, hybrid
        (12, 6, 1, 1, 0, 1, 2, 2, 0),  # 1x1 (a shortcut)
        (8, 8, (3, 1), 1, (2, 0), 2, 4, 2, 0),  # non-square kernel, dilation
    ],
)
@pytest.mark.parametrize("lean", [False, True], ids=["stored", "recomputed"])
def test_forward_and_gradients_equal_the_explicit_block_delta(c_in, c_out, kernel, stride, padding, dilation, r, k,
                                                              hybrid_r, lean):  # fmt: skip
    """Both forwards: the default (the k*r-channel intermediate stored for backward) and the memory-lean one (the
    trainer's --gralora_recompute: recomputed in a hand-written backward)."""
    from gralora_diffusion.layers import use_memory_lean_training

    torch.manual_seed(0)
    model = OneConv(nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation))
    for name, hybrid in (("a", hybrid_r), ("b", 0)):
        config = GraloraConfig(r=r, alpha=2 * r, gralora_k=k, hybrid_r=hybrid, target_modules=["conv"])
        config.init_weights = False
        inject_gralora(model, config, name)
    layer = model.conv
    assert type(layer) is GraloraConv2d
    assert use_memory_lean_training(model, lean) == lean and layer.recompute_intermediate == lean
    layer.set_adapter(["a", "b"])
    weights = {"a": 0.8, "b": -0.5}
    for name, w in weights.items():
        set_adapter_weight(layer, name, w)
    x = torch.randn(2, c_in, 9, 11)

    def run(fn):
        xg = x.clone().requires_grad_()
        y = fn(xg)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        layer.zero_grad()
        return y.detach().double(), xg.grad.double(), grads

    y, gx, grads = run(model)
    y_ref, gx_ref, grads_ref = run(lambda xg: explicit_forward(layer, xg, weights))
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_ref.keys() and len(grads) >= 4 + 2 * (hybrid_r > 0)
    for name in grads:
        torch.testing.assert_close(grads[name].double(), grads_ref[name].double(), atol=1e-5, rtol=1e-5)
    assert (y - model.conv.get_base_layer()(x).double()).abs().max() > 1e-3  # the adapters really act


def test_merge_unmerge_and_reweight_a_merged_conv():
    model = random_adapter(nn.Conv2d(8, 8, 3, padding=1), seed=1)
    layer = model.conv
    base_weight = layer.get_base_layer().weight.detach().clone()
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        unmerged = model(x)
        quarter = explicit_forward(layer, x, {"default": 0.25}).float()  # from the unmerged base weight
        layer.merge()
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
        set_adapter_weight(layer, "default", 0.25)  # re-weights the merged delta in place
        torch.testing.assert_close(model(x), quarter, atol=1e-5, rtol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(layer.get_base_layer().weight, base_weight, atol=1e-6, rtol=1e-6)


def test_conv_targets_are_checked_before_anything_changes():
    model = nn.Module()
    model.grouped = nn.Conv2d(8, 8, 3, groups=2)
    model.odd = nn.Conv2d(6, 9, 3)
    model.circular = nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular")
    for target, words in (("grouped", "grouped convolution"), ("odd", "in_channels=6, out_channels=9"),
                          ("circular", "padding_mode='circular'")):  # fmt: skip
        with pytest.raises(GraloraConfigError, match=words):
            check_gralora_fits(model, GraloraConfig(r=4, alpha=8, gralora_k=2, target_modules=[target]))


def test_attention_conv_preset_adapts_every_resnet_convolution_of_the_toy_unet(tmp_path):
    pipe = build_toy_sdxl_pipeline(0)
    config = make_gralora_config(4, "unet-attention-conv")
    names = check_gralora_fits(pipe.unet, config, "unet")
    convs = [n for n, m in pipe.unet.named_modules() if isinstance(m, nn.Conv2d) and n.endswith((".conv1", ".conv2"))]
    assert convs and set(convs) <= set(names)
    assert all(".resnets." in n for n in convs)


def test_a_saved_conv_adapter_loads_blends_and_fuses_like_the_explicit_delta_sum(tmp_path):
    conv = make_adapter_file(
        tmp_path / "conv.safetensors", seed=3, unet_targets="unet-attention-conv", text_encoders=()
    )
    plain = make_adapter_file(tmp_path / "plain.safetensors", seed=4)
    adapter = gd.io.read_adapter(conv)
    recorded = adapter.conv_kernels()  # the kernel is not in the factors' shapes: the file records it
    assert recorded == {("unet", n): (3, 3) for n in adapter.module_names("unet") if n.endswith((".conv1", ".conv2"))}
    assert recorded
    pipe = build_toy_sdxl_pipeline(0)
    gd.load_gralora_weights(pipe, conv, adapter_name="conv")
    gd.load_gralora_weights(pipe, plain, adapter_name="plain")
    gd.set_gralora_adapters(pipe, ["conv", "plain"], [0.6, 0.5])
    reference = build_toy_sdxl_pipeline(0)
    apply_explicit_blend(reference, [(conv, {"unet": 0.6}), (plain, {"unet": 0.5, "text_encoder": 0.5,
                                                                     "text_encoder_2": 0.5})])  # fmt: skip
    expected = unet_out(reference)
    torch.testing.assert_close(unet_out(pipe), expected, atol=1e-5, rtol=1e-5)
    gd.fuse_gralora(pipe)
    torch.testing.assert_close(unet_out(pipe), expected, atol=1e-5, rtol=1e-5)
    gd.unfuse_gralora(pipe)
    gd.unload_gralora_weights(pipe)
    torch.testing.assert_close(unet_out(pipe), unet_out(build_toy_sdxl_pipeline(0)), atol=1e-5, rtol=1e-5)


def test_a_peft_folder_of_a_conv_adapter_is_refused_before_writing(tmp_path):
    conv = make_adapter_file(tmp_path / "conv.safetensors", seed=3, unet_targets="unet-attention-conv")
    with pytest.raises(gd.AdapterFileError, match="PEFT's GraLoRA \\(linear layers only\\) cannot load"):
        gd.export_peft_folder(conv, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_a_conv_forward_backward_dispatches_a_bounded_number_of_operators():
    """A count is deterministic: PEFT's LoRA (LoCon) vs the package's GraLoRA on a 3x3 convolution, equal parameters.
    Measured with torch 2.13 on CPU: LoRA 13 operators (12 of them compute), GraLoRA 30 (15 compute): the extra ones
    are views and the re-layouts of the two small factors and of the k*r-channel intermediate, none activation-sized
    (no copy of x)."""
    import sys
    from pathlib import Path

    from peft import LoraConfig, inject_adapter_in_model

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from measure import OperatorCount

    x = torch.randn(2, 64, 16, 16)
    counts = {}
    for variant in ("lora", "ours"):
        model = OneConv(nn.Conv2d(64, 64, 3, padding=1))
        if variant == "lora":
            inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=["conv"]), model)
        else:
            inject_gralora(model, make_gralora_config(16, ["conv"]))
        model.conv.get_base_layer().requires_grad_(False)
        model(x).sum().backward()  # warm-up
        with OperatorCount(copy_numel=x.numel()) as ops:
            model(x).sum().backward()
        counts[variant] = ops
    lora, ours = counts["lora"], counts["ours"]
    assert ours.compute <= lora.compute + 3, (ours.compute, lora.compute)
    assert ours.total <= 30, ours.total
    assert ours.copies == 0


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward (parameters not counted), each storage once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    y.sum().backward()
    return sum(storages.values())


def test_memory_lean_conv_keeps_only_the_input_the_base_conv_keeps_anyway():
    """A count of bytes: with the k*r-channel intermediate recomputed, the adapted convolution keeps for backward
    exactly what the frozen convolution alone keeps (its input), less than PEFT's LoCon (which stores its r-channel
    intermediate) and less than the default forward."""
    from peft import LoraConfig, inject_adapter_in_model

    from gralora_diffusion.layers import use_memory_lean_training

    x = torch.randn(2, 64, 16, 16, requires_grad=True)
    saved = {}
    for variant in ("base", "lora", "stored", "recomputed"):
        torch.manual_seed(0)
        model = OneConv(nn.Conv2d(64, 64, 3, padding=1))
        if variant == "lora":
            inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=["conv"]), model)
        elif variant != "base":
            inject_gralora(model, make_gralora_config(16, ["conv"]))
            assert use_memory_lean_training(model, variant == "recomputed") == (variant == "recomputed")
        (model.conv if variant == "base" else model.conv.get_base_layer()).requires_grad_(False)
        saved[variant] = _saved_bytes(model, x)
    assert saved["base"] == x.numel() * x.element_size()
    assert saved["recomputed"] == saved["base"] < saved["lora"] < saved["stored"]


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_under_autocast_an_fp32_input_is_cast_once_and_shared_with_the_frozen_layer(kind):
    """Mixed precision: a UNet layer's input is often fp32 (CUDA autocast runs group and layer norms in fp32) and not
    a leaf (autocast caches no cast of it). The layer casts it once, so with --gralora_recompute the adapter keeps at
    most that one bf16 copy (before: the fp32 input, twice its bytes, beside the frozen layer's own bf16 copy)."""
    from gralora_diffusion.layers import use_memory_lean_training

    if kind == "conv":
        shape, make = (2, 32, 8, 8), lambda: nn.Conv2d(32, 32, 3, padding=1)
    else:
        shape, make = (2, 64, 32), lambda: nn.Linear(32, 32)
    leaf = torch.randn(*shape, requires_grad=True)
    saved = {}
    for variant in ("base", "recomputed"):
        torch.manual_seed(0)
        model = OneConv(make())
        if variant == "recomputed":
            inject_gralora(model, make_gralora_config(8, ["conv"]))
            assert use_memory_lean_training(model) == 1
        (model.conv if variant == "base" else model.conv.get_base_layer()).requires_grad_(False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            saved[variant] = _saved_bytes(model, leaf * 1.0)  # fp32, not a leaf
    # A frozen convolution keeps its bf16 input (and weight copy) for backward: the adapter adds nothing. A frozen
    # linear keeps only its weight copy (its weight needs no gradient): the adapter adds the bf16 input, once.
    extra = 0 if kind == "conv" else leaf.numel() * 2
    assert saved["recomputed"] == saved["base"] + extra


def test_memory_lean_conv_under_bf16_autocast_matches_the_stored_forward():
    """The trainer's mixed precision: the recomputing backward reruns the first convolution under the forward's
    autocast state, so the factors' gradients are the default forward's, and the input's agrees to bf16 rounding."""
    from gralora_diffusion.layers import use_memory_lean_training

    x = torch.randn(2, 16, 12, 12)
    results = []
    for lean in (False, True):
        torch.manual_seed(0)
        model = random_adapter(nn.Conv2d(16, 24, 3, stride=2, padding=1), r=8, k=4)
        use_memory_lean_training(model, lean)
        model.conv.get_base_layer().requires_grad_(False)
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(xg)
        assert y.dtype == torch.bfloat16
        y.float().backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
        results.append((y.float(), xg.grad, [p.grad for p in model.parameters() if p.requires_grad]))
    (y0, gx0, g0), (y1, gx1, g1) = results
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1, strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    assert ((gx1 - gx0).abs().max() / gx0.abs().max()).item() < 1e-2


def test_in_channels_must_split_into_k_whole_groups_even_where_the_flattened_size_would():
    model = OneConv(nn.Conv2d(6, 8, (2, 1)))  # in * kh * kw = 12 is divisible by 4, in_channels = 6 is not
    with pytest.raises(ValueError, match="in_channels=6 are not divisible by gralora_k=4"):
        inject_gralora(model, GraloraConfig(r=4, alpha=8, gralora_k=4, target_modules=["conv"]))


def test_an_unbatched_input_works_as_with_nn_conv2d():
    model = random_adapter(nn.Conv2d(8, 8, 3, padding=1), seed=2)
    x = torch.randn(8, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x[None])[0])
        torch.testing.assert_close(model(x), explicit_forward(model.conv, x[None], {"default": 1.0}).float()[0],
                                   atol=1e-5, rtol=1e-5)  # fmt: skip


def sd15_with_conv_projections(seed: int = 0):
    """The toy SD 1.x with 1x1 convolution proj_in / proj_out, as real SD 1.x UNets have (use_linear_projection off)."""
    from diffusers import UNet2DConditionModel

    from gralora_diffusion.toy import build_toy_sd15_pipeline

    pipe = build_toy_sd15_pipeline(seed)
    torch.manual_seed(seed)
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "use_linear_projection": False})
    return pipe


def test_one_by_one_conv_projections_are_recorded_and_export_as_a_locon_diffusers_loads(tmp_path):
    """SD 1.x's wide preset adapts proj_in / proj_out, there 1x1 convolutions: the file records their kernels, so a
    LoRA export without --base writes 4-D factors, and the PEFT-folder export refuses them."""
    from safetensors.torch import load_file

    from gralora_diffusion.export import export_lora

    path = make_adapter_file(tmp_path / "wide.safetensors", seed=7, unet_targets="unet-wide", text_encoders=(),
                             pipeline_builder=sd15_with_conv_projections, b_scale=0.2)  # fmt: skip
    kernels = gd.read_adapter(path).conv_kernels()
    assert kernels and {k for k in kernels.values()} == {(1, 1)}
    assert {m.rsplit(".", 1)[-1] for _, m in kernels} == {"proj_in", "proj_out"}
    with pytest.raises(gd.AdapterFileError, match="PEFT's GraLoRA"):
        gd.export_peft_folder(path, tmp_path / "peft")
    out = tmp_path / "lora.safetensors"
    export_lora(path, out, "diffusers", exact=True)
    lora = load_file(out)
    for _, module in kernels:
        assert lora[f"unet.{module}.lora_A.weight"].ndim == 4 and lora[f"unet.{module}.lora_B.weight"].ndim == 4
    reference = sd15_with_conv_projections(0)
    gd.load_gralora_weights(reference, path)
    other = sd15_with_conv_projections(0)
    other.load_lora_weights(str(out))
    expected = unet_out(reference)
    assert (expected - unet_out(sd15_with_conv_projections(0))).abs().max() > 1e-2
    torch.testing.assert_close(unet_out(other), expected, atol=1e-4, rtol=1e-4)

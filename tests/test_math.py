"""The GraLoRA claims this package relies on, checked on PEFT's layer against independent computations."""

from __future__ import annotations

import pytest
import torch
from helpers import explicit_gralora_delta
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

import gralora_diffusion as gd
from gralora_diffusion.layers import base_scaling


class TwoLinear(nn.Module):
    def __init__(self, d_in: int = 64, d_out: int = 96):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


def gralora_layer(rank=8, k=4, hybrid_r=0, seed=0, d_in=64, d_out=96):
    torch.manual_seed(seed)
    model = TwoLinear(d_in, d_out)
    config = gd.make_gralora_config(rank, ["proj"], gralora_k=k, hybrid_r=hybrid_r, init_weights=False)
    gd.add_gralora_adapter(model, config)
    return model, model.proj


def layer_tensors(layer, name="default"):
    a_g = layer.gralora_A_general[name]
    b_g = layer.gralora_B_general[name]
    return (
        layer.gralora_A[name].detach(),
        layer.gralora_B[name].detach(),
        getattr(a_g, "weight", None),
        getattr(b_g, "weight", None),
    )


@pytest.mark.parametrize("k,hybrid_r", [(2, 0), (4, 0), (2, 4)])
def test_delta_equals_difference_of_outputs(k, hybrid_r):
    model, layer = gralora_layer(rank=8, k=k, hybrid_r=hybrid_r)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        adapted = layer(x)
        base = layer.get_base_layer()(x)
    a, b, ag, bg = layer_tensors(layer)
    delta = explicit_gralora_delta(a, b, base_scaling(layer, "default"), ag, bg)
    expected = x.double() @ delta.T
    torch.testing.assert_close((adapted - base).double(), expected, atol=1e-5, rtol=1e-4)
    # PEFT's own delta (used for fusing) agrees with the block-by-block construction.
    torch.testing.assert_close(layer.get_delta_weight("default").double(), delta, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("rank,k", [(8, 2), (8, 4), (16, 4)])
def test_effective_rank_reaches_k_times_r(rank, k):
    model, layer = gralora_layer(rank=rank, k=k, d_in=128, d_out=128)
    model.double()  # float64 so that the numerical rank is the true rank
    delta = layer.get_delta_weight("default")
    assert torch.linalg.matrix_rank(delta).item() == k * rank
    # A LoRA with the same parameter count has rank r only.
    torch.manual_seed(0)
    lora = TwoLinear(128, 128)
    inject_adapter_in_model(LoraConfig(r=rank, target_modules=["proj"], init_lora_weights=False), lora)
    lora.double()
    lora_delta = lora.proj.get_delta_weight("default")
    assert torch.linalg.matrix_rank(lora_delta).item() == rank


def test_parameter_count_equals_lora_at_same_rank():
    for rank, k in [(8, 2), (16, 4), (32, 2)]:
        gralora, _ = gralora_layer(rank=rank, k=k, d_in=64, d_out=96)
        n_gralora = sum(p.numel() for n, p in gralora.named_parameters() if "gralora_" in n)
        lora = TwoLinear(64, 96)
        inject_adapter_in_model(LoraConfig(r=rank, target_modules=["proj"]), lora)
        n_lora = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
        assert n_gralora == n_lora == (64 + 96) * rank


def test_outlier_gradient_stays_in_its_input_slice():
    """An outlier in input channel c0 (slice j0) updates only the k blocks of column j0; in LoRA it reaches all of A."""
    rank, k, d_in, d_out = 8, 4, 64, 96
    _, layer = gralora_layer(rank=rank, k=k, d_in=d_in, d_out=d_out)
    x = torch.zeros(2, 3, d_in)
    c0 = 37  # slice j0 = 37 // 16 = 2
    j0 = c0 // (d_in // k)
    x[..., c0] = 50.0
    layer(x).pow(2).sum().backward()
    grad_a, grad_b = layer.gralora_A["default"].grad, layer.gralora_B["default"].grad
    s = rank // k
    for c in range(k):
        for j in range(k):
            a_part = grad_a[j][:, c * s : (c + 1) * s]
            b_part = grad_b[c][j * s : (j + 1) * s, :]
            touched = bool(a_part.abs().sum() > 0 or b_part.abs().sum() > 0)
            assert touched == (j == j0), f"block ({c}, {j})"
    # Within slice j0, only the outlier's own row of A receives gradient.
    rows = grad_a[j0].abs().sum(dim=1)
    assert (rows > 0).nonzero().flatten().tolist() == [c0 - j0 * (d_in // k)]

    torch.manual_seed(0)
    lora = TwoLinear(d_in, d_out)
    inject_adapter_in_model(LoraConfig(r=rank, target_modules=["proj"], init_lora_weights=False), lora)
    lora.proj(x).pow(2).sum().backward()
    lora_grad_a = lora.proj.lora_A["default"].weight.grad  # [r, in]
    lora_grad_b = lora.proj.lora_B["default"].weight.grad  # [out, r]
    assert (lora_grad_a[:, c0].abs() > 0).all(), "every row of LoRA's A sees the outlier"
    assert (lora_grad_b.abs() > 0).float().mean() == 1.0, "all of LoRA's B sees the outlier"
    # GraLoRA's B: only 1/k of it receives gradient.
    assert (grad_b.abs() > 0).float().mean().item() == pytest.approx(1 / k)


def test_weight_scales_the_delta_linearly():
    """The package's extension: weight w makes the layer compute base + w * delta, and fusing bakes w in."""
    _, layer = gralora_layer(rank=8, k=2)
    x = torch.randn(2, 4, 64)
    base = layer.get_base_layer()(x).detach()
    delta = (layer(x) - base).detach()
    for w in (0.5, -1.25, 0.0, 2.0):
        gd.layers.set_adapter_weight(layer, "default", w)
        torch.testing.assert_close(layer(x).detach(), base + w * delta, atol=1e-5, rtol=1e-5)
        assert gd.layers.adapter_weight(layer, "default") == pytest.approx(w)
    gd.layers.set_adapter_weight(layer, "default", -0.75)
    unfused = layer(x).detach()
    layer.merge()
    torch.testing.assert_close(layer(x).detach(), unfused, atol=1e-5, rtol=1e-5)
    gd.layers.set_adapter_weight(layer, "default", 0.3)  # re-weights the merged delta in place
    torch.testing.assert_close(layer(x).detach(), base + 0.3 * delta, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.get_base_layer()(x).detach(), base, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("k,hybrid_r,shape", [(2, 0, (3, 5, 64)), (4, 0, (7, 64)), (4, 4, (2, 3, 64))])
def test_memory_lean_training_forward_matches_peft(k, hybrid_r, shape):
    """The recomputing forward: PEFT's outputs and gradients, with less saved for backward than the default."""
    from gralora_diffusion.layers import use_memory_lean_training

    results = []
    for variant in ("peft", "package", "lean"):
        torch.manual_seed(3)
        model = TwoLinear()
        config = gd.make_gralora_config(16, ["proj"], gralora_k=k, hybrid_r=hybrid_r, init_weights=False)
        if variant == "peft":
            inject_adapter_in_model(config, model)
        else:
            gd.add_gralora_adapter(model, config)
        gd.layers.set_adapter_weight(model.proj, "default", 0.7)
        if variant == "lean":
            assert use_memory_lean_training(model) == 1
            assert isinstance(model.proj, gd.layers.GraloraLinear)
        torch.manual_seed(9)
        x = torch.randn(*shape, requires_grad=True)
        saved: list[int] = []

        def pack(t, saved=saved):
            saved.append(t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = model(x)
        y.pow(2).sum().backward()
        grads = [p.grad.clone() for n, p in model.named_parameters() if p.requires_grad]
        results.append((y.detach(), x.grad.clone(), grads, sum(saved)))
    (y0, gx0, g0, _), *ours = results
    for y1, gx1, g1, _ in ours:
        torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx1, gx0, atol=1e-5, rtol=1e-5)
        for a, b in zip(g1, g0):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert ours[1][3] < ours[0][3]
    assert use_memory_lean_training(model, enabled=False) == 1
    assert not model.proj.recompute_intermediate

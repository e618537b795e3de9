"""The package's GraLoRA layer against PEFT's and against explicit dense deltas; its operator count against LoRA's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import explicit_gralora_delta
from peft import GraloraConfig, LoraConfig, inject_adapter_in_model
from torch import nn

import gralora_diffusion as gd
from gralora_diffusion.layers import GraloraLinear, base_scaling, inject_gralora, set_adapter_weight

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from measure import OperatorCount  # noqa: E402


class OneLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


def pair(d_in, d_out, r, k, hybrid_r=0, seed=0):
    """PEFT's GraLoRA layer and the package's, with the same (random, non-zero) weights."""
    torch.manual_seed(seed)
    peft_model = OneLinear(d_in, d_out)
    ours = OneLinear(d_in, d_out)
    ours.load_state_dict(peft_model.state_dict())
    cfg = dict(r=r, alpha=2 * r, gralora_k=k, hybrid_r=hybrid_r, target_modules=["proj"], init_weights=False)
    inject_adapter_in_model(GraloraConfig(**cfg), peft_model)
    inject_gralora(ours, GraloraConfig(**cfg))
    ours.load_state_dict(peft_model.state_dict())
    assert type(ours.proj) is GraloraLinear and type(peft_model.proj) is not GraloraLinear
    return peft_model, ours


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def forward_backward(model, x):
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(torch.ones_like(y) + torch.linspace(-1, 1, y.numel()).view_as(y))
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize(
    "d_in,d_out,r,k,hybrid_r,shape",
    [
        (640, 640, 64, 4, 0, (2, 64, 640)),  # SDXL self-attention, level 1
        (2048, 1280, 64, 4, 0, (2, 77, 2048)),  # SDXL cross-attention to_k / to_v
        (1280, 1280, 32, 4, 8, (1, 48, 1280)),  # hybrid GraLoRA
        (640, 640, 16, 2, 0, (3, 640)),  # 2-D input
    ],
)
def test_forward_and_gradients_equal_peft_at_sdxl_shapes(d_in, d_out, r, k, hybrid_r, shape):
    peft_model, ours = pair(d_in, d_out, r, k, hybrid_r)
    x = torch.randn(*shape)
    y0, gx0, g0 = forward_backward(peft_model, x)
    y1, gx1, g1 = forward_backward(ours, x)
    assert y1.shape == y0.shape and rel(y1, y0) <= 1e-5
    assert rel(gx1, gx0) <= 1e-5
    assert g1.keys() == g0.keys() and len(g0) >= 2
    for name in g0:
        assert rel(g1[name], g0[name]) <= 1e-5, name


def test_bf16_autocast_error_is_no_larger_than_peft():
    peft_model, ours = pair(640, 640, 64, 4)
    x = torch.randn(2, 64, 640)
    with torch.no_grad():
        reference = ours(x).double()  # fp32, no autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            err_peft = rel(peft_model(x), reference)
            err_ours = rel(ours(x), reference)
    assert err_ours <= err_peft * 1.05 + 1e-6, (err_ours, err_peft)


def test_memory_lean_gradients_under_bf16_autocast_equal_the_default_layers():
    """The recomputing backward runs under its forward's autocast state: the same bf16 products, the same gradients
    (in the parameters' fp32, measured bit for bit), only less saved for backward."""
    from gralora_diffusion.layers import use_memory_lean_training

    _, ours = pair(640, 640, 64, 4, hybrid_r=8)
    x = torch.randn(2, 64, 640)
    results = {}
    for lean in (False, True):
        use_memory_lean_training(ours, lean)
        ours.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, gx, grads = forward_backward(ours, x)
        results[lean] = (y, gx, grads)
    (y0, gx0, g0), (y1, gx1, g1) = results[False], results[True]
    assert y1.dtype == y0.dtype == torch.bfloat16 and torch.equal(y1, y0)
    assert gx1.dtype == gx0.dtype and torch.equal(gx1, gx0)
    assert g1.keys() == g0.keys() and len(g0) == 4
    for name in g0:
        assert g1[name].dtype == torch.float32 == g0[name].dtype, name
        assert torch.equal(g1[name], g0[name]), name


def test_two_active_adapters_with_weights_equal_the_explicit_delta_sum():
    torch.manual_seed(1)
    model = OneLinear(96, 64)
    for name, hybrid_r in (("a", 0), ("b", 4)):
        config = GraloraConfig(r=8, alpha=12, gralora_k=2, hybrid_r=hybrid_r, target_modules=["proj"])
        config.init_weights = False
        inject_gralora(model, config, name)
    layer = model.proj
    layer.set_adapter(["a", "b"])
    weights = {"a": 0.7, "b": -0.4}
    for name, w in weights.items():
        set_adapter_weight(layer, name, w)
    base = layer.get_base_layer()
    expected_weight = base.weight.double().clone()
    for name, w in weights.items():
        ag, bg = layer.gralora_A_general[name], layer.gralora_B_general[name]
        expected_weight += explicit_gralora_delta(
            layer.gralora_A[name].detach(),
            layer.gralora_B[name].detach(),
            w * base_scaling(layer, name),
            getattr(ag, "weight", None),
            getattr(bg, "weight", None),
        )
    x = torch.randn(5, 7, 96)
    with torch.no_grad():
        expected = x.double() @ expected_weight.T + base.bias.double()
        assert rel(model(x), expected) <= 1e-6
        layer.enable_adapters(False)
        assert torch.equal(model(x), base(x))


def test_dropout_applies_to_the_adapter_input_only():
    torch.manual_seed(2)
    model = OneLinear(64, 64)
    inject_gralora(model, GraloraConfig(r=8, alpha=8, gralora_k=2, gralora_dropout=0.5, target_modules=["proj"]))
    nn.init.normal_(model.proj.gralora_B["default"])
    x = torch.randn(4, 64)
    model.train()
    torch.manual_seed(3)
    y_train = model(x)
    model.eval()
    y_eval = model(x)
    assert not torch.allclose(y_train, y_eval)  # dropout acted in training
    base = model.proj.get_base_layer()(x)
    torch.manual_seed(3)
    dropped = model.proj.gralora_dropout["default"].train()(x)
    delta = explicit_gralora_delta(
        model.proj.gralora_A["default"].detach(), model.proj.gralora_B["default"].detach(), 1.0
    )
    assert rel(y_train - base, dropped.double() @ delta.T) <= 1e-5


def count(model: nn.Module, x: torch.Tensor) -> OperatorCount:
    x = x.detach().clone().requires_grad_()  # inside a network the input carries gradient
    model(x).sum().backward()  # warm-up (lazy initialisations)
    with OperatorCount(copy_numel=x.numel()) as ops:
        model(x).sum().backward()
    return ops


def test_forward_backward_dispatches_about_as_many_operators_as_lora():
    """A count is deterministic: PEFT LoRA vs PEFT GraLoRA vs the package's layer, equal parameters (r 64, k 4)."""
    x = torch.randn(2, 64, 640)
    counts = {}
    for variant in ("lora", "peft", "ours"):
        model = OneLinear(640, 640)
        if variant == "lora":
            inject_adapter_in_model(LoraConfig(r=64, lora_alpha=128, target_modules=["proj"]), model)
        elif variant == "peft":
            inject_adapter_in_model(gd.make_gralora_config(64, ["proj"], gralora_k=4), model)
        else:
            inject_gralora(model, gd.make_gralora_config(64, ["proj"], gralora_k=4))
        model.proj.get_base_layer().requires_grad_(False)
        counts[variant] = count(model, x)
    lora, peft, ours = counts["lora"], counts["peft"], counts["ours"]
    # Measured with torch 2.13 on CPU: LoRA 42, PEFT GraLoRA 98, ours 46 operators in all (the target: <= 1.10x LoRA).
    assert ours.total <= 1.10 * lora.total, (ours.total, lora.total)
    assert ours.total <= 0.55 * peft.total, (ours.total, peft.total)
    assert ours.compute < peft.compute
    # No activation-sized copy: x is read through a strided view; only the input gradient is re-laid out.
    assert ours.copies <= 1 < peft.copies
    # The memory-lean backward recomputes only the first product and the shuffle (measured: 53 operators).
    from gralora_diffusion.layers import use_memory_lean_training

    use_memory_lean_training(model)
    lean = count(model, x)
    assert ours.total < lean.total <= 1.30 * lora.total, (lean.total, lora.total)
    assert lean.copies <= 1

"""Helpers shared by the tests: small adapter files, fixed model inputs, snapshots, and the independent dense-delta
computations the API is checked against (written from the paper, without PEFT's code)."""

from __future__ import annotations

from pathlib import Path

import torch

import gralora_diffusion as gd
from gralora_diffusion.toy import save_random_toy_adapter

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def make_adapter_file(path: Path, seed: int, **kwargs) -> Path:
    """An untrained adapter with random A and B on the toy base (see ``save_random_toy_adapter``)."""
    return save_random_toy_adapter(path, seed, **kwargs)


def unet_inputs(pipe, seed: int = 0, batch: int = 2):
    """Deterministic inputs for one SDXL (or SD1.5) UNet call."""
    g = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    sample = torch.randn(batch, 4, 32, 32, generator=g)
    cross = unet.config.cross_attention_dim
    hidden = torch.randn(batch, 7, cross, generator=g)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 32, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch),
        }
    return sample, torch.tensor([500, 20]), hidden, kwargs


@torch.no_grad()
def unet_out(pipe, seed: int = 0, scale: float | None = None) -> torch.Tensor:
    """The UNet's output on fixed inputs; ``scale`` passes diffusers' ``cross_attention_kwargs={"scale": ...}``."""
    sample, t, hidden, kwargs = unet_inputs(pipe, seed)
    if scale is not None:
        kwargs["cross_attention_kwargs"] = {"scale": scale}
    return pipe.unet(sample, t, encoder_hidden_states=hidden, **kwargs).sample


@torch.no_grad()
def text_out(pipe, component: str = "text_encoder") -> torch.Tensor:
    tokenizer = pipe.tokenizer if component == "text_encoder" else pipe.tokenizer_2
    ids = tokenizer(["a photo of sks dog", "a red circle"], padding="max_length", max_length=77, return_tensors="pt")
    return getattr(pipe, component)(ids.input_ids, output_hidden_states=True).hidden_states[-2]


def snapshot(pipe) -> dict:
    """Everything an API call could change: parameters (cloned), module types, adapter activation and fusion."""
    state = {}
    for component, model in gd.pipeline_components(pipe).items():
        for name, tensor in model.state_dict().items():
            state[f"{component}.{name}"] = tensor.detach().clone()
        state[f"{component}#types"] = [type(m).__name__ for m in model.modules()]
    state["#adapters"] = gd.get_gralora_adapters(pipe)
    state["#active"] = gd.get_active_gralora_adapters(pipe)
    state["#fused"] = gd.get_fused_gralora_adapters(pipe)
    return state


def assert_same_snapshot(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), f"{key} changed"
        else:
            assert value == after[key], f"{key} changed"


def explicit_gralora_delta(
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    a_general: torch.Tensor | None = None,
    b_general: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dense (out x in) GraLoRA update written block by block from the paper, independently of PEFT's code.

    PEFT stores A as [k, in/k, r] (input slice j projects to r) and B as [k, r, out/k] (output slice c reads r).
    Block (c, j) of the update uses the c-th r/k chunk of slice j's projection and the j-th r/k rows of B[c]:
    delta[c, j] = (A[j][:, chunk c] @ B[c][chunk j, :])^T.
    """
    k, in_k, r = a.shape
    out_k = b.shape[2]
    s = r // k
    delta = torch.zeros(k * out_k, k * in_k, dtype=torch.float64)
    for c in range(k):
        for j in range(k):
            block = a[j][:, c * s : (c + 1) * s].double() @ b[c][j * s : (j + 1) * s, :].double()
            delta[c * out_k : (c + 1) * out_k, j * in_k : (j + 1) * in_k] = block.T
    if a_general is not None:
        delta += b_general.double() @ a_general.double()
    return delta * scaling


def apply_explicit_blend(pipe, adapters: list[tuple[Path, dict[str, float]]]) -> None:
    """Add sum_i w_i * delta_i to the *plain* base weights of ``pipe`` (no PEFT involved)."""
    from safetensors import safe_open

    for path, weights in adapters:
        with safe_open(str(path), "pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            adapter = gd.io.adapter_from_tensors(tensors, f.metadata())
        for component, sd in adapter.state_dicts.items():
            cfg = adapter.configs[component]
            scale = weights.get(component, 1.0) * cfg.alpha / (cfg.r + cfg.hybrid_r)
            model = getattr(pipe, component)
            modules = dict(model.named_modules())
            for module_name in adapter.module_names(component):
                layer = modules[gd.names.resolve_module_name(modules, module_name)]
                delta = explicit_gralora_delta(
                    sd[f"{module_name}.gralora_A"],
                    sd[f"{module_name}.gralora_B"],
                    scale,
                    sd.get(f"{module_name}.gralora_A_general.weight"),
                    sd.get(f"{module_name}.gralora_B_general.weight"),
                )
                with torch.no_grad():  # a convolution's delta is over its flattened weight [out, in * kh * kw]
                    layer.weight.add_(delta.reshape(layer.weight.shape).to(layer.weight.dtype))

"""The package's GraLoRA layer: a subclass of PEFT's, the one place where PEFT's GraLoRA is extended.

PEFT (``peft.tuners.gralora``) owns the parameters, the state dict, ``get_delta_weight``, merge and unmerge. This
subclass adds what image generation needs, without patching PEFT's class:

* **A blend weight owned by the package.** ``blend_weight[adapter]`` is the user's weight; PEFT's ``scaling`` is
  derived from it (``weight * alpha / (r + hybrid_r)``), so forward, ``get_delta_weight``, merge and unmerge all see
  the same number and nothing of PEFT's math is duplicated.
* **diffusers' scale hooks, with LoRA's semantics.** diffusers calls ``scale_layer`` / ``unscale_layer`` around every
  forward given ``cross_attention_kwargs={"scale": s}`` and ``set_scale`` from ``set_adapters``. Here the transient
  scale is a separate factor that multiplies only the unmerged forward: it never rewrites fused base weights and never
  changes the stored blend weight (not even diffusers' ``scale=0.0`` path, which ends with ``set_scale(name, 1.0)``).
* **A forward at about LoRA's operator count.** Two ``torch.bmm`` on strided views of the input (no einsum, no copy of
  x), the k x k block shuffle only on the k*r-wide intermediate, the output re-layout and the scale folded into the
  residual add, and no fp32 round trip of x under autocast. Optionally (``recompute_intermediate``) the k*r-wide
  intermediate is recomputed in backward instead of stored.

* **Convolutions (LoCon-style).** ``GraloraConv2d`` adapts an ``nn.Conv2d`` read as the linear map it is: from an
  input patch (in_channels x kh x kw, flattened channel-major, the order of the conv weight's own flattening) to
  out_channels. PEFT's parameters, state dict layout and ``get_delta_weight`` then apply unchanged to that flattened
  weight (``in_features`` = in_channels x kh x kw), and the k input blocks are k groups of whole input channels.

``inject_gralora`` puts these layers into a model through PEFT's own injection machinery (a ``GraloraModel`` subclass
whose only change is the layer class it creates).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
from peft import GraloraConfig
from peft.tuners.gralora.layer import GraloraLayer
from peft.tuners.gralora.layer import Linear as PeftGraloraLinear
from peft.tuners.gralora.model import GraloraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

__all__ = [
    "GraloraConv2d",
    "GraloraLayer",
    "GraloraLinear",
    "adapter_weight",
    "base_scaling",
    "gralora_layers",
    "inject_gralora",
    "set_adapter_weight",
    "use_memory_lean_training",
]


def gralora_layers(model: nn.Module) -> Iterator[tuple[str, GraloraLayer]]:
    """Every GraLoRA layer of ``model`` (the package's or PEFT's own) with its dotted module name."""
    for name, module in model.named_modules():
        if isinstance(module, GraloraLayer):
            yield name, module


def base_scaling(layer: GraloraLayer, adapter: str) -> float:
    """PEFT's scale of ``adapter`` at weight 1: alpha / (r + hybrid_r)."""
    return layer.alpha[adapter] / (layer.r[adapter] + layer.hybrid_r[adapter])


def adapter_weight(layer: GraloraLayer, adapter: str) -> float:
    """The user's blend weight of ``adapter`` in ``layer`` (for a plain PEFT layer, read back from its scaling)."""
    if isinstance(layer, GraloraLinear):
        return layer.blend_weight[adapter]
    return layer.scaling[adapter] / base_scaling(layer, adapter)


@torch.no_grad()
def set_adapter_weight(layer: GraloraLayer, adapter: str, weight: float) -> None:
    """Make ``layer`` apply ``adapter`` at ``weight`` (any real number; negative subtracts the adapter).

    If the adapter is merged into the base weight, the merged delta is re-weighted in place (old delta out, new delta
    in), so fused and unfused layers stay consistent and a later unmerge removes exactly what is there. Setting the
    weight it already has changes nothing, so a fused weight is never rewritten needlessly.
    """
    if adapter not in layer.gralora_A:
        return
    new_scaling = float(weight) * base_scaling(layer, adapter)
    if isinstance(layer, GraloraLinear):
        layer.blend_weight[adapter] = float(weight)
    if new_scaling == layer.scaling[adapter]:
        return
    if adapter in layer.merged_adapters:
        base = layer.get_base_layer()
        base.weight.data -= layer.get_delta_weight(adapter)
        layer.scaling[adapter] = new_scaling
        base.weight.data += layer.get_delta_weight(adapter)
    else:
        layer.scaling[adapter] = new_scaling


def _shuffle(h: torch.Tensor) -> torch.Tensor:
    """[k(j), n, (c, r/k)] -> [k(c), n, (j, r/k)]: GraLoRA's k x k block exchange (its own inverse)."""
    k, n, r = h.shape
    return h.view(k, n, k, r // k).transpose(0, 2).reshape(k, n, r)


def _input_blocks(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [..., in] as [k(j), n, in/k], input slice j of every row: a strided view (a copy only for a strided x)."""
    x = x.view(-1, k, x.shape[-1] // k) if x.is_contiguous() else x.reshape(-1, k, x.shape[-1] // k)
    return x.transpose(0, 1)


def _block_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GraLoRA's block-routed product for x [..., in], A [k, in/k, r], B [k, r, out/k] (PEFT's layouts): [k, n, out/k].

    Input slice j is projected by A[j] to r features; chunk c (r/k wide) of that projection feeds output slice c,
    whose B[c] reads the k chunks (one per input slice) stacked in order of j. n is the number of input rows.
    """
    h = torch.bmm(_input_blocks(x, a.shape[0]), a)  # [k(j), n, r]: read through a strided view of x, no copy
    return torch.bmm(_shuffle(h), b)  # the shuffle is the only re-layout


class _RecomputedBlockDelta(torch.autograd.Function):
    """``_block_delta`` that saves only its input and factors: backward recomputes the k*r-wide intermediate (one
    ``bmm`` and the shuffle; the second product is not rerun, as activation checkpointing would) and then forms all
    three gradients itself. Runs backward under the autocast state of its forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(x, a, b)
        return _block_delta(x, a, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, a, b = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            xv = _input_blocks(x, a.shape[0])
            hs = _shuffle(torch.bmm(xv, a))
            grad_b = torch.bmm(hs.transpose(1, 2), grad) if ctx.needs_input_grad[2] else None
            grad_h = _shuffle(torch.bmm(grad, b.transpose(1, 2)))
            grad_a = torch.bmm(xv.transpose(1, 2), grad_h) if ctx.needs_input_grad[1] else None
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = torch.bmm(grad_h, a.transpose(1, 2)).transpose(0, 1).reshape(x.shape)
        grads = (grad_x, grad_a, grad_b)
        return tuple(g if g is None or g.dtype == t.dtype else g.to(t.dtype) for g, t in zip(grads, (x, a, b)))


class GraloraLinear(PeftGraloraLinear):
    """PEFT's GraLoRA ``Linear`` with a package-owned blend weight, diffusers' scale hooks and a lean forward.

    Same parameters, state dict, ``get_delta_weight``, merge and unmerge as PEFT's layer, which it is an instance of.
    ``recompute_intermediate`` (off by default) recomputes the k*r-wide intermediate in backward instead of storing
    it: less activation memory for more compute.
    """

    other_param_names = PeftGraloraLinear.other_param_names + ("blend_weight",)

    def update_layer(self, adapter_name: str, module_name: str, r: int, config: GraloraConfig) -> None:
        if "blend_weight" not in self.__dict__:  # first adapter: PEFT's __init__ calls update_layer
            self.blend_weight: dict[str, float] = {}
            self.transient_scale = 1.0
            self._zero_scale_pending: set[str] = set()
            self.recompute_intermediate = False
        super().update_layer(adapter_name, module_name, r, config=config)
        self.blend_weight[adapter_name] = 1.0

    # --- diffusers' LoRA scale hooks ---------------------------------------------------------------------------

    def set_scale(self, adapter: str, scale: float) -> None:
        """Like ``LoraLayer.set_scale`` (diffusers' ``set_adapters``): store ``scale`` as the adapter's weight.

        diffusers ends a forward run with ``scale=0.0`` by calling ``set_scale(name, 1.0)`` for each active adapter
        instead of ``unscale_layer``; those calls only end the zero transient scale, so the user's weights survive.
        """
        if adapter in self._zero_scale_pending:
            self._zero_scale_pending.discard(adapter)
            if not self._zero_scale_pending:
                self.transient_scale = 1.0
            return
        set_adapter_weight(self, adapter, scale)

    def scale_layer(self, scale: float) -> None:
        """Like ``LoraLayer.scale_layer``: multiply the unmerged adapters' effect by ``scale`` until unscaled."""
        self.transient_scale *= float(scale)
        if self.transient_scale == 0.0:
            self._zero_scale_pending = set(self.active_adapters)
            if not self._zero_scale_pending:  # nothing active: nothing to silence, and no call would end it
                self.transient_scale = 1.0

    def unscale_layer(self, scale: float | None = None) -> None:
        """Like ``LoraLayer.unscale_layer``: divide the transient scale by ``scale``, or end it when None."""
        if scale is None or scale == 0:
            self.transient_scale = 1.0
            self._zero_scale_pending = set()
        else:
            self.transient_scale /= float(scale)
            if abs(self.transient_scale - 1.0) < 1e-12:
                self.transient_scale = 1.0

    # --- forward ------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        autocast = torch.is_autocast_enabled(x.device.type)
        if autocast and x.dtype == torch.float32 and isinstance(self.get_base_layer(), (nn.Linear, nn.Conv2d)):
            # Under mixed precision a layer's input is often fp32 (CUDA autocast runs layer and group norms in fp32).
            # Autocast would cast it for the frozen layer and again for every adapter, and each keeps its own copy
            # (and --gralora_recompute the fp32 original) for backward: cast once, and all share that one copy.
            low = torch.get_autocast_dtype(x.device.type)
            if low != torch.float32:
                x = x.to(low)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged or self.transient_scale == 0.0:
            return result
        for name in self.active_adapters:
            if name not in self.gralora_A:
                continue
            x_in = x if autocast or x.dtype == self.gralora_A[name].dtype else x.to(self.gralora_A[name].dtype)
            dropout = self.gralora_dropout[name]
            if not isinstance(dropout, nn.Identity):  # PEFT's Identity at p = 0: a module call saved per layer
                x_in = dropout(x_in)
            result = self._add_adapter(result, x_in, name, self.scaling[name] * self.transient_scale)
        return result

    def _add_adapter(self, result: torch.Tensor, x_in: torch.Tensor, name: str, scale: float) -> torch.Tensor:
        """``result`` plus ``scale`` times adapter ``name``'s update of ``x_in``."""
        a, b = self.gralora_A[name], self.gralora_B[name]
        if self.recompute_intermediate and torch.is_grad_enabled():
            delta = _RecomputedBlockDelta.apply(x_in, a, b)
        else:
            delta = _block_delta(x_in, a, b)
        k = a.shape[0]
        if delta.dtype != result.dtype:
            delta = delta.to(result.dtype)
        # the output re-layout and the scale both ride on the residual add: no copy, no extra multiply
        out = result.view(-1, k, self.out_features // k).add(delta.transpose(0, 1), alpha=scale)
        result = out.view(result.shape)
        if self.hybrid_r[name] > 0:
            a_general = self.gralora_A_general[name].weight
            b_general = self.gralora_B_general[name].weight
            hybrid = nn.functional.linear(nn.functional.linear(x_in, a_general), b_general * scale)
            result = result + (hybrid if hybrid.dtype == result.dtype else hybrid.to(result.dtype))
        return result


def conv_unsupported(conv: nn.Conv2d) -> str | None:
    """Why ``GraloraConv2d`` cannot adapt ``conv`` (a phrase), or None when it can."""
    if conv.groups != 1:
        return f"a grouped convolution (groups={conv.groups})"
    if conv.padding_mode != "zeros":
        return f"a convolution with padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str):
        return f"a convolution with padding={conv.padding!r}"
    return None


class GraloraConv2d(GraloraLinear):
    """GraLoRA on an ``nn.Conv2d``: PEFT's GraLoRA of the conv's flattened weight [out, in * kh * kw].

    Input block j is input channels j*in/k .. (j+1)*in/k - 1 with all their kernel taps, so the forward is two
    convolutions, the LoCon pattern with GraLoRA's routing: a grouped kh x kw convolution (groups = k, the base conv's
    stride, padding and dilation) from each input block to its r features, the k x k block shuffle of those k*r
    channels, and a grouped 1 x 1 convolution (groups = k) from each output block's r features to its out/k channels.
    Parameters, FLOPs and the k*r-wide intermediate are those of the linear layer on an unfolded input. Hybrid
    GraLoRA's LoRA part is a kh x kw convolution to ``hybrid_r`` channels and a 1 x 1 back. Merge, unmerge and blend
    weights are PEFT's and ``GraloraLinear``'s, through ``get_delta_weight`` reshaped to the conv weight's shape.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, module_name: str, config: GraloraConfig, r: int = 0,
                 **kwargs) -> None:  # fmt: skip
        nn.Module.__init__(self)
        conv = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        kh, kw = conv.kernel_size
        # PEFT's GraloraLayer reads its sizes from a linear base layer: give it the conv's linear view (a weightless
        # stand-in on the meta device), then put the real convolution in its place before any adapter is made.
        flat = nn.Linear(conv.in_channels * kh * kw, conv.out_channels, bias=False, device="meta")
        GraloraLayer.__init__(self, flat, **kwargs)
        self.base_layer = base_layer
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, module_name, r, config=config)

    def update_layer(self, adapter_name: str, module_name: str, r: int, config: GraloraConfig) -> None:
        channels = self.get_base_layer().in_channels
        if channels % config.gralora_k:  # PEFT checks in * kh * kw; the input blocks are groups of whole channels
            raise ValueError(f"GraLoRA cannot adapt {module_name}: its in_channels={channels} are not divisible by "
                             f"gralora_k={config.gralora_k}.")  # fmt: skip
        super().update_layer(adapter_name, module_name, r, config=config)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return super().get_delta_weight(adapter).reshape(self.get_base_layer().weight.shape)

    def _add_adapter(self, result: torch.Tensor, x_in: torch.Tensor, name: str, scale: float) -> torch.Tensor:
        if x_in.ndim == 3:  # an unbatched [C, H, W] input, which nn.Conv2d accepts
            return self._add_adapter(result[None], x_in[None], name, scale)[0]
        conv = self.get_base_layer()
        placement = (conv.stride, conv.padding, conv.dilation)
        geometry = (conv.kernel_size, *placement)
        a, b = self.gralora_A[name], self.gralora_B[name]  # [k, in/k * kh * kw, r], [k, r, out/k]
        if self.recompute_intermediate and torch.is_grad_enabled():
            delta = _RecomputedConvBlockDelta.apply(x_in, a, b, geometry)
        else:
            delta = _conv_block_delta(x_in, a, b, geometry)
        if self.hybrid_r[name] > 0:
            a_general = self.gralora_A_general[name].weight.view(-1, conv.in_channels, *conv.kernel_size)
            b_general = self.gralora_B_general[name].weight[:, :, None, None]
            delta = delta + nn.functional.conv2d(nn.functional.conv2d(x_in, a_general, None, *placement), b_general)
        return result.add(delta if delta.dtype == result.dtype else delta.to(result.dtype), alpha=scale)


def _conv_weights(a: torch.Tensor, b: torch.Tensor, in_channels: int, kernel: tuple) -> tuple[torch.Tensor, ...]:
    """PEFT's A [k, in/k * kh * kw, r] and B [k, r, out/k] as the weights of ``_conv_block_delta``'s two grouped
    convolutions (re-laid-out copies): down [k*r, in/k, kh, kw], input block j -> its r features, chunk c of them
    (r/k wide) for output block c; up [out, r, 1, 1], output block c reads its (j, r/k) features."""
    k, r = a.shape[0], a.shape[2]
    return a.transpose(1, 2).reshape(k * r, in_channels // k, *kernel), b.transpose(1, 2).reshape(-1, r, 1, 1)


def _conv_shuffle(h: torch.Tensor, k: int) -> torch.Tensor:
    """[n, (k, k, r/k), H, W] -> the same with the two block axes exchanged: GraLoRA's shuffle (its own inverse)."""
    n, channels, height, width = h.shape
    return h.view(n, k, k, channels // (k * k), height, width).transpose(1, 2).reshape(h.shape)


def _conv_block_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, geometry: tuple) -> torch.Tensor:
    """GraLoRA's block-routed update of the conv input x [n, in, H, W]: a grouped kh x kw convolution (groups = k,
    ``geometry`` = the base's kernel size, stride, padding, dilation) to channels (j, c, r/k), the block shuffle to
    (c, j, r/k), and a grouped 1 x 1 convolution to out channels."""
    k, (kernel, *placement) = a.shape[0], geometry
    down, up = _conv_weights(a, b, x.shape[1], kernel)
    h = nn.functional.conv2d(x, down, None, *placement, groups=k)
    return nn.functional.conv2d(_conv_shuffle(h, k), up, groups=k)


class _RecomputedConvBlockDelta(torch.autograd.Function):
    """``_conv_block_delta`` that saves only its input and factors (the input is the base convolution's, kept for its
    own backward anyway): backward recomputes the k*r-channel intermediate (the first convolution and the shuffle;
    the second is not rerun, as activation checkpointing would) and forms the three gradients with the convolutions'
    own backward kernels. Runs backward under the autocast state of its forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, geometry: tuple) -> torch.Tensor:
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.geometry = geometry
        ctx.save_for_backward(x, a, b)
        return _conv_block_delta(x, a, b, geometry)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, a, b = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        kernel, stride, padding, dilation = ctx.geometry
        k = a.shape[0]
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            down, up = _conv_weights(a, b, x.shape[1], kernel)
            h = nn.functional.conv2d(x, down, None, stride, padding, dilation, groups=k)  # as forward computed it
        hs = _conv_shuffle(h, k)
        # the convolutions' backward kernels take one dtype: the one the forward's convolutions ran in
        grad, up, x_c, down = (t.to(h.dtype) for t in (grad, up, x, down))
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        grad_hs, grad_up, _ = torch.ops.aten.convolution_backward(
            grad, hs, up, None, (1, 1), (0, 0), (1, 1), False, (0, 0), k, (need_x or need_a, need_b, False)
        )
        grad_x = grad_a = grad_b = None
        if need_x or need_a:
            grad_x, grad_down, _ = torch.ops.aten.convolution_backward(
                _conv_shuffle(grad_hs, k), x_c, down, None, stride, padding, dilation, False, (0, 0), k,
                (need_x, need_a, False),
            )  # fmt: skip
            if need_a:  # down [k*r, in/k, kh, kw] back to A [k, in/k * kh * kw, r]
                grad_a = grad_down.reshape(k, a.shape[2], a.shape[1]).transpose(1, 2)
        if need_b:  # up [out, r, 1, 1] back to B [k, r, out/k]
            grad_b = grad_up.reshape(k, b.shape[2], b.shape[1]).transpose(1, 2)
        grads = (grad_x, grad_a, grad_b)
        cast = tuple(g if g is None or g.dtype == t.dtype else g.to(t.dtype) for g, t in zip(grads, (x, a, b)))
        return (*cast, None)


class _PackageGraloraTuner(GraloraModel):
    """PEFT's GraLoRA injection, creating the package's ``GraloraLinear`` (or ``GraloraConv2d``) layers."""

    @staticmethod
    def _create_new_module(config, adapter_name, target, module_name, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, nn.Conv2d):
            reason = conv_unsupported(base)
            if reason:
                raise TypeError(f"GraLoRA cannot adapt {module_name}: it is {reason}.")
            return GraloraConv2d(target, adapter_name, module_name, config=config, **kwargs)
        if not isinstance(base, nn.Linear):
            raise TypeError(
                f"GraLoRA adapts nn.Linear and nn.Conv2d layers only; {module_name} is a {type(base).__name__}."
            )
        return GraloraLinear(target, adapter_name, module_name, config=config, **kwargs)


def inject_gralora(
    model: nn.Module, config: GraloraConfig, adapter_name: str = "default", low_cpu_mem_usage: bool = False
) -> None:
    """Inject the package's GraLoRA layers for ``config.target_modules`` into ``model`` (PEFT's injection).

    PEFT's warning about a second adapter on one model is expected here and silenced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        _PackageGraloraTuner(model, config, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)


def use_memory_lean_training(model: nn.Module, enabled: bool = True) -> int:
    """Make every package GraLoRA layer of ``model`` (linear and convolution) recompute its k*r-wide intermediate in
    backward instead of storing it (or stop).

    Returns how many layers were switched. Parameters, state dict and inference are unchanged.
    """
    count = 0
    for _, layer in gralora_layers(model):
        if isinstance(layer, GraloraLinear) and layer.recompute_intermediate != enabled:
            layer.recompute_intermediate = enabled
            count += 1
    return count

"""Where GraLoRA goes in a diffusion pipeline and with which settings.

Target presets (defined per model family in ``families``) name the layers that get an adapter; the defaults follow
the GraLoRA paper (alpha = 2r; k = 2 up to r = 32, k = 4 from r = 64). ``make_gralora_config`` builds PEFT's own
``GraloraConfig`` -- PEFT is the adapter engine -- and ``check_gralora_fits`` validates a configuration against a
model before anything is injected, so a bad k or rank fails with one clear sentence that names the layer instead of
half-way through an injection.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from peft import GraloraConfig
from torch import nn

from .families import PRESETS
from .layers import conv_unsupported

# Preset name -> module-name suffixes, for every model family (see ``families``); kept here under its public name.
TARGET_PRESETS: dict[str, tuple[str, ...]] = PRESETS


class GraloraConfigError(ValueError):
    """A GraLoRA setting does not fit the model; raised before the model is changed."""


def default_gralora_k(rank: int) -> int:
    """The paper's k for a rank: 2 for r <= 32, 4 for r >= 64 (and 2 in between, where 4 would make blocks thin)."""
    return 4 if rank >= 64 else 2


def resolve_targets(targets: str | Iterable[str]) -> list[str]:
    """A preset name (see ``TARGET_PRESETS``) or an explicit list of module-name suffixes."""
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise GraloraConfigError(
                f"Unknown target preset {targets!r}; use one of {sorted(TARGET_PRESETS)} or a list of module names."
            )
        return list(TARGET_PRESETS[targets])
    return list(targets)


def make_gralora_config(
    rank: int,
    targets: str | Iterable[str],
    *,
    gralora_k: int | None = None,
    alpha: float | None = None,
    hybrid_r: int = 0,
    dropout: float = 0.0,
    init_weights: bool = True,
) -> GraloraConfig:
    """Build PEFT's ``GraloraConfig`` with the paper's defaults filled in.

    Args:
        rank: GraLoRA rank r. Parameters per layer equal a LoRA of rank r: (in + out) * r (+ hybrid part).
        targets: a preset name from ``TARGET_PRESETS`` or module-name suffixes such as ``["to_q", "to_v"]``.
        gralora_k: blocks per side (k x k blocks); ``None`` picks the paper's default for ``rank``.
        alpha: scaling numerator; ``None`` means 2 * rank. The layer scale is alpha / (rank + hybrid_r).
        hybrid_r: rank of an extra ordinary LoRA beside the blocks (Hybrid GraLoRA). In PEFT this is added on top
            of ``rank`` (the paper describes it as a share of the budget), so it adds (in + out) * hybrid_r
            parameters; useful at small ranks (r <= 16).
        dropout: dropout on the adapter input.
        init_weights: PEFT's init (B = 0 so the adapter starts as a no-op); ``False`` makes both factors random.
    """
    if rank <= 0:
        raise GraloraConfigError(f"GraLoRA rank must be a positive integer, got {rank}.")
    k = default_gralora_k(rank) if gralora_k is None else gralora_k
    if k <= 0:
        raise GraloraConfigError(f"gralora_k must be a positive integer, got {k}.")
    if rank % k != 0:
        raise GraloraConfigError(
            f"GraLoRA rank {rank} is not divisible by k={k}; pick a rank that is a multiple of {k} or another k."
        )
    if hybrid_r < 0:
        raise GraloraConfigError(f"hybrid_r must be >= 0, got {hybrid_r}.")
    return GraloraConfig(
        r=rank,
        alpha=2 * rank if alpha is None else alpha,
        gralora_k=k,
        hybrid_r=hybrid_r,
        gralora_dropout=dropout,
        target_modules=resolve_targets(targets),
        init_weights=init_weights,
    )


def _matches(module_name: str, targets: Iterable[str] | str) -> bool:
    """PEFT's matching rule: a string is a full-match regex; a list matches exact names or dotted suffixes."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def find_target_modules(model: nn.Module, targets: Iterable[str] | str) -> dict[str, nn.Module]:
    """The modules of ``model`` that ``targets`` select, by their full dotted name (PEFT wrappers looked through)."""
    found = {}
    for name, module in model.named_modules():
        if not name or any(part.startswith("base_layer") for part in name.split(".")):
            continue
        if ".gralora_" in name or ".lora_" in name:
            continue
        if _matches(name, targets):
            found[name] = module
    return found


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def adapted_features(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of the linear map GraLoRA adapts in ``module`` (or in the base of a PEFT layer wrapping one): a
    linear layer's features, or a 2-D convolution's (in_channels x kh x kw, out_channels); None for anything else."""
    base = _base(module)
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, nn.Conv2d):
        return base.in_channels * base.kernel_size[0] * base.kernel_size[1], base.out_channels
    return None


def check_gralora_fits(model: nn.Module, config: GraloraConfig, component: str = "model") -> list[str]:
    """Check that ``config`` can be injected into ``model``; return the names of the modules it will adapt.

    Raises ``GraloraConfigError`` naming the first offending layer (with its sizes) when a target is neither a linear
    layer nor a plain 2-D convolution, when its in/out features (a convolution's channels) are not divisible by k, or
    when nothing matches. Changes nothing.
    """
    k, r = config.gralora_k, config.r
    if r % k != 0:
        raise GraloraConfigError(f"GraLoRA rank {r} is not divisible by k={k} ({component}).")
    modules = find_target_modules(model, config.target_modules)
    if not modules:
        raise GraloraConfigError(
            f"No module of the {component} matches the GraLoRA targets {config.target_modules!r}; "
            "check the target names against the model's module names."
        )
    for name, module in modules.items():
        base = _base(module)
        if adapted_features(module) is None:
            raise GraloraConfigError(
                f"{component}.{name} is a {type(module).__name__}, neither a linear layer nor a 2-D convolution; "
                "GraLoRA adapts nn.Linear and nn.Conv2d only, so remove it from the targets."
            )
        if isinstance(base, nn.Conv2d):
            reason = conv_unsupported(base)
            if reason:
                raise GraloraConfigError(f"{component}.{name} is {reason}, which GraLoRA does not adapt; remove it "
                                         "from the targets.")  # fmt: skip
            sizes, in_f, out_f = "in_channels={}, out_channels={}", base.in_channels, base.out_channels
        else:
            sizes, in_f, out_f = "in_features={}, out_features={}", base.in_features, base.out_features
        if in_f % k or out_f % k:
            raise GraloraConfigError(
                f"{component}.{name} has {sizes.format(in_f, out_f)}, not both divisible by gralora_k={k}; choose a "
                "k that divides both or leave this layer out of the targets."
            )
    return sorted(modules)

"""SDXL prompt encoding for training, and a cache for frozen text encoders."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's length (77 for CLIP)."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_prompts(
    text_encoders: Sequence[nn.Module], tokenizers: Sequence, prompts: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's conditioning: the penultimate hidden states of both encoders side by side, and encoder 2's pooled output.

    Returns (prompt_embeds [B, 77, d1 + d2], pooled [B, d_proj]), as ``StableDiffusionXLPipeline.encode_prompt``.
    """
    hidden, pooled = [], None
    for encoder, tokenizer in zip(text_encoders, tokenizers):
        device = next(encoder.parameters()).device
        out = encoder(tokenize(tokenizer, prompts).to(device), output_hidden_states=True)
        pooled = out[0]
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


class PromptCache:
    """Embeddings of each distinct prompt, computed once (valid only while the text encoders are frozen)."""

    def __init__(self, text_encoders, tokenizers):
        self.text_encoders, self.tokenizers = text_encoders, tokenizers
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        for prompt in dict.fromkeys(prompts):
            if prompt not in self._cache:
                # One prompt at a time: the numbers then do not depend on which prompts happened to share a batch.
                embeds, pooled = encode_prompts(self.text_encoders, self.tokenizers, [prompt])
                self._cache[prompt] = (embeds[0], pooled[0])
        return (
            torch.stack([self._cache[p][0] for p in prompts]),
            torch.stack([self._cache[p][1] for p in prompts]),
        )

    def __len__(self) -> int:
        return len(self._cache)

"""Next-token choice: greedy, or temperature / top-k / top-p sampling from a seeded generator."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .inputs import check_sampling


@dataclass
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        check_sampling(self.do_sample, self.temperature, self.top_k, self.top_p, self.seed)
        self.top_k, self.seed = int(self.top_k), None if self.seed is None else int(self.seed)


class Sampler:
    def __init__(self, params: SamplingParams, device: torch.device):
        self.p = params
        self.gen = None
        if params.do_sample:
            self.gen = torch.Generator(device=device)
            self.gen.manual_seed(params.seed if params.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) -> token ids (B,) int64."""
        if not self.p.do_sample:
            return logits.argmax(dim=-1)
        x = logits.float() / self.p.temperature
        if self.p.top_k > 0:
            kth = torch.topk(x, min(self.p.top_k, x.shape[-1]), dim=-1).values[:, -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if self.p.top_p < 1.0:
            sorted_x, order = torch.sort(x, dim=-1, descending=True)
            probs = torch.softmax(sorted_x, dim=-1)
            # drop a token when the mass strictly before it already reaches top_p (keeps at least one)
            drop = (probs.cumsum(-1) - probs) >= self.p.top_p
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            x = torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x)
        probs = torch.softmax(x, dim=-1)
        return torch.multinomial(probs, 1, generator=self.gen).squeeze(-1)

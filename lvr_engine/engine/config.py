"""LatentConfig: what a latent segment is (docs/semantics.md), validated eagerly."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Token names looked up in a checkpoint's tokenizer when an id is given by name (or left None by a preset).
COCONUT_TOKENS = {"start": "<|start-latent|>", "end": "<|end-latent|>", "latent": "<|latent|>"}
MIRAGE_TOKENS = {"start": "<|latent_start|>", "end": "<|latent_end|>", "pad": "<|latent_pad|>"}
# Chameleon's separator: its processor appends it (tokenizer.sep_token) after the prompt text
CHAMELEON_SEP = "<reserved08706>"

TokenRef = int | str | None


@dataclass
class LatentConfig:
    """How the engine runs the latent segment.

    trigger="prompt" (IVT-LR, Coconut): after the prompt (+ ``start_marker_id``) run ``num_latent_steps``
    steps; each appends the ``num_selected_patches`` highest-attention image embeddings and the last
    hidden state; then ``end_marker_id`` and ordinary decoding.
    trigger="token" (Mirage): decode normally; after a row emits ``latent_start_id`` it feeds back its
    hidden state for at most ``max_latent_steps`` steps until it emits ``latent_end_id``.
    Token ids may be given as token strings; ``LatentGenerator.from_pretrained`` (or a generator built
    with a tokenizer) resolves them.

    ``patch_order``: the order a step feeds its K patches: "ascending" (image-token order) or "official" (what
    the official IVT-LR code gets from CUDA ``topk(sorted=False)``: patches scoring above the K-th best in
    ascending order, then those tied with it). ``score_precision``: "fp32" accumulates the attention scores in
    fp32; "model" rounds each probability, and their mean, to the model's dtype (eager attention + torch.mean in
    bf16). ``placeholder_id``: a prompt ending with ``num_latent_steps`` of these tokens (the official IVT-LR
    prompt) runs them as the latent steps; a name the tokenizer does not know resolves to None.
    ``ignore_first_eos``: the official IVT-LR loop never checks the first generated token for EOS.
    See docs/semantics.md.
    """

    num_latent_steps: int = 3
    num_selected_patches: int = 32
    start_marker_id: TokenRef = None
    end_marker_id: TokenRef = None
    position_mode: str = "mrope"
    trigger: str = "prompt"
    latent_start_id: TokenRef = None
    latent_end_id: TokenRef = None
    latent_pad_id: TokenRef = None
    max_latent_steps: int = 8
    backend: str | None = None  # ops backend; None = best for the device
    patch_order: str = "ascending"
    score_precision: str = "fp32"
    placeholder_id: TokenRef = None
    ignore_first_eos: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def nonneg_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"LatentConfig.{name} must be a non-negative int, got {v!r}")

        nonneg_int("num_latent_steps")
        nonneg_int("num_selected_patches")
        nonneg_int("max_latent_steps")
        if self.position_mode not in ("mrope", "arange"):
            raise ValueError(f"LatentConfig.position_mode must be 'mrope' or 'arange', got {self.position_mode!r}")
        if self.trigger not in ("prompt", "token"):
            raise ValueError(f"LatentConfig.trigger must be 'prompt' or 'token', got {self.trigger!r}")
        if self.backend not in (None, "torch", "cpu", "triton", "cuda"):
            raise ValueError("LatentConfig.backend must be None, 'torch', 'cpu', 'triton' or 'cuda', "
                             f"got {self.backend!r}")
        if self.patch_order not in ("ascending", "official"):
            raise ValueError(f"LatentConfig.patch_order must be 'ascending' or 'official', got {self.patch_order!r}")
        if self.score_precision not in ("fp32", "model"):
            raise ValueError(f"LatentConfig.score_precision must be 'fp32' or 'model', got {self.score_precision!r}")
        if not isinstance(self.ignore_first_eos, bool):
            raise ValueError(f"LatentConfig.ignore_first_eos must be a bool, got {self.ignore_first_eos!r}")
        for name in ("start_marker_id", "end_marker_id", "latent_start_id", "latent_end_id", "latent_pad_id",
                     "placeholder_id"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str) and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"LatentConfig.{name} must be a token id >= 0, a token string or None, got {v!r}")
        if self.trigger == "token":
            if self.num_selected_patches != 0:
                raise ValueError(
                    "LatentConfig.num_selected_patches must be 0 with trigger='token' (Mirage feeds back hidden "
                    f"states only), got {self.num_selected_patches}"
                )
            if self.max_latent_steps < 1:
                raise ValueError("LatentConfig.max_latent_steps must be >= 1 with trigger='token'")
            if self.start_marker_id is not None or self.end_marker_id is not None:
                raise ValueError("LatentConfig.start_marker_id/end_marker_id apply to trigger='prompt' only")

    def replace(self, **changes) -> "LatentConfig":
        return dataclasses.replace(self, **changes)

    def token_fields(self) -> list[str]:
        """Names of the token-id fields this config uses."""
        if self.trigger == "token":
            return ["latent_start_id", "latent_end_id", "latent_pad_id"]
        return ["start_marker_id", "end_marker_id", "placeholder_id"]

    @property
    def resolved(self) -> bool:
        """True when every token field in use is an int (or None where optional)."""
        return not any(isinstance(getattr(self, f), str) for f in self.token_fields())

    # Presets -------------------------------------------------------------------------------------
    @classmethod
    def ivtlr(cls, **overrides) -> "LatentConfig":
        """IVT-LR as the official inference runs its released checkpoints: 3 latent steps of 32 patches + hidden
        state, no markers, arange positions, the official patch order and score precision, trailing
        ``<|latent|>`` placeholders consumed as the steps, no EOS check on the first token."""
        base = dict(num_latent_steps=3, num_selected_patches=32, position_mode="arange", trigger="prompt",
                    start_marker_id=None, end_marker_id=None, patch_order="official", score_precision="model",
                    placeholder_id=COCONUT_TOKENS["latent"], ignore_first_eos=True)
        return cls(**{**base, **overrides})

    @classmethod
    def ivtlr_chameleon(cls, **overrides) -> "LatentConfig":
        """IVT-LR on Chameleon as the official inference runs it (``chameleon/infer_chameleon_scienceqa.py``): as
        :meth:`ivtlr` with 64 patches per step, and the processor's separator ``<reserved08706>`` as the end marker:
        the official prompt ends ``<|latent|> x3, <sep>`` and runs as the prompt without them, the three latent
        steps, then the separator, then the answer; a prompt without placeholders gets the separator after its
        latent steps all the same."""
        base = dict(num_latent_steps=3, num_selected_patches=64, position_mode="arange", trigger="prompt",
                    start_marker_id=None, end_marker_id=CHAMELEON_SEP, patch_order="official",
                    score_precision="model", placeholder_id=COCONUT_TOKENS["latent"], ignore_first_eos=True)
        return cls(**{**base, **overrides})

    @classmethod
    def coconut(cls, **overrides) -> "LatentConfig":
        """Coconut: hidden-state-only latent steps between <|start-latent|> and <|end-latent|>."""
        base = dict(num_latent_steps=3, num_selected_patches=0, trigger="prompt",
                    start_marker_id=COCONUT_TOKENS["start"], end_marker_id=COCONUT_TOKENS["end"])
        return cls(**{**base, **overrides})

    @classmethod
    def mirage(cls, **overrides) -> "LatentConfig":
        """Mirage: the model switches itself into hidden-state feedback, at most 8 steps per segment."""
        base = dict(num_latent_steps=0, num_selected_patches=0, trigger="token", max_latent_steps=8,
                    latent_start_id=MIRAGE_TOKENS["start"], latent_end_id=MIRAGE_TOKENS["end"],
                    latent_pad_id=MIRAGE_TOKENS["pad"])
        return cls(**{**base, **overrides})

    def resolve_tokens(self, tokenizer) -> "LatentConfig":
        """Replace token strings by ids from ``tokenizer``; unknown tokens are a ValueError naming them."""
        changes = {}
        for name in self.token_fields():
            v = getattr(self, name)
            if isinstance(v, str):
                tid = tokenizer.convert_tokens_to_ids(v) if tokenizer is not None else None
                unk = getattr(tokenizer, "unk_token_id", None)
                if tid is None or (unk is not None and tid == unk and v != getattr(tokenizer, "unk_token", None)):
                    if name == "placeholder_id":  # only recognises a prompt layout: no such token, no such prompt
                        changes[name] = None
                        continue
                    raise ValueError(
                        f"LatentConfig.{name}={v!r} is not a token of this tokenizer; add it "
                        "(tokenizer.add_special_tokens) or pass the id"
                    )
                changes[name] = int(tid)
        return self.replace(**changes) if changes else self

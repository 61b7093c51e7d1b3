"""Typed model hyperparameters with named sizes (nanoGPT's GPTConfig, big_vision's variants)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

Pooling = Literal["llip", "cls", "avg", "register", "multi_cls"]


@dataclass(frozen=True)
class ModelConfig:
    # --- image tower (ViT) ---
    image_size: int = 224  # input resolution, square
    patch_size: int = 16  # ViT patch size; image_size must be a multiple
    width: int = 768  # ViT hidden size
    layers: int = 12  # ViT depth
    heads: int = 12  # ViT self-attention heads
    mlp_ratio: float = 4.0  # ViT MLP hidden = mlp_ratio * width
    # --- text tower (causal transformer pooled at the end-of-text token) ---
    context_length: int = 77  # tokens per caption, SOT and EOT included
    vocab_size: int = 49408  # embedding rows: 49,408 for full CLIP BPE; compact: set from the training captions
    tokenizer: Literal["clip_bpe", "word_hash"] = "clip_bpe"  # llip_core.tokenizer; word_hash: vocab_size buckets
    vocab: Literal["full", "compact"] = "full"  # compact: only ids seen in training (+ pad/SOT/EOT/unknown)
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_mlp_ratio: float | None = None  # text MLP hidden / text_width; None: same as mlp_ratio
    # --- joint space ---
    embed_dim: int = 512  # D: dimension of image and text embeddings
    # --- how an image is summarised ---
    # "llip": K mixture tokens + text-conditioned cross-attention (the paper's model);
    # "cls": one class token, one pooled embedding (CLIP / SigLIP baselines);
    # "avg" / "register": K mixture tokens, mean-pooled / first token, no cross-attention (ablations).
    pooling: Pooling = "llip"
    mixture_tokens: int = 32  # K; ignored for "cls"
    # H of the Llip cross-attention. Released configs set it per config (RELEASED_CROSS_HEADS): 8 for
    # most, 1 for B/32 K=8, 2 for B/32 K=16; model_config() follows them for the paper sizes.
    cross_heads: int = 8
    tau: float = 5.0  # softmax temperature over the K mixture tokens (no 1/sqrt(d) scaling)
    # "multi_cls" (Holistic CLIP): M class tokens that do not attend to each other, one embedding each
    # through the shared projection; ignored by the other poolings, as mixture_tokens is by "cls".
    branches: int = 1
    init_std: float | None = None  # None: CLIP's width-scaled init (learns at once; docs/architecture.md, section 6)
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"  # MLP activation; every released Llip config: quick_gelu
    kqv_norm: bool = False  # LayerNorm(D) on Llip keys, values and queries (`use_norm`, released H/14 and G/14)

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.pooling == "llip" and self.embed_dim % self.cross_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by cross_heads {self.cross_heads}")
        if self.pooling != "cls" and self.mixture_tokens < 1:
            raise ValueError("mixture_tokens must be >= 1")
        if self.branches < 1:
            raise ValueError(f"model.branches {self.branches}: must be >= 1 (the number of class tokens of "
                             "pooling multi_cls)")
        if self.tau <= 0:
            raise ValueError("tau must be > 0")
        if self.tokenizer not in ("clip_bpe", "word_hash") or self.vocab not in ("full", "compact"):
            raise ValueError(f"unknown tokenizer {self.tokenizer!r} / vocab {self.vocab!r}; choose clip_bpe or "
                             "word_hash, and full or compact")
        if self.tokenizer == "clip_bpe" and self.vocab == "full" and self.vocab_size < 49408:
            raise ValueError(f"model.vocab_size {self.vocab_size} is below CLIP BPE's 49,408 ids; "
                             "set model.vocab: compact to keep a tiny model's embedding table small")

    @property
    def num_image_tokens(self) -> int:
        """Tokens prepended to the patches: K mixture tokens, or one class token."""
        if self.pooling == "multi_cls":
            return self.branches
        return 1 if self.pooling == "cls" else self.mixture_tokens

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


_B = dict(width=768, layers=12, heads=12, text_width=512, text_layers=12, text_heads=8, embed_dim=512)

# Named sizes. The paper's shapes follow the MetaCLIP/Llip releases (G/14 is the "bigG" shape).
SIZES: dict[str, ModelConfig] = {
    # CPU tests and demos: 32 px images, CLIP BPE with a compact vocabulary (the table's size is set from
    # the training captions when a run starts; 4096 is only the value before that). cross_heads 8, not
    # the released K=8 config's 1: measured on the caption-diversity scenes (README, "Many captions per
    # image": R-precision 0.633 +- 0.014 with 8 heads against 0.532 +- 0.043 with 1, K=8, 300 steps, three
    # seeds, dev Xeon 2026-12-05; issue 24's one seed at 500 steps: 0.685 against 0.451).
    "tiny": ModelConfig(
        image_size=32, patch_size=4, width=128, layers=4, heads=4, context_length=16, vocab_size=4096, vocab="compact",
        text_width=128, text_layers=4, text_heads=4, embed_dim=128, mixture_tokens=8, tau=5.0,
    ),
    # unit tests that only need the shapes to line up
    "micro": ModelConfig(
        image_size=16, patch_size=8, width=32, layers=1, heads=2, context_length=8, vocab_size=512, vocab="compact",
        text_width=32, text_layers=1, text_heads=2, embed_dim=32, mixture_tokens=4, cross_heads=4, tau=5.0,
    ),
    "B/32": ModelConfig(patch_size=32, mixture_tokens=64, tau=5.0, **_B),
    "B/16": ModelConfig(patch_size=16, mixture_tokens=32, tau=5.0, **_B),
    "L/14": ModelConfig(
        patch_size=14, width=1024, layers=24, heads=16, text_width=768, text_layers=12, text_heads=12,
        embed_dim=768, mixture_tokens=64, tau=1.0,
    ),
    "H/14": ModelConfig(
        patch_size=14, width=1280, layers=32, heads=16, text_width=1024, text_layers=24, text_heads=16,
        embed_dim=1024, mixture_tokens=64, tau=5.0, kqv_norm=True,
    ),
    "G/14": ModelConfig(
        patch_size=14, width=1664, layers=48, heads=16, mlp_ratio=8192 / 1664, text_width=1280,
        text_layers=32, text_heads=20, text_mlp_ratio=4.0, embed_dim=1280, mixture_tokens=64, tau=5.0,
        kqv_norm=True,
    ),
}


# Llip's cross-attention heads in the released model configs (facebookresearch/Llip,
# llip/open_clip/model_configs/*-siglip-ncls:K.json, "num_heads"), by (size, K). Every released config
# not listed here has 8: B/32 K=4, 32, 64, 128, 256; B/16 K=32, 64, 256; L/14 K=32..512; H/14 K=64..256;
# G/14 K=64 (the "-alltokens" variants, K=8 and 16 included, also 8). The paper's head ablation
# (B/32 K=64) was released with H = 1, 4, 8 and 16.
RELEASED_CROSS_HEADS: dict[tuple[str, int], int] = {("B/32", 8): 1, ("B/32", 16): 2}
PAPER_SIZES = ("B/32", "B/16", "L/14", "H/14", "G/14")


def released_cross_heads(size: str, mixture_tokens: int) -> int | None:
    """The released config's head count for this size and K (8 unless listed above), None for a size
    that is not one of the paper's."""
    if size not in PAPER_SIZES:
        return None
    return RELEASED_CROSS_HEADS.get((size, mixture_tokens), 8)


def model_config(size: str, **overrides) -> ModelConfig:
    """The named size with fields overridden (None values are ignored). For the paper sizes, unset
    cross_heads follows the released config for the resolved K (B/32 K=8 -> 1, K=16 -> 2, else 8)."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    cfg = SIZES[size].replace(**{k: v for k, v in overrides.items() if v is not None})
    if overrides.get("cross_heads") is None and size in PAPER_SIZES:
        cfg = cfg.replace(cross_heads=released_cross_heads(size, cfg.mixture_tokens))
    return cfg

"""Llip, CLIP/SigLIP and the K-token ablations from one two-tower model.

Image tower: a pre-LN ViT. For `pooling="llip"` (and the "avg"/"register" ablations) K mixture tokens
are prepended to the patch tokens, each with its own positional embedding, and `ln_post` is applied to
the K outputs only. For "cls" one class token is prepended (CLIP/SigLIP baselines).
Text tower: a causal pre-LN transformer pooled at the first end-of-text token.

Llip scoring (docs/architecture.md, section 4): per-mixture-token key/value projections `k_proj, v_proj: (K, width,
D)` give K_i, V_i (K x D, split into H heads); the text's EOT state gives a query `Q = h_t @ q_proj` and,
through a *separate* projection, the text embedding. The text-conditioned image embedding is
`z_ij = concat_h(softmax_K(<K_i, Q_j> / tau) V_i) @ out_proj`, computed by `losses.llip_pair_logits`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llip_core.config import ModelConfig
from llip_core.tokenizer import eot_id, eot_positions


ATTENTION_IMPLS = ("sdpa", "math")


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): OpenAI CLIP's GELU approximation, used by every released Llip config."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str = "gelu"):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = QuickGELU() if activation == "quick_gelu" else nn.GELU()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.causal = causal
        self.impl = "sdpa"  # "math": the explicit softmax(QK^T/sqrt(d))V (train.attention; debugging, parity)
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """attn_mask: (n, n) bool, True where a query may attend (multi_cls pooling); not with causal."""
        b, n, w = x.shape
        q, k, v = self.in_proj(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if self.impl == "math":
            y = math_attention(q, k, v, attn_mask, self.causal)
        else:  # the fused kernel (flash / memory-efficient on GPU, flash on CPU) where the inputs allow
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=self.causal)
        return self.out_proj(y.transpose(1, 2).reshape(b, n, w))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, causal: bool = False, activation: str = "gelu"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(round(width * mlp_ratio)), activation)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, causal: bool = False,
                 activation: str = "gelu"):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList(Block(width, heads, mlp_ratio, causal, activation) for _ in range(layers))
        self.grad_checkpointing = False  # train.grad_checkpointing

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                # keep only each block's input; its activations are recomputed in the backward
                x = checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask)
        return x

    def init_parameters(self, std: float | None) -> None:
        # CLIP's width-scaled init (open_clip `init_parameters`): residual projections shrink with depth,
        # so the residual stream's scale stays put at initialisation.
        attn_std = self.width ** -0.5 if std is None else std
        proj_std = (self.width ** -0.5) * ((2 * self.layers) ** -0.5) if std is None else std
        fc_std = (2 * self.width) ** -0.5 if std is None else std
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj.weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj.bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.zeros_(block.mlp.c_fc.bias)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            nn.init.zeros_(block.mlp.c_proj.bias)


class LlipModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.pooling = cfg.pooling
        self.tau = cfg.tau
        self.eot_id = eot_id(cfg.tokenizer, cfg.vocab)
        D = cfg.embed_dim
        n_tok = cfg.num_image_tokens
        grid = cfg.image_size // cfg.patch_size

        # --- image tower ---
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        if cfg.pooling in ("cls", "multi_cls"):
            self.class_embedding = nn.Parameter(torch.empty(n_tok, cfg.width))
        else:
            self.mixture_tokens = nn.Parameter(torch.empty(cfg.mixture_tokens, cfg.width))
        # one row per prepended token (each mixture token has its own) and one per patch
        self.positional_embedding = nn.Parameter(torch.empty(n_tok + grid * grid, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width)
        self.visual = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, activation=cfg.activation)
        self.ln_post = nn.LayerNorm(cfg.width)
        if cfg.pooling == "llip":
            self.k_proj = nn.Parameter(torch.empty(cfg.mixture_tokens, cfg.width, D))
            self.v_proj = nn.Parameter(torch.empty(cfg.mixture_tokens, cfg.width, D))
            # the released H/14 and G/14 (`use_norm`): LayerNorm over D before the heads split
            norm = (lambda: nn.LayerNorm(D)) if cfg.kqv_norm else nn.Identity
            self.k_norm, self.v_norm, self.q_norm = norm(), norm(), norm()
        elif cfg.pooling in ("avg", "register"):
            # as released (`...-ncls:64-avg/-register`): each of the K tokens has its own projection;
            # avg averages after projecting, register keeps the first projected token
            self.proj = nn.Parameter(torch.empty(cfg.mixture_tokens, cfg.width, D))
        else:
            self.proj = nn.Parameter(torch.empty(cfg.width, D))

        # --- text tower ---
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.text_positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        text_mlp = cfg.mlp_ratio if cfg.text_mlp_ratio is None else cfg.text_mlp_ratio
        self.text = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads, text_mlp, causal=True,
                                activation=cfg.activation)
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.text_width, D))
        if cfg.pooling == "llip":
            self.q_proj = nn.Parameter(torch.empty(cfg.text_width, D))
            self.out_proj = nn.Parameter(torch.empty(D, D))  # applied as z @ out_proj, no bias
        self.init_parameters()

    # ------------------------------------------------------------------ init
    def init_parameters(self) -> None:
        cfg, std = self.cfg, self.cfg.init_std
        vscale = cfg.width ** -0.5 if std is None else std
        tscale = cfg.text_width ** -0.5 if std is None else std
        nn.init.normal_(self.conv1.weight, std=vscale if std is not None else 0.02)
        if cfg.pooling in ("cls", "multi_cls"):
            nn.init.normal_(self.class_embedding, std=vscale)
        else:
            nn.init.normal_(self.mixture_tokens, std=vscale)
        nn.init.normal_(self.positional_embedding, std=vscale)
        self.visual.init_parameters(std)
        if cfg.pooling == "llip":
            nn.init.normal_(self.k_proj, std=vscale)
            nn.init.normal_(self.v_proj, std=vscale)
            nn.init.normal_(self.q_proj, std=tscale)
            nn.init.normal_(self.out_proj, std=cfg.embed_dim ** -0.5 if std is None else std)
        else:
            nn.init.normal_(self.proj, std=vscale)
        nn.init.normal_(self.token_embedding.weight, std=0.02 if std is None else std)
        nn.init.normal_(self.text_positional_embedding, std=0.01 if std is None else std)
        self.text.init_parameters(std)
        nn.init.normal_(self.text_projection, std=tscale)

    # ------------------------------------------------------------------ towers
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """ln_post of the prepended tokens' outputs: (B, K, width), K = 1 for "cls"."""
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, patches, width)
        lead = self.class_embedding if self.pooling in ("cls", "multi_cls") else self.mixture_tokens
        x = torch.cat([lead.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        x = self.ln_pre(x + self.positional_embedding.to(x.dtype))
        multi = self.pooling == "multi_cls" and lead.shape[0] > 1
        x = self.visual(x, branch_attn_mask(lead.shape[0], x.shape[1], x.device) if multi else None)
        return self.ln_post(x[:, : lead.shape[0]])

    def encode_image(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.image_tokens(images)
        if self.pooling == "llip":
            B, K, _ = h.shape
            H = self.cfg.cross_heads
            # a separate projection per mixture token: (B,K,w) x (K,w,D) -> (B,K,D)
            keys = self.k_norm(torch.einsum("bkw,kwd->bkd", h, self.k_proj.to(h.dtype)))
            values = self.v_norm(torch.einsum("bkw,kwd->bkd", h, self.v_proj.to(h.dtype)))
            split = lambda t: t.view(B, K, H, -1).transpose(1, 2)  # (B, H, K, D/H)
            return {"keys": split(keys), "values": split(values)}
        if self.pooling == "multi_cls":
            # one embedding per branch through the shared projection; "image_emb" only when there is
            # one branch, so a loss that wants one embedding per image cannot silently take branch 0
            branches = F.normalize(h @ self.proj.to(h.dtype), dim=-1)  # (B, M, D)
            return {"branch_emb": branches, **({"image_emb": branches[:, 0]} if branches.shape[1] == 1 else {})}
        if self.pooling in ("avg", "register"):
            # all K projections even for register, as released: the unused ones get zero gradient rather
            # than none, which DDP (find_unused_parameters=False) needs
            z = torch.einsum("bkw,kwd->bkd", h, self.proj.to(h.dtype))
            pooled = z.mean(1) if self.pooling == "avg" else z[:, 0]
            return {"image_emb": F.normalize(pooled, dim=-1)}
        return {"image_emb": F.normalize(h[:, 0] @ self.proj.to(h.dtype), dim=-1)}  # "cls"

    def encode_text(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.token_embedding(tokens) + self.text_positional_embedding[: tokens.shape[1]]
        x = self.ln_final(self.text(x))
        # pool at the first EOT, not argmax of ids: our tokenizer's EOT id (2) is not the largest id
        h = x[torch.arange(x.shape[0], device=x.device), eot_positions(tokens, self.eot_id)]
        out = {"text_emb": F.normalize(h @ self.text_projection.to(h.dtype), dim=-1)}
        if self.pooling == "llip":
            out["queries"] = self.q_norm(h @ self.q_proj.to(h.dtype)).view(h.shape[0], self.cfg.cross_heads, -1)
        return out

    # ------------------------------------------------------------------ speed switches (same math)
    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute every transformer block of both towers in the backward (less memory, ~1/3 more compute)."""
        self.visual.grad_checkpointing = self.text.grad_checkpointing = enabled

    def set_attention(self, impl: str) -> None:
        """'sdpa' (fused F.scaled_dot_product_attention, the default) or 'math' (explicit softmax), both towers."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention {impl!r}; choose one of {', '.join(ATTENTION_IMPLS)}")
        for m in self.modules():
            if isinstance(m, SelfAttention):
                m.impl = impl

    def scoring_params(self) -> dict[str, torch.Tensor]:
        """Model tensors the pair scorer needs besides the features (Llip: out_proj)."""
        return {"out_proj": self.out_proj} if self.pooling == "llip" else {}

    def pair_scores(self, img_feats: dict, txt_feats: dict, literal: bool = False,
                    chunk_size: int | None = None, tau: float | None = None) -> torch.Tensor:
        """(B_img, B_txt) cosine similarities, for every pooling; evaluation never branches on type.

        `tau`: Llip's softmax temperature for this call (zero-shot sweeps it); None: the model's."""
        if self.pooling == "llip":
            from llip_core.losses import llip_pair_logits

            return llip_pair_logits(
                img_feats["keys"], img_feats["values"], txt_feats["queries"], txt_feats["text_emb"],
                self.out_proj, self.tau if tau is None else tau, chunk_size=chunk_size, literal=literal,
            )
        if self.pooling == "multi_cls":
            from llip_core.losses import branch_mean_scores

            return branch_mean_scores(img_feats["branch_emb"], txt_feats["text_emb"])
        return img_feats["image_emb"] @ txt_feats["text_emb"].T

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[dict, dict]:
        return self.encode_image(images), self.encode_text(tokens)


def math_attention(q, k, v, attn_mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V over (B, H, n, d), with a bool mask (True: may attend) or causal."""
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        n = q.shape[-2]
        attn_mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf"))
    return s.softmax(-1) @ v


def branch_attn_mask(branches: int, n: int, device=None) -> torch.Tensor:
    """(n, n) bool, True where a query may attend: the first `branches` tokens (Holistic CLIP's class
    tokens) see themselves and the patches but not each other; patches see everything."""
    allowed = torch.ones(n, n, dtype=torch.bool, device=device)
    allowed[:branches, :branches] = torch.eye(branches, dtype=torch.bool, device=device)
    return allowed


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["LlipModel", "count_parameters"]

"""Contrastive losses over features (style: open_clip `src/open_clip/loss.py`).

A loss takes the two towers' feature dicts plus the positive logit scale `s` (and bias `b`), never a
model; its distributed settings (rank, world_size) are constructor arguments; it returns a dict of
named terms whose "loss" is the total. On N ranks with equal local batches, the mean over ranks of
"loss" equals the single-process loss on the concatenated batch, and gradients averaged over ranks (what
DDP does) equal the single-process gradients:
- InfoNCE (`clip`, `llip_infonce`): features are gathered with gradient (`gather_with_grad`); each rank
  scores its own rows against every column ("local loss").
- sigmoid (`siglip`, `llip`): text features (and Llip queries) travel around a ring
  (`neighbour_exchange_with_grad`); other ranks' texts are negatives only.

Llip's text-conditioned scores come from `llip_pair_logits`, which never materialises the
(B_img, B_txt, D) tensor (see its docstring); `literal=True` keeps the paper's formulation for checking.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llip_core.flops import gram_route_cheaper

NORM_EPS = 1e-12  # F.normalize's eps, so the efficient and literal scorers agree at zero norm too
# The Gram route computes ||z_ij||^2 = a^T G_i a as a sum of terms as large as G_i's diagonal, so when
# z_ij nearly cancels (values pointing opposite ways under one attention) its fp32 rounding noise, about
# 1e-7 tr(G_i), can be the whole result, even negative: dividing by its square root gave scores far
# outside [-1, 1]. Below this fraction of the image's Gram trace ||z_ij||^2 is noise, and the score's
# denominator stays at sqrt(REL_NORM_EPS tr(G_i)), so such pairs score about 0.
REL_NORM_EPS = 1e-6


# ============================================================================ Llip pair scores
def llip_pair_logits_literal(keys, values, queries, text_emb, out_proj, tau):
    """The paper's formulation, pair by pair: O(B_img B_txt D) memory. For checking and benchmarks."""
    attn = (torch.einsum("ihkd,jhd->ijhk", keys, queries) / tau).softmax(-1)  # softmax over K
    mixed = torch.einsum("ijhk,ihkd->ijhd", attn, values).flatten(2)  # (B_img, B_txt, D), heads concat
    z = F.normalize(mixed @ out_proj, dim=-1, eps=NORM_EPS)
    return torch.einsum("ijd,jd->ij", z, F.normalize(text_emb, dim=-1, eps=NORM_EPS)).clamp(-1.0, 1.0)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """A chunk (c, H, K, d) -> (H, c, K, d) contiguous: one small copy per chunk."""
    return x.transpose(0, 1).contiguous()


def _gram(vh, c4):
    """G_i[(h,k),(g,l)] = V_i[h,k] C_hg V_i[g,l]^T for a chunk: vh (H, c, K, d) -> (c, HK, HK), symmetric.

    One column block g at a time, so nothing of size (c, HK, D) is alive (O(K D^2) work per image)."""
    H, c, K, d = vh.shape
    G = vh.new_empty(c, H, K, H, K)
    flat = vh.view(H, c * K, d)
    for g in range(H):
        vcg = torch.bmm(flat, c4[:, :, g, :])  # V_i[h,k] C_hg, (H, cK, d)
        vcg = vcg.view(H, c, K, d).transpose(0, 1).reshape(c, H * K, d)
        G[:, :, :, g, :] = torch.bmm(vcg, vh[g].transpose(1, 2)).view(c, H, K, K)
    G = G.view(c, H * K, H * K)
    return (G + G.transpose(1, 2)).mul_(0.5)  # exactly symmetric, as the backward assumes


def _gram_backward(dG, vh, c4, dvh, dc4):
    """G = X C X^T (X block-diagonal V) -> dV += 2 dG X C, dC += X^T dG X; dG symmetric (c, HK, HK)."""
    H, c, K, d = vh.shape
    dG = dG.view(c, H * K, H, K)
    flat = vh.view(H, c * K, d)
    for g in range(H):
        T = torch.bmm(dG[:, :, g, :], vh[g])  # sum_l dG[i,(h,k),(g,l)] V_i[g,l], (c, HK, d)
        T = T.view(c, H, K, d).transpose(0, 1).reshape(H, c * K, d)
        dvh.baddbmm_(T, c4[g].transpose(0, 1), alpha=2.0)  # T @ C_gh (block g, h of C)
        dc4[:, :, g, :] += torch.bmm(flat.transpose(1, 2), T)


def _chunk_forward(kh, vh, qt, pt, c4):
    """Terms of the score for a chunk of c images against all n texts.

    With u_ij = concat_h(a_ij V_i) (heads concatenated) and W = out_proj, z_ij = u_ij W, so
      <z_ij, t_j> = <u_ij, W t_j> = sum_{h,k} a_ij[h,k] <V_i[h,k], p_j[h]>,   p = t W^T (folded text side)
      ||z_ij||^2  = a_ij^T G_i a_ij,  G_i[(h,k),(g,l)] = V_i[h,k] C_hg V_i[g,l]^T,   C = W W^T,
    i.e. a Gram matrix per image in attention space (HK x HK); nothing of size D is built per pair.
    Layout: kh, vh (H, c, K, d); qt = q^T / tau, pt = p^T (H, d, n); per-pair tensors (H, c, K, n), so
    every product is one batched matmul over heads and no per-pair tensor is permuted except once for
    the Gram product. Returns A (H,c,K,n), M = <V, p>, Ac = A as (c, HK, n), AG = G Ac, num, nsq, and
    the floor of nsq (REL_NORM_EPS of each image's Gram trace, at least NORM_EPS^2; shape (c, 1)).
    """
    H, c, K, d = kh.shape
    n = qt.shape[-1]
    A = torch.bmm(kh.view(H, c * K, d), qt).view(H, c, K, n).softmax(2)  # softmax over K
    M = torch.bmm(vh.view(H, c * K, d), pt).view(H, c, K, n)
    num = (A * M).sum((0, 2))  # (c, n)
    Ac = A.permute(1, 0, 2, 3).reshape(c, H * K, n)
    G = _gram(vh, c4)
    floor = (REL_NORM_EPS * G.diagonal(dim1=1, dim2=2).sum(-1, keepdim=True)).clamp_min(NORM_EPS ** 2)
    AG = torch.bmm(G, Ac)  # (c, HK, n)
    del G
    nsq = (AG * Ac).sum(1)  # (c, n)
    return A, M, Ac, AG, num, nsq, floor


class _LlipScores(torch.autograd.Function):
    """Chunked over images; backward recomputes each chunk's per-pair terms instead of storing them.

    keys, values (B_img, H, K, d) as given; qt = (queries / tau)^T and pt = p^T (H, d, B_txt);
    c4 = W W^T as (H, d, H, d)."""

    @staticmethod
    def forward(ctx, keys, values, qt, pt, c4, chunk_size):
        ctx.chunk = chunk_size
        B = keys.shape[0]
        out = keys.new_empty(B, qt.shape[-1])
        for s in range(0, B, chunk_size):
            kh, vh = _heads_first(keys[s:s + chunk_size]), _heads_first(values[s:s + chunk_size])
            *_, num, nsq, floor = _chunk_forward(kh, vh, qt, pt, c4)
            out[s:s + chunk_size] = num / torch.maximum(nsq, floor).sqrt()
        ctx.save_for_backward(keys, values, qt, pt, c4)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        keys, values, qt, pt, c4 = ctx.saved_tensors
        chunk = ctx.chunk
        B, H, K, d = keys.shape
        with torch.autocast(device_type=keys.device.type, enabled=False):
            dkeys, dvalues = torch.empty_like(keys), torch.empty_like(values)
            dqt, dpt, dc4 = torch.zeros_like(qt), torch.zeros_like(pt), torch.zeros_like(c4)
            for s in range(0, B, chunk):
                kh, vh = _heads_first(keys[s:s + chunk]), _heads_first(values[s:s + chunk])
                g = grad_out[s:s + chunk]
                c = kh.shape[1]
                A, M, Ac, AG, num, nsq, floor = _chunk_forward(kh, vh, qt, pt, c4)
                live = nsq > floor  # below the floor the norm is held there: no gradient through it
                nrm = torch.maximum(nsq, floor).sqrt()
                d_num = g / nrm
                d_nsq = torch.where(live, -0.5 * g * num / (nrm * nrm * nrm), torch.zeros_like(nrm))
                # dG_i = sum_j d_nsq_ij a_ij a_ij^T, then Ac is no longer needed
                dG = torch.bmm(Ac * d_nsq[:, None, :], Ac.transpose(1, 2))
                del Ac
                # d score / d a = d_num M + 2 d_nsq G a   (G symmetric: reuses the forward product AG)
                dA = M.mul_(d_num[None, :, None, :])
                dA.addcmul_(AG.view(c, H, K, -1).permute(1, 0, 2, 3), (2 * d_nsq)[None, :, None, :])
                del AG
                dS = dA.sub_((dA * A).sum(2, keepdim=True)).mul_(A).view(H, c * K, -1)  # softmax backward
                dM = A.mul_(d_num[None, :, None, :]).view(H, c * K, -1)
                dkh = torch.bmm(dS, qt.transpose(1, 2))  # (H, cK, d)
                dqt += torch.bmm(kh.view(H, c * K, d).transpose(1, 2), dS)
                del dS
                dpt += torch.bmm(vh.view(H, c * K, d).transpose(1, 2), dM)
                dvh = torch.bmm(dM, pt.transpose(1, 2))  # (H, cK, d)
                del dM, A
                _gram_backward(dG, vh, c4, dvh, dc4)
                dkeys[s:s + chunk] = dkh.view(H, c, K, d).transpose(0, 1)
                dvalues[s:s + chunk] = dvh.view(H, c, K, d).transpose(0, 1)
        return dkeys, dvalues, dqt, dpt, dc4, None


# Auto chunking: per-pair chunk tensors (plus, on the Gram route, the chunk's Gram matrices) of at most
# this many elements. On CPU, 4M fp32 = 16 MB stays under glibc's 32 MB mmap threshold, so chunk
# buffers are reused from the heap instead of being mmapped and page-faulted afresh each time
# (benchmarks/llip_scoring.py here, B=512, before the Gram term was counted: fwd+bwd 3.1 s with 32-image
# chunks, 5.3 s with 128-image ones; B=256 with it: 21-image chunks 1.0 s and 125 MB, 64-image ones
# 1.7 s and 336 MB). CUDA's caching allocator has no such cost, so it gets bigger chunks.
PAIR_BUDGET = {"cpu": 1 << 22, "default": 1 << 26}


def auto_chunk_size(n_txt: int, per_pair: int, device: torch.device, per_image: int = 0) -> int:
    """Images per chunk so that the chunk's per-pair tensors (chunk, n_txt, per_pair) and per-image
    ones (chunk, per_image) together fit PAIR_BUDGET elements. The Gram route's per-image part is its
    (HK x HK) Gram matrices: with few texts (zero-shot: 10 prompts against thousands of images) they,
    not the per-pair tensors, set the peak."""
    budget = PAIR_BUDGET.get(device.type, PAIR_BUDGET["default"])
    return max(1, budget // max(1, n_txt * per_pair + per_image))


def _direct_chunk(keys, values, queries, t, W, tau):
    """The literal formulation for one chunk of images (t already normalised)."""
    attn = (torch.einsum("ihkd,jhd->ijhk", keys, queries) / tau).softmax(-1)
    z = torch.einsum("ijhk,ihkd->ijhd", attn, values).flatten(2) @ W
    return torch.einsum("ijd,jd->ij", z, t) / z.norm(dim=-1).clamp_min(NORM_EPS)  # exact norm: no floor needed


def llip_pair_logits(keys, values, queries, text_emb, out_proj, tau, chunk_size: int | None = None,
                     literal: bool = False, route: str = "auto"):
    """Cosine similarity between each text-conditioned image embedding z_ij and each normalised text.

    keys, values: (B_img, H, K, D/H); queries: (B_txt, H, D/H); text_emb: (B_txt, D); out_proj: (D, D).
    Returns (B_img, B_txt) in [-1, 1]. `z_ij = concat_h(softmax_K(<K_i, Q_j>/tau) V_i) @ out_proj`, normalised
    (a z_ij that cancels to rounding noise of the Gram route scores about 0: see REL_NORM_EPS).

    Efficient path (default), images `chunk_size` at a time (None: from PAIR_BUDGET), the backward
    recomputing each chunk, so no (B_img, B_txt, D) tensor exists and memory is O(chunk * B_txt *
    max(HK, D)). Two routes, each exact:
    - "gram": out_proj is folded into the text side (p_j = W t_j) and into a per-image Gram matrix in
      attention space for the norm: O(KD + (HK)^2) per pair plus O(K D^2 + H K^2 D) per image.
    - "direct": each chunk runs the literal formulation under activation checkpointing, O(KD + D^2)
      per pair, memory bounded by the chunk.
    `route="auto"` (the default) takes whichever costs fewer FLOPs for these shapes
    (llip_core.flops.gram_route_cheaper): the Gram route for training batches when H K < D (every
    released config: B/16 has HK = 256, D = 512), the direct one for large-K ablations (H K >= D,
    where the Gram matrix costs more than out_proj itself) and for a few texts against many images
    (zero-shot prompts), where the per-image Gram matrices would dominate.
    Runs in at least float32 even under autocast (norms via a Gram matrix need the precision).
    """
    if literal:
        return llip_pair_logits_literal(keys, values, queries, text_emb, out_proj, tau)
    dt = torch.promote_types(keys.dtype, torch.float32)  # bf16/fp16 -> fp32, fp64 stays
    B, H, K, d = keys.shape
    D = H * d
    if route not in ("auto", "gram", "direct"):
        raise ValueError(f"llip_pair_logits: route={route!r}; use 'auto', 'gram' or 'direct'")
    gram = route == "gram" or (route == "auto" and gram_route_cheaper(D, K, H, B, queries.shape[0]))
    # per image, besides the per-pair tensors: on the Gram route G_i and the symmetrised copy _gram
    # makes, 2 (HK)^2; on the direct route the einsums' copies of the chunk's keys and values, 2 K D
    # (with a few texts, zero-shot prompts, these set the peak)
    chunk = auto_chunk_size(queries.shape[0], H * K if gram else D, keys.device,
                            2 * (H * K) ** 2 if gram else 2 * K * D) if chunk_size is None else max(1, int(chunk_size))
    with torch.autocast(device_type=keys.device.type, enabled=False):
        W = out_proj.to(dt)
        t = F.normalize(text_emb.to(dt), dim=-1, eps=NORM_EPS)
        keys, values, queries = keys.to(dt).contiguous(), values.to(dt).contiguous(), queries.to(dt)
        if not gram:
            from torch.utils.checkpoint import checkpoint

            return torch.cat([
                checkpoint(_direct_chunk, keys[s:s + chunk], values[s:s + chunk], queries, t, W, tau,
                           use_reentrant=False)
                for s in range(0, B, chunk)
            ]).clamp(-1.0, 1.0)
        qt = (queries / tau).permute(1, 2, 0).contiguous()  # (H, d, B_txt)
        pt = (t @ W.T).view(-1, H, d).permute(1, 2, 0).contiguous()
        c4 = (W @ W.T).view(H, d, H, d).contiguous()
        # a cosine: rounding can step past +-1 by an ulp, and nothing upstream expects more
        return _LlipScores.apply(keys, values, qt, pt, c4, chunk).clamp(-1.0, 1.0)


# ============================================================================ scorers
def dot_scores(image_features: dict, text_features: dict) -> torch.Tensor:
    """CLIP/SigLIP: one normalised embedding per image and per text."""
    return image_features["image_emb"] @ text_features["text_emb"].T


class LlipScorer:
    """Text-conditioned scores; needs the model's out_proj (passed as a scoring parameter)."""

    def __init__(self, tau: float, chunk_size: int | None = None, literal: bool = False):
        self.tau, self.chunk_size, self.literal = tau, chunk_size, literal

    def __call__(self, image_features: dict, text_features: dict, out_proj: torch.Tensor) -> torch.Tensor:
        return llip_pair_logits(
            image_features["keys"], image_features["values"], text_features["queries"],
            text_features["text_emb"], out_proj, self.tau, chunk_size=self.chunk_size, literal=self.literal,
        )


# ============================================================================ distributed helpers
class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and returns this rank's slice.

    (torch.distributed.nn's all_gather needs reduce_scatter or all_to_all in backward; gloo has
    neither in every build, all_reduce it has.)"""

    @staticmethod
    def forward(ctx, tensor, group):
        import torch.distributed as dist

        ctx.group = group
        ctx.rank, ctx.world = dist.get_rank(group), dist.get_world_size(group)
        parts = [torch.empty_like(tensor) for _ in range(ctx.world)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(ctx.world)[ctx.rank], None


def gather_with_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's tensor (equal shapes) along dim 0; gradients flow back to their owner."""
    return _GatherWithGrad.apply(tensor, group)


def neighbour_exchange(from_rank: int, to_rank: int, tensor: torch.Tensor, group=None) -> torch.Tensor:
    import torch.distributed as dist

    recv = torch.empty_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor.contiguous(), to_rank, group=group),
           dist.P2POp(dist.irecv, recv, from_rank, group=group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return recv


class _NeighbourExchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, from_rank, to_rank, group):
        ctx.from_rank, ctx.to_rank, ctx.group = from_rank, to_rank, group
        return neighbour_exchange(from_rank, to_rank, tensor, group)

    @staticmethod
    def backward(ctx, grad):
        # the gradient travels the ring backwards, to the rank the tensor came from
        return _NeighbourExchange.apply(grad, ctx.to_rank, ctx.from_rank, ctx.group), None, None, None


def neighbour_exchange_with_grad(from_rank: int, to_rank: int, tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Send `tensor` to `to_rank`, receive one from `from_rank`; backward sends gradients back."""
    return _NeighbourExchange.apply(tensor, from_rank, to_rank, group)


def neighbour_exchange_bidir(left: int, right: int, to_left: torch.Tensor, to_right: torch.Tensor,
                             group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Send one tensor to each neighbour and receive one from each: (from_left, from_right)."""
    import torch.distributed as dist

    from_left, from_right = torch.empty_like(to_right), torch.empty_like(to_left)
    ops = [dist.P2POp(dist.isend, to_left.contiguous(), left, group=group),
           dist.P2POp(dist.isend, to_right.contiguous(), right, group=group),
           dist.P2POp(dist.irecv, from_left, left, group=group),
           dist.P2POp(dist.irecv, from_right, right, group=group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return from_left, from_right


class _NeighbourExchangeBidir(torch.autograd.Function):
    @staticmethod
    def forward(ctx, left, right, group, to_left, to_right):
        ctx.left, ctx.right, ctx.group = left, right, group
        return neighbour_exchange_bidir(left, right, to_left, to_right, group)

    @staticmethod
    def backward(ctx, grad_from_left, grad_from_right):
        # each gradient goes back to the neighbour it came from; what arrives from the left is the
        # gradient of what this rank sent left, and likewise on the right
        g_left = grad_from_left if grad_from_left is not None else torch.zeros(0)
        g_right = grad_from_right if grad_from_right is not None else torch.zeros(0)
        back_left, back_right = _NeighbourExchangeBidir.apply(ctx.left, ctx.right, ctx.group, g_left, g_right)
        return None, None, None, back_left, back_right


def neighbour_exchange_bidir_with_grad(left: int, right: int, to_left: torch.Tensor, to_right: torch.Tensor,
                                       group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`neighbour_exchange_bidir` whose backward returns each gradient to its sender."""
    return _NeighbourExchangeBidir.apply(left, right, group, to_left, to_right)


def _pack(features: dict, keys: tuple[str, ...]) -> tuple[torch.Tensor, list]:
    """Several per-sample tensors as one (B, F) tensor, so one message carries them all."""
    parts = [features[k] for k in keys]
    layout = [(k, t.shape[1:], t[0].numel()) for k, t in zip(keys, parts)]
    return torch.cat([t.reshape(t.shape[0], -1) for t in parts], dim=1), layout


def _unpack(packed: torch.Tensor, layout: list) -> dict:
    out, i = {}, 0
    for k, shape, n in layout:
        out[k] = packed[:, i:i + n].reshape(packed.shape[0], *shape)
        i += n
    return out


# ============================================================================ losses
class SigmoidLoss(nn.Module):
    """`-sum_ij log sigmoid(y_ij (s * score_ij + b)) / B_local`, y = +1 on the diagonal, -1 elsewhere.

    Other ranks' texts arrive around a ring and contribute negatives only. The ring runs both ways at
    once (open_clip's bidir=True): (N-1)//2 hops each send one message left and one right, then one
    rightward hop when N is even reaches the opposite rank, so about N/2 hops instead of N-1."""

    def __init__(self, scorer: Callable, text_keys: tuple[str, ...], rank: int = 0, world_size: int = 1,
                 group=None):
        super().__init__()
        self.scorer, self.text_keys = scorer, text_keys
        self.rank, self.world_size, self.group = rank, world_size, group

    def _terms(self, scores, logit_scale, logit_bias, positives: bool):
        logits = logit_scale * scores + logit_bias
        labels = -torch.ones_like(logits)
        if positives:
            labels = labels + 2 * torch.eye(*logits.shape, device=logits.device, dtype=logits.dtype)
        return -F.logsigmoid(labels * logits).sum() / logits.shape[0]

    def forward(self, image_features: dict, text_features: dict, logit_scale, logit_bias, **scoring):
        loss = self._terms(self.scorer(image_features, text_features, **scoring), logit_scale, logit_bias, True)
        if self.world_size > 1:
            right, left = (self.rank + 1) % self.world_size, (self.rank - 1) % self.world_size
            packed, layout = _pack(text_features, self.text_keys)
            negatives = lambda p: self._terms(  # noqa: E731
                self.scorer(image_features, _unpack(p, layout), **scoring), logit_scale, logit_bias, False)
            to_left = to_right = packed
            both_ways, one_more = divmod(self.world_size - 1, 2)
            for _ in range(both_ways):
                from_left, from_right = neighbour_exchange_bidir_with_grad(left, right, to_left, to_right, self.group)
                loss = loss + negatives(from_left) + negatives(from_right)
                to_left, to_right = from_right, from_left  # each stream keeps its direction
            if one_more:  # N even: the opposite rank's texts, one more hop rightwards
                loss = loss + negatives(neighbour_exchange_with_grad(left, right, to_right, self.group))
        return {"loss": loss}


class InfoNCELoss(nn.Module):
    """`(CE(s S, arange) + CE(s S^T, arange)) / 2` over cosine scores S (image rows, text columns).

    Distributed: features gathered with gradient; each rank computes the rows of its own images and
    texts against all columns ("local loss"), labels offset by rank * B_local."""

    def __init__(self, scorer: Callable, image_keys: tuple[str, ...], text_keys: tuple[str, ...],
                 rank: int = 0, world_size: int = 1, group=None):
        super().__init__()
        self.scorer, self.image_keys, self.text_keys = scorer, image_keys, text_keys
        self.rank, self.world_size, self.group = rank, world_size, group

    def forward(self, image_features: dict, text_features: dict, logit_scale, logit_bias=None, **scoring):
        b = next(iter(image_features.values())).shape[0]
        if self.world_size > 1:
            all_img = {k: gather_with_grad(image_features[k], self.group) for k in self.image_keys}
            all_txt = {k: gather_with_grad(text_features[k], self.group) for k in self.text_keys}
            i2t = logit_scale * self.scorer(image_features, all_txt, **scoring)  # (b, B)
            t2i = logit_scale * self.scorer(all_img, text_features, **scoring).T  # (b, B)
        else:
            i2t = logit_scale * self.scorer(image_features, text_features, **scoring)
            t2i = i2t.T
        labels = torch.arange(b, device=i2t.device) + self.rank * b
        loss_i2t, loss_t2i = F.cross_entropy(i2t, labels), F.cross_entropy(t2i, labels)
        return {"loss": (loss_i2t + loss_t2i) / 2, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}


LOSS_TYPES = ("clip", "siglip", "llip", "llip_infonce", "holistic")
# (initial log logit scale, initial logit bias or None): docs/architecture.md, section 4
LOSS_INITS = {
    "clip": (math.log(1 / 0.07), None),
    # open_clip's SigLIP configs and Llip's own SigLIP baseline; the SigLIP paper's init is
    # SIGLIP_INITS["siglip_paper"] (loss.siglip_init in the YAML)
    "siglip": (math.log(1 / 0.07), -10.0),
    "llip": (math.log(1 / 0.07), -10.0),
    "llip_infonce": (math.log(1 / 0.07), None),
    "holistic": (math.log(1 / 0.07), None),  # CLIP's InfoNCE per branch
}
# the sigmoid baseline's init, by name: open_clip/Llip keep CLIP's scale; the SigLIP paper starts at 10
SIGLIP_INITS = {"open_clip": (math.log(1 / 0.07), -10.0), "siglip_paper": (math.log(10.0), -10.0)}


def prior_bias(global_batch: int) -> float:
    """SigLIP's prior argument for the bias: with one positive among n texts per image, a logit of
    about -ln n makes the initial sigmoid match the fraction of positives. -10 (every released Llip
    and open_clip SigLIP config) is -ln 22,026, right for the paper's 32k batch; at batch 128 the
    prior is -ln 128 = -4.85."""
    if global_batch < 2:
        raise ValueError(f"the prior bias needs a global batch of at least 2 (got {global_batch})")
    return -math.log(global_batch)


def initial_logits(loss_type: str, siglip_init: str = "open_clip", init_bias: float | str | None = None,
                   global_batch: int | None = None) -> tuple[float, float | None]:
    """(initial log logit scale, initial logit bias or None) of a loss type. init_bias replaces the
    sigmoid losses' -10: a number, or "auto" = prior_bias(global_batch); the InfoNCE losses have no
    bias (they are invariant to a shared one) and ignore it."""
    if loss_type not in LOSS_INITS:
        raise ValueError(f"unknown loss type {loss_type!r}; choose one of {LOSS_TYPES}")
    if siglip_init not in SIGLIP_INITS:
        raise ValueError(f"unknown siglip_init {siglip_init!r}; choose one of {', '.join(SIGLIP_INITS)}")
    log_scale, bias = SIGLIP_INITS[siglip_init] if loss_type == "siglip" else LOSS_INITS[loss_type]
    if bias is None or init_bias is None:
        return log_scale, bias
    if init_bias == "auto":
        if global_batch is None:
            raise ValueError("init_bias 'auto' is -ln(global batch): pass global_batch")
        return log_scale, prior_bias(global_batch)
    if isinstance(init_bias, str) or not math.isfinite(float(init_bias)):
        raise ValueError(f"init_bias {init_bias!r}: give a finite number or 'auto'")
    return log_scale, float(init_bias)


def build_loss(loss_type: str, rank: int = 0, world_size: int = 1, tau: float = 5.0,
               literal_scorer: bool = False, chunk_size: int | None = None, group=None,
               multi_caption: bool = False, diversity_weight: float = 1.0,
               diversity_margin: float = 0.7) -> nn.Module:
    """multi_caption: the loss takes M captions per image with a caption_mask (data.captions: all)."""
    if loss_type == "holistic":
        return HolisticLoss(rank, world_size, group, diversity_weight, diversity_margin)
    # the same four losses, each taking every caption of an image as its positive when multi_caption
    infonce, sigmoid = ((MultiCaptionInfoNCELoss, MultiCaptionSigmoidLoss) if multi_caption
                        else (InfoNCELoss, SigmoidLoss))
    if loss_type == "clip":
        return infonce(dot_scores, ("image_emb",), ("text_emb",), rank, world_size, group)
    if loss_type == "siglip":
        return sigmoid(dot_scores, ("text_emb",), rank, world_size, group)
    llip = LlipScorer(tau, chunk_size, literal_scorer)
    if loss_type == "llip":
        return sigmoid(llip, ("queries", "text_emb"), rank, world_size, group)
    if loss_type == "llip_infonce":
        return infonce(llip, ("keys", "values"), ("queries", "text_emb"), rank, world_size, group)
    raise ValueError(f"unknown loss type {loss_type!r}; choose one of {LOSS_TYPES}")


def ClipLoss(rank: int = 0, world_size: int = 1, group=None) -> InfoNCELoss:
    return build_loss("clip", rank, world_size, group=group)


def SigLipLoss(rank: int = 0, world_size: int = 1, group=None) -> SigmoidLoss:
    return build_loss("siglip", rank, world_size, group=group)


def LlipLoss(tau: float, rank: int = 0, world_size: int = 1, literal_scorer: bool = False,
             chunk_size: int | None = None, group=None) -> SigmoidLoss:
    return build_loss("llip", rank, world_size, tau, literal_scorer, chunk_size, group)


def LlipInfoNCELoss(tau: float, rank: int = 0, world_size: int = 1, literal_scorer: bool = False,
                    chunk_size: int | None = None, group=None) -> InfoNCELoss:
    return build_loss("llip_infonce", rank, world_size, tau, literal_scorer, chunk_size, group)


# ============================================================================ several captions per image
# Text features of a batch with M caption slots per image are image-major: row i*M + m is caption m of
# image i; `caption_mask` (B_local, M) marks the real captions (shorter lists are padded). Every loss in
# this section takes it, and normalises by the number of real captions in the *global* batch, so the
# mean over ranks of "loss" is the single-process loss on the concatenated batch, as above.
def branch_mean_scores(branch_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Holistic CLIP's evaluation score: the cosine of each branch embedding with each text, averaged
    over branches (the paper averages logits; one shared scale makes that the same ranking).
    branch_emb (B_img, M, D), text_emb (B_txt, D) -> (B_img, B_txt); one branch: the plain cosine."""
    return torch.einsum("imd,jd->ij", branch_emb, text_emb) / branch_emb.shape[1]


def _caption_mask(caption_mask, n_img: int, n_txt: int, device) -> torch.Tensor:
    if caption_mask is not None:
        if caption_mask.shape[0] != n_img or caption_mask.numel() != n_txt:
            raise ValueError(f"caption_mask {tuple(caption_mask.shape)} does not fit {n_img} images and "
                             f"{n_txt} text rows (rows image-major, M per image)")
        return caption_mask.bool()
    if n_txt % n_img:
        raise ValueError(f"{n_txt} text rows for {n_img} images: give caption_mask or M captions per image")
    return torch.ones(n_img, n_txt // n_img, dtype=torch.bool, device=device)


def _gather_plain(tensor: torch.Tensor, world_size: int, group=None) -> torch.Tensor:
    """all_gather without gradient (masks, counts)."""
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


def _global_scale(mask: torch.Tensor, world_size: int, group=None) -> torch.Tensor:
    """world_size / (real captions in the global batch): turns a rank's sum of terms into its share."""
    n = mask.sum().to(torch.float64)
    if world_size > 1:
        import torch.distributed as dist

        n = n.clone()
        dist.all_reduce(n, group=group)
    return world_size / n.clamp_min(1)


class MultiCaptionInfoNCELoss(nn.Module):
    """InfoNCE over M caption slots per image (`clip`, `llip_infonce` with data.captions: all).

    image->text: one term per (image i, real caption c of i),
        -log( e^{l_ic} / (e^{l_ic} + sum_{c' real, not of i} e^{l_ic'}) ),
    so every caption of i is a positive, the captions of other images are the negatives, and i's other
    captions are neither; text->image: one cross-entropy per real caption over all images. Each
    direction is averaged over the real captions, and the loss is their mean: with M = 1 it is
    InfoNCELoss exactly. Distributed as InfoNCELoss (features gathered with gradient, local rows)."""

    multi_caption = True

    def __init__(self, scorer: Callable, image_keys: tuple[str, ...], text_keys: tuple[str, ...],
                 rank: int = 0, world_size: int = 1, group=None):
        super().__init__()
        self.scorer, self.image_keys, self.text_keys = scorer, image_keys, text_keys
        self.rank, self.world_size, self.group = rank, world_size, group

    def forward(self, image_features: dict, text_features: dict, logit_scale, logit_bias=None,
                caption_mask=None, **scoring):
        b = next(iter(image_features.values())).shape[0]
        n_txt = next(iter(text_features.values())).shape[0]
        device = next(iter(image_features.values())).device
        mask = _caption_mask(caption_mask, b, n_txt, device)
        M = mask.shape[1]
        if self.world_size > 1:
            all_img = {k: gather_with_grad(image_features[k], self.group) for k in self.image_keys}
            all_txt = {k: gather_with_grad(text_features[k], self.group) for k in self.text_keys}
            all_mask = _gather_plain(mask, self.world_size, self.group)
        else:
            all_img, all_txt, all_mask = image_features, text_features, mask
        i2t = logit_scale * self.scorer(image_features, all_txt, **scoring)  # (b, B*M)
        t2i = logit_scale * self.scorer(all_img, text_features, **scoring).T  # (b*M, B)
        rows = torch.arange(b, device=device) + self.rank * b  # global ids of this rank's images
        owner = torch.arange(all_mask.shape[0], device=device).repeat_interleave(M)
        negative = all_mask.reshape(-1)[None, :] & (owner[None, :] != rows[:, None])  # (b, B*M)
        pos = i2t.gather(1, rows[:, None] * M + torch.arange(M, device=device)[None, :])  # (b, M)
        # log-sum-exp of the negatives once per image; the finite floor (not -inf) keeps a row without
        # negatives (a batch of one image) free of NaN gradients, and adds exactly 0 otherwise
        lse_neg = i2t.masked_fill(~negative, torch.finfo(i2t.dtype).min).logsumexp(1)
        term_i2t = torch.logaddexp(pos, lse_neg[:, None]) - pos
        term_t2i = F.cross_entropy(t2i, rows.repeat_interleave(M), reduction="none").view(b, M)
        scale = _global_scale(mask, self.world_size, self.group).to(i2t.dtype)
        zero = torch.zeros((), dtype=i2t.dtype, device=device)
        loss_i2t = torch.where(mask, term_i2t, zero).sum() * scale
        loss_t2i = torch.where(mask, term_t2i, zero).sum() * scale
        return {"loss": (loss_i2t + loss_t2i) / 2, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i}


class MultiCaptionSigmoidLoss(nn.Module):
    """The sigmoid loss over M caption slots per image (`siglip`, `llip` with data.captions: all):
    `-sum_{i, c real} log sigmoid(y_ic (s * score_ic + b)) / B_local`, y_ic = +1 when c is a caption of
    image i, -1 otherwise. With M = 1 it is SigmoidLoss. Other ranks' captions (and their mask) come
    around a ring and are negatives only."""

    multi_caption = True

    def __init__(self, scorer: Callable, text_keys: tuple[str, ...], rank: int = 0, world_size: int = 1,
                 group=None):
        super().__init__()
        self.scorer, self.text_keys = scorer, text_keys
        self.rank, self.world_size, self.group = rank, world_size, group

    @staticmethod
    def _terms(scores, valid, logit_scale, logit_bias, M: int, positives: bool):
        logits = logit_scale * scores + logit_bias
        b = logits.shape[0]
        labels = -torch.ones_like(logits)
        if positives:
            owner = torch.arange(logits.shape[1], device=logits.device) // M
            labels = torch.where(owner[None, :] == torch.arange(b, device=logits.device)[:, None], 1.0, labels)
        terms = -F.logsigmoid(labels * logits)
        return torch.where(valid[None, :], terms, torch.zeros_like(terms)).sum() / b

    def forward(self, image_features: dict, text_features: dict, logit_scale, logit_bias,
                caption_mask=None, **scoring):
        b = next(iter(image_features.values())).shape[0]
        n_txt = next(iter(text_features.values())).shape[0]
        mask = _caption_mask(caption_mask, b, n_txt, next(iter(image_features.values())).device)
        M = mask.shape[1]
        valid = mask.reshape(-1)
        loss = self._terms(self.scorer(image_features, text_features, **scoring), valid, logit_scale,
                           logit_bias, M, True)
        if self.world_size > 1:
            right, left = (self.rank + 1) % self.world_size, (self.rank - 1) % self.world_size
            ref = text_features[self.text_keys[0]]
            feats = {**text_features, "_valid": valid[:, None].to(ref.dtype)}
            packed, layout = _pack(feats, self.text_keys + ("_valid",))
            for _ in range(self.world_size - 1):
                packed = neighbour_exchange_with_grad(left, right, packed, self.group)
                other = _unpack(packed, layout)
                other_valid = other.pop("_valid")[:, 0] > 0.5
                loss = loss + self._terms(self.scorer(image_features, other, **scoring), other_valid,
                                          logit_scale, logit_bias, M, False)
        return {"loss": loss}


class HolisticLoss(nn.Module):
    """Holistic CLIP's multi-to-multi loss (arXiv 2412.00440; the official open_clip fork's loss).

    image_features["branch_emb"] (B_local, M_b, D) normalised; text_features["text_emb"] (B_local*M_c, D)
    normalised, image-major, with caption_mask (B_local, M_c). Each caption slot c is one CLIP problem
    over the batch (image rows against slot-c captions, slot-c caption rows against images):
    - slot c is paired with branch c when M_c >= M_b and c < M_b (so M_c = M_b pairs branch k with
      caption k, as the official code does);
    - every other slot is free-matched: caption c of image i takes the branch k_ic = argmax_k
      <branch_k(i), caption_c(i)> (its best positive score); image i's row scores that branch against
      all slot-c captions, and caption c's row scores branch k_ic of every image.
    Cross-entropy both ways, averaged over the real captions of the global batch, then halved (CLIP).
    Diversity: `weight * max(mean over images of the mean off-diagonal cosine between the image's
    branches - margin, 0)`, the official code's hinge on the batch mean (margin 0.7).
    Distributed as InfoNCELoss: features gathered with gradient, each rank its own rows; the batch
    mean of the diversity term is taken over the global batch."""

    multi_caption = True

    def __init__(self, rank: int = 0, world_size: int = 1, group=None, diversity_weight: float = 1.0,
                 diversity_margin: float = 0.7):
        super().__init__()
        self.rank, self.world_size, self.group = rank, world_size, group
        self.diversity_weight, self.diversity_margin = diversity_weight, diversity_margin

    def forward(self, image_features: dict, text_features: dict, logit_scale, logit_bias=None,
                caption_mask=None, **scoring):
        img = image_features["branch_emb"]
        b, Mb, D = img.shape
        mask = _caption_mask(caption_mask, b, text_features["text_emb"].shape[0], img.device)
        Mc = mask.shape[1]
        txt = text_features["text_emb"].view(b, Mc, D)
        if self.world_size > 1:
            all_img, all_txt = gather_with_grad(img, self.group), gather_with_grad(txt, self.group)
            all_mask = _gather_plain(mask, self.world_size, self.group)
        else:
            all_img, all_txt, all_mask = img, txt, mask
        B = all_img.shape[0]
        local = torch.arange(b, device=img.device)
        rows = local + self.rank * b
        zero = torch.zeros((), dtype=img.dtype, device=img.device)
        total = zero
        for c in range(Mc):
            t_all, t_loc = all_txt[:, c], txt[:, c]
            if Mc >= Mb and c < Mb:
                i2t = img[:, c] @ t_all.T  # (b, B)
                t2i = t_loc @ all_img[:, c].T  # (b, B)
            else:
                with torch.no_grad():
                    k = torch.einsum("bmd,bd->bm", img, t_loc).argmax(1)  # (b,)
                i2t = img[local, k] @ t_all.T
                t2i = torch.einsum("jbd,bd->bj", all_img[:, k], t_loc)
            # a padded caption is no candidate; a row's own column stays so no row is empty
            cand = all_mask[:, c][None, :] | (torch.arange(B, device=img.device)[None, :] == rows[:, None])
            i2t = (logit_scale * i2t).masked_fill(~cand, float("-inf"))
            ce = F.cross_entropy(i2t, rows, reduction="none") + F.cross_entropy(logit_scale * t2i, rows, reduction="none")
            total = total + torch.where(mask[:, c], ce, zero).sum()
        contrastive = total / 2 * _global_scale(mask, self.world_size, self.group).to(img.dtype)
        out = {"contrastive": contrastive}
        loss = contrastive
        if Mb > 1:
            gram = img @ img.transpose(1, 2)  # (b, Mb, Mb)
            off = (gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(1)) / (Mb * (Mb - 1))
            if self.world_size > 1:
                off = gather_with_grad(off, self.group)
            diversity = torch.clamp(off.mean() - self.diversity_margin, min=0)
            out["diversity"] = diversity
            loss = loss + self.diversity_weight * diversity
        out["loss"] = loss
        return out

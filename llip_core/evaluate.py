"""Zero-shot classification and image<->text retrieval for every model type.

Features come from `model.encode_image` / `model.encode_text` and every score from `pair_scores` here
(which calls `model.pair_scores`): for Llip the score of (image, text) is the cosine between the
text-conditioned image embedding and the text embedding; for the others it is the plain cosine. Evaluation never branches on the model type,
and a model whose image side has several branches (Holistic CLIP) needs changes in `pair_scores` only.

Protocols
- Retrieval (COCO / clip_benchmark): an image may have several captions. Image->text: the image is
  retrieved at k if ANY of its captions is in the top k. Text->image: each caption is a query whose
  positive is its own image; averaged over captions. Captions with identical token sequences are one
  text (they cannot be told apart, so neither may count as the other's negative); such a text is a
  positive for every image it captions.
- Zero-shot: per class, prompts from every template; normalised text embeddings are averaged and
  renormalised and (Llip) queries averaged, so the class's mean query conditions the image.
- Ties are not free and not fatal: a positive tied with t negatives (and q-1 other positives) is ranked
  by the expected value of a uniformly random order of the tied items. A model that scores everything
  alike gets exactly chance (k / N for one positive), neither 0 nor 1.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F


def _encode(fn: Callable, x: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    parts = [fn(x[s:s + batch_size]) for s in range(0, x.shape[0], batch_size)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _rows(feats: dict, s: int, e: int) -> dict:
    return {k: v[s:e] for k, v in feats.items()}


def pair_scores(model, img_feats: dict, txt_feats: dict, batch_size: int = 256,
                tau: Optional[float] = None) -> torch.Tensor:
    """(N_img, N_txt) float32 scores, image blocks of `batch_size` against all texts.

    The single place evaluation turns features into scores; `tau` (Llip only) overrides the model's
    softmax temperature for this call."""
    kwargs = {} if tau is None else {"tau": float(tau)}
    n = next(iter(img_feats.values())).shape[0]
    return torch.cat([model.pair_scores(_rows(img_feats, s, s + batch_size), txt_feats, **kwargs).float()
                      for s in range(0, n, batch_size)])


_ROWS_PER_BLOCK = 1024


def expected_hits(scores: torch.Tensor, positive: torch.Tensor, ks: Sequence[int]) -> dict[int, torch.Tensor]:
    """Per row, the probability that some positive column ranks within the top k when tied scores
    are put in a uniformly random order.

    scores, positive: (R, C), positive boolean with at least one True per row. With s* the best
    positive score, g the negatives scoring above s*, t the negatives and q the positives at s*, the
    number X of tied negatives ahead of the first tied positive has P(X >= j) = C(t, j) / C(t+q, j), and
    the row is a hit at k when g + X < k."""
    if not bool(positive.any(1).all()):
        raise ValueError("every row needs at least one positive column")
    if scores.shape[0] > _ROWS_PER_BLOCK:  # bounded float64 copies on COCO-sized score matrices
        parts = [expected_hits(scores[i:i + _ROWS_PER_BLOCK], positive[i:i + _ROWS_PER_BLOCK], ks)
                 for i in range(0, scores.shape[0], _ROWS_PER_BLOCK)]
        return {k: torch.cat([p[k] for p in parts]) for k in ks}
    s = scores.double()
    best = s.masked_fill(~positive, float("-inf")).max(1, keepdim=True).values
    neg = ~positive
    g = (neg & (s > best)).sum(1).double()
    t = (neg & (s == best)).sum(1).double()
    q = (positive & (s == best)).sum(1).double()
    out = {}
    for k in ks:
        j = k - g  # tied negatives that may still come first
        jc = torch.clamp(j, min=0.0)
        jc = torch.minimum(jc, t)
        # log C(t, j) - log C(t+q, j) = lgamma(t+1) - lgamma(t-j+1) - lgamma(t+q+1) + lgamma(t+q-j+1)
        log_p = (torch.lgamma(t + 1) - torch.lgamma(t - jc + 1)
                 - torch.lgamma(t + q + 1) + torch.lgamma(t + q - jc + 1))
        p_at_least = torch.where(j > t, torch.zeros_like(t), log_p.exp())
        hit = torch.where(j <= 0, torch.zeros_like(t), 1.0 - p_at_least)
        out[k] = hit.clamp(0.0, 1.0)
    return out


def unique_texts(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique token rows (U, L), index of each caption's row (N_cap,))."""
    uniq, inverse = torch.unique(tokens, dim=0, return_inverse=True)
    return uniq, inverse


@torch.no_grad()
def retrieval_recall(model, images: torch.Tensor, tokens: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                     batch_size: int = 256, caption_image: Optional[torch.Tensor] = None,
                     tau: Optional[float] = None) -> dict[str, float]:
    """Recall@k both ways: "i2t_r@k", "t2i_r@k" and their mean "r@k".

    images: (N_img, ...); tokens: (N_cap, L); caption_image: (N_cap,) the image each caption belongs
    to (default: caption i belongs to image i, which needs N_cap == N_img)."""
    n_img = images.shape[0]
    if caption_image is None:
        if n_img != tokens.shape[0]:
            raise ValueError(f"{n_img} images but {tokens.shape[0]} captions; pass caption_image to pair them")
        caption_image = torch.arange(n_img)
    caption_image = torch.as_tensor(caption_image, device=tokens.device).long()
    if caption_image.shape[0] != tokens.shape[0]:
        raise ValueError(f"caption_image has {caption_image.shape[0]} entries for {tokens.shape[0]} captions")
    if n_img == 0 or int(caption_image.min()) < 0 or int(caption_image.max()) >= n_img:
        raise ValueError(f"caption_image must index the {n_img} images")
    if torch.bincount(caption_image.cpu(), minlength=n_img).min() == 0:
        raise ValueError("every image needs at least one caption")

    uniq, inverse = unique_texts(tokens)
    img = _encode(model.encode_image, images, batch_size)
    txt = _encode(model.encode_text, uniq, batch_size)
    S = pair_scores(model, img, txt, batch_size, tau)  # (N_img, U)
    positive = torch.zeros(n_img, uniq.shape[0], dtype=torch.bool, device=S.device)
    positive[caption_image.to(S.device), inverse.to(S.device)] = True

    i2t = expected_hits(S, positive, ks)
    t2i_uniq = expected_hits(S.T, positive.T, ks)  # one row per distinct text
    weight = torch.bincount(inverse.cpu(), minlength=uniq.shape[0]).to(S.device).double()
    out = {}
    for k in ks:
        a = float(i2t[k].mean())
        b = float((t2i_uniq[k] * weight).sum() / weight.sum())  # averaged over captions, as COCO
        out[f"i2t_r@{k}"], out[f"t2i_r@{k}"], out[f"r@{k}"] = a, b, (a + b) / 2
    return out


def retrieval_chance(tokens: torch.Tensor, caption_image: torch.Tensor, n_img: int,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """What a model scoring every pair alike gets on this set under the protocol above: k / N for
    one caption per image, more when captions repeat across images (such a text has several positive
    images) or an image has several distinct captions."""
    uniq, inverse = unique_texts(tokens)
    caption_image = torch.as_tensor(caption_image).long().cpu()
    positive = torch.zeros(n_img, uniq.shape[0], dtype=torch.bool)
    positive[caption_image, inverse.cpu()] = True
    flat = torch.zeros(positive.shape)
    i2t, t2i = expected_hits(flat, positive, ks), expected_hits(flat.T, positive.T, ks)
    weight = torch.bincount(inverse.cpu(), minlength=uniq.shape[0]).double()
    out = {}
    for k in ks:
        out[f"i2t_r@{k}"] = float(i2t[k].mean())
        out[f"t2i_r@{k}"] = float((t2i[k] * weight).sum() / weight.sum())
    return out


def class_text_features(model, class_names: Sequence[str], templates: Sequence, tokenizer,
                        device=None, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """One feature set per class, averaged over prompt templates.

    Templates: format strings with "{c}" (clip_benchmark) or "{}" (open_clip), or callables
    name -> prompt. Text embeddings are averaged after normalisation and renormalised (CLIP); Llip's
    queries are averaged too, so each class's mean query conditions the image (docs/architecture.md, section 4)."""
    prompts = [format_prompt(t, c) for c in class_names for t in templates]
    tokens = torch.as_tensor(tokenizer(prompts), device=device)
    feats = _encode(model.encode_text, tokens, batch_size)
    C, T = len(class_names), len(templates)
    out = {k: v.reshape(C, T, *v.shape[1:]).mean(1) for k, v in feats.items()}
    out["text_emb"] = F.normalize(out["text_emb"], dim=-1)
    return out


def format_prompt(template, name: str) -> str:
    if callable(template):
        return template(name)
    return template.replace("{c}", name) if "{c}" in template else template.format(name)


@torch.no_grad()
def zero_shot_classify(model, images: torch.Tensor, labels, class_names: Sequence[str], templates: Sequence,
                       tokenizer, batch_size: int = 256, taus: Optional[Sequence[float]] = None) -> dict[str, float]:
    """Top-1 (and top-5 when there are more than 5 classes) accuracy of prompting with class names.

    `tokenizer`: list[str] -> int array (batch, context). `taus` (Llip): evaluate at each softmax
    temperature, reported as "top1@tau=5" etc.; None: the model's own tau, reported as "top1"."""
    labels = torch.as_tensor(labels, device=images.device).long()
    C = len(class_names)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= C):
        raise ValueError(f"class index {int(labels.max()) if int(labels.max()) >= C else int(labels.min())} "
                         f"out of range for {C} class names")
    cls = class_text_features(model, class_names, templates, tokenizer, images.device, batch_size)
    img = _encode(model.encode_image, images, batch_size)
    ks = (1, 5) if C > 5 else (1,)
    positive = F.one_hot(labels, C).bool()
    out = {}
    for tau in (taus if taus else [None]):
        S = pair_scores(model, img, cls, batch_size, tau)
        suffix = "" if tau is None else f"@tau={tau:g}"
        for k, v in expected_hits(S, positive, ks).items():
            out[f"top{k}{suffix}"] = float(v.mean())
    return out

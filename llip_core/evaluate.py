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
- Images that several captions describe (a scene of m objects, one caption each): per image,
  R-precision, the fraction of its m distinct true texts among its top-m texts (m varies by image;
  reported overall and per m); per caption, the average precision of the images it describes over
  the whole image gallery (mAP, averaged over captions as text->image recall is). Both are 1 for a
  perfect model. Captions with identical tokens are one text here too: m counts distinct texts.
- Ties are not free and not fatal: a positive tied with t negatives (and q-1 other positives) is ranked
  by the expected value of a uniformly random order of the tied items. A model that scores everything
  alike gets exactly chance (k / N for one positive, m / N_texts for R-precision), neither 0 nor 1.
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


def _blocked(fn: Callable, scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """fn over row blocks: bounded float64 copies on COCO-sized score matrices."""
    if scores.shape[0] <= _ROWS_PER_BLOCK:
        return fn(scores, positive)
    return torch.cat([fn(scores[i:i + _ROWS_PER_BLOCK], positive[i:i + _ROWS_PER_BLOCK])
                      for i in range(0, scores.shape[0], _ROWS_PER_BLOCK)])


def expected_r_precision(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Per row, the expected fraction of its P positive columns among its top P columns when tied
    scores are put in a uniformly random order (R-precision, R = P).

    With v the P-th highest score, a columns above v (p_a of them positive) and t columns at v (q
    positive), the top P holds all of the a and P - a of the t drawn at random: expected positives
    p_a + (P - a) q / t."""
    if not bool(positive.any(1).all()):
        raise ValueError("every row needs at least one positive column")
    return _blocked(_r_precision, scores, positive)


def _r_precision(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    s = scores.double()
    P = positive.sum(1)
    v = s.sort(1, descending=True).values.gather(1, (P - 1).unsqueeze(1))
    above, tied = s > v, s == v
    a, pa = above.sum(1).double(), (above & positive).sum(1).double()
    t, q = tied.sum(1).double(), (tied & positive).sum(1).double()
    return (pa + (P.double() - a) * q / t) / P.double()


def expected_average_precision(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Per row, the expected average precision (mean over positive columns of the precision at their
    rank) when tied scores are put in a uniformly random order.

    A group of n tied columns holding r positives, after s columns of which c are positive: its
    position k (1..n) is positive with probability r/n, and then holds c + 1 + (k-1)(r-1)/(n-1)
    positives in expectation at rank s + k, so the group adds sum_k (r/n)(c + 1 + (k-1)(r-1)/(n-1)) / (s + k)
    (McSherry and Najork 2008). Exact, O(C log C) per row."""
    if not bool(positive.any(1).all()):
        raise ValueError("every row needs at least one positive column")
    return _blocked(_average_precision, scores, positive)


def _average_precision(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    s = scores.double()
    R, C = s.shape
    order = s.argsort(1, descending=True)
    ss, pp = s.gather(1, order), positive.gather(1, order).double()
    new = torch.ones_like(ss, dtype=torch.bool)
    new[:, 1:] = ss[:, 1:] != ss[:, :-1]
    gid = new.long().cumsum(1) - 1  # tie group of each sorted position
    size = torch.zeros_like(ss).scatter_add_(1, gid, torch.ones_like(ss))
    rel = torch.zeros_like(ss).scatter_add_(1, gid, pp)
    start, before = size.cumsum(1) - size, rel.cumsum(1) - rel
    n, r, s0, c = size.gather(1, gid), rel.gather(1, gid), start.gather(1, gid), before.gather(1, gid)
    k = torch.arange(1, C + 1, dtype=ss.dtype, device=ss.device).expand(R, C) - s0
    within = torch.where(n > 1, (k - 1) * (r - 1) / (n - 1).clamp(min=1), torch.zeros_like(n))
    return ((r / n) * (c + 1 + within) / (s0 + k)).sum(1) / pp.sum(1)


def multi_caption_metrics(scores: torch.Tensor, positive: torch.Tensor,
                          text_weight: Optional[torch.Tensor] = None) -> dict[str, float]:
    """R-precision and mAP for images that several texts describe.

    scores, positive: (N_img, N_text) over distinct texts, every image and text with a positive.
    text_weight: captions per distinct text (mAP is averaged over captions; default 1 each).
    Returns "rprec" (mean over images), "map", and "rprec_m{m}" for each number m of true texts an
    image has, only when some image has more than one (otherwise R-precision is image->text R@1 and
    a by-m split says nothing)."""
    rp = expected_r_precision(scores, positive)
    ap = expected_average_precision(scores.T, positive.T)
    w = torch.ones(ap.shape[0], dtype=torch.float64, device=ap.device) if text_weight is None \
        else text_weight.to(ap.device).double()
    out = {"rprec": float(rp.mean()), "map": float((ap * w).sum() / w.sum())}
    m = positive.sum(1)
    if int(m.max()) > 1:
        for v in sorted(set(m.tolist())):
            out[f"rprec_m{v}"] = float(rp[m == v].mean())
    return out


def unique_texts(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique token rows (U, L), index of each caption's row (N_cap,))."""
    uniq, inverse = torch.unique(tokens, dim=0, return_inverse=True)
    return uniq, inverse


def _caption_owner(n_img: int, tokens: torch.Tensor, caption_image: Optional[torch.Tensor]) -> torch.Tensor:
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
    return caption_image


def _positives(tokens: torch.Tensor, caption_image: torch.Tensor, n_img: int, device=None):
    """(distinct texts, positive (N_img, U), captions per distinct text (U,))."""
    uniq, inverse = unique_texts(tokens)
    positive = torch.zeros(n_img, uniq.shape[0], dtype=torch.bool, device=device)
    positive[caption_image.to(positive.device), inverse.to(positive.device)] = True
    weight = torch.bincount(inverse.cpu(), minlength=uniq.shape[0]).to(positive.device).double()
    return uniq, positive, weight


def _recall(S: torch.Tensor, positive: torch.Tensor, weight: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    i2t = expected_hits(S, positive, ks)
    t2i_uniq = expected_hits(S.T, positive.T, ks)  # one row per distinct text
    out = {}
    for k in ks:
        a = float(i2t[k].mean())
        b = float((t2i_uniq[k] * weight).sum() / weight.sum())  # averaged over captions, as COCO
        out[f"i2t_r@{k}"], out[f"t2i_r@{k}"], out[f"r@{k}"] = a, b, (a + b) / 2
    return out


def _retrieval_scores(model, images, tokens, batch_size, caption_image, tau):
    n_img = images.shape[0]
    caption_image = _caption_owner(n_img, tokens, caption_image)
    uniq, inverse = unique_texts(tokens)
    img = _encode(model.encode_image, images, batch_size)
    txt = _encode(model.encode_text, uniq, batch_size)
    S = pair_scores(model, img, txt, batch_size, tau)  # (N_img, U)
    _, positive, weight = _positives(tokens, caption_image, n_img, S.device)
    return S, positive, weight


@torch.no_grad()
def retrieval_recall(model, images: torch.Tensor, tokens: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                     batch_size: int = 256, caption_image: Optional[torch.Tensor] = None,
                     tau: Optional[float] = None) -> dict[str, float]:
    """Recall@k both ways: "i2t_r@k", "t2i_r@k" and their mean "r@k".

    images: (N_img, ...); tokens: (N_cap, L); caption_image: (N_cap,) the image each caption belongs
    to (default: caption i belongs to image i, which needs N_cap == N_img)."""
    S, positive, weight = _retrieval_scores(model, images, tokens, batch_size, caption_image, tau)
    return _recall(S, positive, weight, ks)


@torch.no_grad()
def retrieval_metrics(model, images: torch.Tensor, tokens: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                      batch_size: int = 256, caption_image: Optional[torch.Tensor] = None,
                      tau: Optional[float] = None) -> dict[str, float]:
    """retrieval_recall's keys plus multi_caption_metrics' ("rprec", "rprec_m{m}", "map"), from one
    scoring pass."""
    S, positive, weight = _retrieval_scores(model, images, tokens, batch_size, caption_image, tau)
    return {**_recall(S, positive, weight, ks), **multi_caption_metrics(S, positive, weight)}


def retrieval_chance(tokens: torch.Tensor, caption_image: torch.Tensor, n_img: int,
                     ks: Sequence[int] = (1, 5, 10), multi: bool = False) -> dict[str, float]:
    """What a model scoring every pair alike gets on this set under the protocol above: k / N for
    one caption per image, more when captions repeat across images (such a text has several positive
    images) or an image has several distinct captions. multi: also multi_caption_metrics' keys
    (R-precision m / N_texts per image)."""
    caption_image = _caption_owner(n_img, tokens.cpu(), torch.as_tensor(caption_image).cpu())
    _, positive, weight = _positives(tokens.cpu(), caption_image, n_img)
    flat = torch.zeros(positive.shape)
    i2t, t2i = expected_hits(flat, positive, ks), expected_hits(flat.T, positive.T, ks)
    out = {}
    for k in ks:
        out[f"i2t_r@{k}"] = float(i2t[k].mean())
        out[f"t2i_r@{k}"] = float((t2i[k] * weight).sum() / weight.sum())
    if multi:
        out.update(multi_caption_metrics(flat, positive, weight))
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

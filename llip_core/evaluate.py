"""Zero-shot classification and image<->text retrieval for every model type.

Both go through `model.encode_image`, `model.encode_text` and `model.pair_scores`, so they never branch
on the model type: for Llip the score of (image, text) is the cosine between the text-conditioned image
embedding and the text embedding; for the others it is the plain cosine.

Ties are counted against the positive (its rank is the number of candidates scoring >= it, itself
excluded), so a collapsed model that scores everything alike gets recall ~0, not 1.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def _encode(fn: Callable, x: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    parts = [fn(x[s:s + batch_size]) for s in range(0, x.shape[0], batch_size)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _rows(feats: dict, s: int, e: int) -> dict:
    return {k: v[s:e] for k, v in feats.items()}


def _scores(model, img_feats: dict, txt_feats: dict, batch_size: int) -> torch.Tensor:
    """(N_img, N_txt) scores, image blocks of `batch_size` against all texts."""
    n = next(iter(img_feats.values())).shape[0]
    return torch.cat([model.pair_scores(_rows(img_feats, s, s + batch_size), txt_feats)
                      for s in range(0, n, batch_size)]).float()


def _hits(scores: torch.Tensor, target: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of rows whose target column ranks within the top k (ties count against it)."""
    pos = scores.gather(1, target[:, None])
    rank = (scores >= pos).sum(1) - 1
    return {k: float((rank < k).float().mean()) for k in ks}


@torch.no_grad()
def retrieval_recall(model, images: torch.Tensor, tokens: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                     batch_size: int = 256) -> dict[str, float]:
    """Recall@k with image i paired to caption i: "i2t_r@k", "t2i_r@k" and their mean "r@k"."""
    if images.shape[0] != tokens.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {tokens.shape[0]} captions; pairs are (i, i)")
    img = _encode(model.encode_image, images, batch_size)
    txt = _encode(model.encode_text, tokens, batch_size)
    S = _scores(model, img, txt, batch_size)
    target = torch.arange(S.shape[0], device=S.device)
    i2t, t2i = _hits(S, target, ks), _hits(S.T, target, ks)
    out = {}
    for k in ks:
        out[f"i2t_r@{k}"], out[f"t2i_r@{k}"] = i2t[k], t2i[k]
        out[f"r@{k}"] = (i2t[k] + t2i[k]) / 2
    return out


def class_text_features(model, class_names: Sequence[str], templates: Sequence, tokenizer,
                        device=None, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """One feature set per class, averaged over prompt templates.

    Text embeddings are averaged after normalisation and renormalised (CLIP); Llip's queries are
    averaged too, so each class's mean query conditions the image (DESIGN.md section 2)."""
    prompts = [t(c) if callable(t) else t.format(c) for c in class_names for t in templates]
    tokens = torch.as_tensor(tokenizer(prompts), device=device)
    feats = _encode(model.encode_text, tokens, batch_size)
    C, T = len(class_names), len(templates)
    out = {k: v.reshape(C, T, *v.shape[1:]).mean(1) for k, v in feats.items()}
    out["text_emb"] = F.normalize(out["text_emb"], dim=-1)
    return out


@torch.no_grad()
def zero_shot_classify(model, images: torch.Tensor, labels, class_names: Sequence[str], templates: Sequence,
                       tokenizer, batch_size: int = 256) -> dict[str, float]:
    """Top-1 (and top-5 when there are at least 5 classes) accuracy of prompting with class names.

    `templates`: format strings with one "{}" or callables name -> prompt; `tokenizer`: list[str] ->
    int array (batch, context)."""
    labels = torch.as_tensor(labels, device=images.device).long()
    cls = class_text_features(model, class_names, templates, tokenizer, images.device, batch_size)
    img = _encode(model.encode_image, images, batch_size)
    S = _scores(model, img, cls, batch_size)
    ks = (1, 5) if len(class_names) >= 5 else (1,)
    return {f"top{k}": v for k, v in _hits(S, labels, ks).items()}

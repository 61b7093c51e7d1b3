"""R-precision and mean average precision for images that several captions describe
(llip_core.evaluate), against brute-force references written from the definitions: every ordering
of the columns that sorts the scores (ties in every possible order, each equally likely), the metric
computed on each ordering from its definition, and the average taken."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from llip_core.evaluate import (expected_average_precision, expected_r_precision, multi_caption_metrics,
                                retrieval_chance, retrieval_metrics, retrieval_recall)

torch.set_num_threads(1)


def orderings(row):
    """Every permutation of the columns whose scores do not increase (all tie orders)."""
    row = [float(x) for x in row]
    return [p for p in itertools.permutations(range(len(row)))
            if all(row[p[i]] >= row[p[i + 1]] for i in range(len(p) - 1))]


def ref_rprec(row, pos):
    R = sum(pos)
    vals = [sum(pos[j] for j in p[:R]) / R for p in orderings(row)]
    return sum(vals) / len(vals)


def ref_ap(row, pos):
    vals = []
    for p in orderings(row):
        hits, precs = 0, []
        for rank, j in enumerate(p, 1):
            if pos[j]:
                hits += 1
                precs.append(hits / rank)
        vals.append(sum(precs) / len(precs))
    return sum(vals) / len(vals)


def _random_case(seed, R=5, C=6, levels=3):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (R, C), generator=g).float()  # few levels: many ties
    positive = torch.rand(R, C, generator=g) < 0.4
    positive[torch.arange(R), torch.randint(0, C, (R,), generator=g)] = True  # every row has one
    return scores, positive


@pytest.mark.parametrize("seed", range(8))
def test_r_precision_and_ap_equal_the_brute_force_over_tie_orders(seed):
    scores, positive = _random_case(seed)
    rp = expected_r_precision(scores, positive)
    ap = expected_average_precision(scores, positive)
    for i in range(scores.shape[0]):
        row, pos = scores[i].tolist(), positive[i].tolist()
        assert rp[i].item() == pytest.approx(ref_rprec(row, pos), abs=1e-12)
        assert ap[i].item() == pytest.approx(ref_ap(row, pos), abs=1e-12)


def test_distinct_scores_give_the_textbook_values():
    # ranking: pos, neg, pos, neg, neg, pos -> AP = (1/1 + 2/3 + 3/6) / 3; R = 3: top 3 hold 2
    scores = torch.tensor([[6.0, 5, 4, 3, 2, 1]])
    positive = torch.tensor([[1, 0, 1, 0, 0, 1]], dtype=torch.bool)
    assert expected_average_precision(scores, positive).item() == pytest.approx((1 + 2 / 3 + 3 / 6) / 3)
    assert expected_r_precision(scores, positive).item() == pytest.approx(2 / 3)


def test_perfect_model_is_one_and_constant_model_is_chance():
    torch.manual_seed(0)
    positive = torch.rand(7, 9) < 0.3
    positive[torch.arange(7), torch.arange(7)] = True
    perfect = positive.float() + 0.01 * torch.rand(7, 9)  # every positive above every negative
    assert torch.allclose(expected_r_precision(perfect, positive), torch.ones(7, dtype=torch.float64))
    assert torch.allclose(expected_average_precision(perfect, positive), torch.ones(7, dtype=torch.float64))
    flat = torch.zeros(7, 9)
    m = positive.sum(1).double()
    assert torch.allclose(expected_r_precision(flat, positive), m / 9)  # chance: m / N
    # all tied: every placement of the P positives among the 9 ranks is equally likely
    for i in range(7):
        P = int(m[i])
        aps = [sum((j + 1) / (r + 1) for j, r in enumerate(ranks)) / P for ranks in itertools.combinations(range(9), P)]
        want = sum(aps) / len(aps)
        assert expected_average_precision(flat[i:i + 1], positive[i:i + 1]).item() == pytest.approx(want, abs=1e-12)


def test_large_matrices_are_blocked_without_changing_the_values():
    scores, positive = _random_case(3, R=2100, C=7, levels=4)
    whole = torch.cat([expected_average_precision(scores[i:i + 700], positive[i:i + 700]) for i in range(0, 2100, 700)])
    assert torch.equal(expected_average_precision(scores, positive), whole)
    whole = torch.cat([expected_r_precision(scores[i:i + 700], positive[i:i + 700]) for i in range(0, 2100, 700)])
    assert torch.equal(expected_r_precision(scores, positive), whole)


def test_rows_without_a_positive_are_refused():
    with pytest.raises(ValueError, match="at least one positive"):
        expected_r_precision(torch.zeros(2, 3), torch.tensor([[True, False, False], [False] * 3]))


class TableModel:
    """"Images" and "tokens" are row indices into hand-built feature tables (plain cosine scores)."""

    def __init__(self, image_emb, text_emb):
        self.image_emb, self.text_emb = image_emb, text_emb

    def encode_image(self, idx):
        return {"image_emb": self.image_emb[idx]}

    def encode_text(self, idx):
        return {"text_emb": self.text_emb[idx[:, 0]]}

    def pair_scores(self, img, txt):
        return img["image_emb"] @ txt["text_emb"].T


def _scene_set():
    """5 concept texts; 6 scenes of 1-3 objects; captions name the objects (so texts repeat across
    images: "cat" is one text, a positive for every scene holding a cat)."""
    scenes = [[0], [1, 2], [0, 3], [2, 3, 4], [4], [1, 3]]
    tokens = torch.tensor([[c] for s in scenes for c in s])
    owner = torch.tensor([i for i, s in enumerate(scenes) for _ in s])
    return scenes, tokens, owner


def _reference_metrics(S, scenes, n_text):
    """From the definitions, per image and per caption, with the brute-force tie references."""
    per_img = [ref_rprec(S[i].tolist(), [c in s for c in range(n_text)]) for i, s in enumerate(scenes)]
    caps = [c for s in scenes for c in s]  # one query per caption, repeats included
    aps = [ref_ap(S[:, c].tolist(), [c in s for s in scenes]) for c in caps]
    out = {"rprec": sum(per_img) / len(per_img), "map": sum(aps) / len(aps)}
    for m in sorted({len(s) for s in scenes}):
        vals = [v for v, s in zip(per_img, scenes) if len(s) == m]
        out[f"rprec_m{m}"] = sum(vals) / len(vals)
    return out


def test_retrieval_metrics_on_scenes_match_the_definitions_with_ties():
    scenes, tokens, owner = _scene_set()
    g = torch.Generator().manual_seed(1)
    # quantised features: many exactly tied scores
    img = torch.randint(-1, 2, (6, 3), generator=g).float()
    txt = torch.randint(-1, 2, (5, 3), generator=g).float()
    model = TableModel(img, txt)
    out = retrieval_metrics(model, torch.arange(6), tokens, ks=(1, 2), caption_image=owner)
    want = _reference_metrics(img @ txt.T, scenes, 5)
    assert {k: v for k, v in out.items() if k.startswith(("rprec", "map"))}.keys() == want.keys()
    for k, v in want.items():
        assert out[k] == pytest.approx(v, abs=1e-12), k
    # the recall keys are retrieval_recall's, from the same scores
    assert {k: v for k, v in out.items() if "r@" in k} == retrieval_recall(model, torch.arange(6), tokens, ks=(1, 2),
                                                                        caption_image=owner)


def test_perfect_and_constant_models_on_scenes():
    scenes, tokens, owner = _scene_set()
    # image i's embedding is the sum of its objects' one-hot vectors: each true text scores 1, others 0
    txt = torch.eye(5)
    img = torch.stack([txt[s].sum(0) for s in scenes])
    out = retrieval_metrics(TableModel(img, txt), torch.arange(6), tokens, ks=(1,), caption_image=owner)
    assert out["rprec"] == pytest.approx(1.0) and out["map"] == pytest.approx(1.0)
    assert all(out[f"rprec_m{m}"] == pytest.approx(1.0) for m in (1, 2, 3))
    const = TableModel(torch.ones(6, 5), torch.ones(5, 5))
    got = retrieval_metrics(const, torch.arange(6), tokens, ks=(1,), caption_image=owner)
    for m in (1, 2, 3):
        assert got[f"rprec_m{m}"] == pytest.approx(m / 5)  # m true texts among 5
    chance = retrieval_chance(tokens, owner, 6, ks=(1,), multi=True)
    for k in ("rprec", "rprec_m1", "rprec_m2", "rprec_m3", "map", "i2t_r@1", "t2i_r@1"):
        assert chance[k] == pytest.approx(got[k], abs=1e-12), k


def test_identical_captions_are_one_text_and_single_caption_sets_get_no_by_m_split():
    # two images, each captioned "a" twice (identical tokens) and once "b"/"c": m = 2 distinct texts each
    tokens = torch.tensor([[0], [0], [1], [0], [2]])
    owner = torch.tensor([0, 0, 0, 1, 1])
    txt = torch.eye(3)
    img = torch.stack([txt[0] + txt[1], txt[0] + txt[2]])
    out = retrieval_metrics(TableModel(img, txt), torch.arange(2), tokens, ks=(1,), caption_image=owner)
    assert set(k for k in out if k.startswith("rprec")) == {"rprec", "rprec_m2"}
    assert out["rprec_m2"] == pytest.approx(1.0)
    # one caption per image: R-precision is image->text R@1, and there are no rprec_m keys (not zeros)
    torch.manual_seed(0)
    feats = F.normalize(torch.randn(8, 4), dim=-1)
    one = retrieval_metrics(TableModel(feats, feats[torch.randperm(8)]), torch.arange(8), torch.arange(8)[:, None],
                            ks=(1,))
    assert not any(k.startswith("rprec_m") for k in one)
    assert one["rprec"] == pytest.approx(one["i2t_r@1"]) and 0 <= one["map"] <= 1
    assert not any(k.startswith("rprec_m") for k in retrieval_chance(torch.arange(8)[:, None], torch.arange(8), 8,
                                                                     ks=(1,), multi=True))


def test_multi_caption_metrics_weights_map_by_captions():
    # text 0 captions two images (AP 1), text 1 one image ranked last of 2 (AP 1/2)
    scores = torch.tensor([[1.0, 0.5], [1.0, 0.0]])
    positive = torch.tensor([[True, False], [True, True]])
    out = multi_caption_metrics(scores, positive, torch.tensor([2.0, 1.0]))
    assert out["map"] == pytest.approx((2 * 1.0 + 1 * 0.5) / 3)
    assert out["rprec_m1"] == pytest.approx(1.0) and out["rprec_m2"] == pytest.approx(1.0)
    assert math.isclose(out["rprec"], 1.0)

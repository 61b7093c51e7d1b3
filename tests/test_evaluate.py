"""Evaluation functions on hand-built features with known answers, and against loop references."""
import pytest
import torch
import torch.nn.functional as F

from llip_core.config import SIZES
from llip_core.evaluate import class_text_features, expected_hits, retrieval_recall, zero_shot_classify
from llip_core.losses import llip_pair_logits
from llip_core.model import LlipModel
from llip_core.tokenizer import WordHashTokenizer

torch.set_num_threads(1)


class TableModel:
    """A stand-in model: "images" and "tokens" are row indices into hand-built feature tables."""

    def __init__(self, image_table: dict, text_table: dict, tau: float = 1.0):
        self.image_table, self.text_table, self.tau = image_table, text_table, tau

    def encode_image(self, idx):
        return {k: v[idx] for k, v in self.image_table.items()}

    def encode_text(self, idx):
        idx = idx[:, 0] if idx.ndim == 2 else idx
        return {k: v[idx] for k, v in self.text_table.items()}

    def pair_scores(self, img, txt):
        if "keys" in img:
            D = txt["text_emb"].shape[1]
            return llip_pair_logits(img["keys"], img["values"], txt["queries"], txt["text_emb"],
                                    torch.eye(D), self.tau, chunk_size=3)
        return img["image_emb"] @ txt["text_emb"].T


def test_retrieval_known_answer_dot():
    torch.manual_seed(0)
    N = 20
    text = F.normalize(torch.randn(N, 16), dim=-1)
    perm = torch.arange(N)
    perm[15:] = torch.tensor([16, 17, 18, 19, 15])  # the last 5 images look exactly like another caption
    model = TableModel({"image_emb": text[perm]}, {"text_emb": text})
    out = retrieval_recall(model, torch.arange(N), torch.arange(N), ks=(1, 5), batch_size=7)
    assert out["i2t_r@1"] == pytest.approx(15 / 20) and out["t2i_r@1"] == pytest.approx(15 / 20)
    assert out["r@1"] == pytest.approx(15 / 20)
    assert set(out) == {"i2t_r@1", "i2t_r@5", "t2i_r@1", "t2i_r@5", "r@1", "r@5"}


def test_retrieval_all_equal_scores_give_chance_not_zero_or_one():
    N = 12
    same = F.normalize(torch.ones(N, 4), dim=-1)
    out = retrieval_recall(TableModel({"image_emb": same}, {"text_emb": same}), torch.arange(N), torch.arange(N),
                           ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert out[f"i2t_r@{k}"] == pytest.approx(k / N) and out[f"t2i_r@{k}"] == pytest.approx(k / N)


def _loop_recall(S, k):
    n = S.shape[0]
    i2t = sum(sum(1 for j in range(n) if j != i and S[i, j] >= S[i, i]) < k for i in range(n)) / n
    t2i = sum(sum(1 for j in range(n) if j != i and S[j, i] >= S[i, i]) < k for i in range(n)) / n
    return i2t, t2i


@pytest.mark.parametrize("pooling", ["llip", "cls", "avg", "register"])
def test_retrieval_real_model_matches_loop_reference(pooling):
    torch.manual_seed(0)
    cfg = SIZES["micro"].replace(pooling=pooling)
    m = LlipModel(cfg)
    N = 11
    images = torch.randn(N, 3, cfg.image_size, cfg.image_size)
    tok = WordHashTokenizer(cfg.vocab_size, cfg.context_length)
    tokens = torch.as_tensor(tok([f"caption number {i} {'x' * (i % 3)}" for i in range(N)]))
    out = retrieval_recall(m, images, tokens, ks=(1, 2, 5), batch_size=4)
    with torch.no_grad():
        S = m.pair_scores(m.encode_image(images), m.encode_text(tokens), literal=True)
    for k in (1, 2, 5):
        i2t, t2i = _loop_recall(S, k)
        assert out[f"i2t_r@{k}"] == pytest.approx(i2t) and out[f"t2i_r@{k}"] == pytest.approx(t2i)


class _IdTokenizer:
    """Prompts -> rows of the text table: "template|class" strings look up a prepared index."""

    def __init__(self, index):
        self.index = index

    def __call__(self, prompts):
        return torch.tensor([[self.index[p]] for p in prompts])


def test_zero_shot_llip_known_answer_needs_template_averaging():
    """H=1, K=2, D=2, out_proj = I; token k's key is 3 e_k in every image.

    Template t of class c has query 4 e_c + (+/-)6 e_{1-c}: alone it attends to token 1-c, but the mean
    over templates, 4 e_c, attends to token c. Text embeddings e_c +/- 0.3 e_{1-c} average to e_c.
    Image 0 (class 0) has values (e_0, -e_1), image 1 (class 1) has (-e_0, e_1): conditioned on its own
    class's token each image matches its class with cosine 1 and the other with -1, so averaging queries
    gives top-1 = 1; a single template attends to the wrong token and gets every image wrong."""
    e = torch.eye(2)
    keys = (3.0 * e).expand(2, 1, 2, 2)  # (images, H, K, d)
    values = torch.stack([torch.stack([e[0], -e[1]]), torch.stack([-e[0], e[1]])])[:, None]
    index, queries, texts = {}, [], []
    for c in range(2):
        for t, sign in enumerate((1.0, -1.0)):
            index[f"t{t}|c{c}"] = len(queries)
            queries.append(4.0 * e[c] + sign * 6.0 * e[1 - c])
            texts.append(F.normalize(e[c] + sign * 0.3 * e[1 - c], dim=-1))
    model = TableModel({"keys": keys, "values": values},
                       {"queries": torch.stack(queries)[:, None], "text_emb": torch.stack(texts)}, tau=1.0)
    tok, labels = _IdTokenizer(index), torch.tensor([0, 1])

    cls = class_text_features(model, ["c0", "c1"], ["t0|{}", "t1|{}"], tok)
    torch.testing.assert_close(cls["queries"][:, 0], 4.0 * e)
    torch.testing.assert_close(cls["text_emb"], e)
    S = model.pair_scores(model.encode_image(torch.arange(2)), cls)
    torch.testing.assert_close(S, torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), atol=1e-4, rtol=0)

    assert zero_shot_classify(model, torch.arange(2), labels, ["c0", "c1"], ["t0|{}", "t1|{}"], tok) == {"top1": 1.0}
    assert zero_shot_classify(model, torch.arange(2), labels, ["c0", "c1"], ["t0|{}"], tok) == {"top1": 0.0}


def test_zero_shot_known_answer_dot_top1_top5():
    torch.manual_seed(0)
    C, T = 6, 3
    base = F.normalize(torch.randn(C, 32), dim=-1)
    index, texts = {}, []
    for c in range(C):
        for t in range(T):
            index[f"t{t}|c{c}"] = len(texts)
            texts.append(F.normalize(base[c] + 0.05 * torch.randn(32), dim=-1))
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])
    img = base[labels].clone()
    img[7] = F.normalize(base[3] + 0.5 * base[1], dim=-1)  # label 1, looks like class 3, class 1 runner-up
    model = TableModel({"image_emb": img}, {"text_emb": torch.stack(texts)})
    names = [f"c{c}" for c in range(C)]
    out = zero_shot_classify(model, torch.arange(8), labels, names, [f"t{t}|{{}}" for t in range(T)],
                             _IdTokenizer(index), batch_size=3)
    assert out == {"top1": pytest.approx(7 / 8), "top5": pytest.approx(1.0)}
    out = zero_shot_classify(model, torch.arange(8), labels[:8] % 4, names[:4], ["t0|{}"], _IdTokenizer(index))
    assert set(out) == {"top1"}


@pytest.mark.parametrize("pooling", ["llip", "cls", "avg", "register"])
def test_zero_shot_real_model_matches_loop_reference(pooling):
    torch.manual_seed(0)
    cfg = SIZES["micro"].replace(pooling=pooling)
    m = LlipModel(cfg)
    tok = WordHashTokenizer(cfg.vocab_size, cfg.context_length)
    names = ["cat", "dog", "red apple", "tree", "car", "boat"]
    templates = ["a photo of a {}.", "a {} in the wild", lambda c: f"art of {c}"]
    images = torch.randn(9, 3, cfg.image_size, cfg.image_size)
    labels = torch.arange(9) % 6
    out = zero_shot_classify(m, images, labels, names, templates, tok, batch_size=4)
    with torch.no_grad():
        img = m.encode_image(images)
        scores = torch.zeros(9, 6)
        for c, name in enumerate(names):
            prompts = [t(name) if callable(t) else t.format(name) for t in templates]
            f = m.encode_text(torch.as_tensor(tok(prompts)))
            emb = f["text_emb"].mean(0)
            feats = {"text_emb": (emb / emb.norm())[None]}
            if pooling == "llip":
                feats["queries"] = f["queries"].mean(0)[None]
            scores[:, c] = m.pair_scores(img, feats, literal=True)[:, 0]
    ranks = torch.tensor([sum(1 for c in range(6) if c != labels[i] and scores[i, c] >= scores[i, labels[i]])
                          for i in range(9)])
    assert out["top1"] == pytest.approx(float((ranks < 1).float().mean()))
    assert out["top5"] == pytest.approx(float((ranks < 5).float().mean()))


# ----------------------------------------------------------------------------------------------
# protocols: perfect / shuffled models, several captions per image, duplicate captions, ties
# ----------------------------------------------------------------------------------------------
def _tie_order_reference(scores, positive, k):
    """Exact expectation over every order of tied scores, by enumerating permutations (tiny rows)."""
    import itertools

    hits = []
    for s, p in zip(scores.tolist(), positive.tolist()):
        n = len(s)
        tot, cnt = 0.0, 0
        for perm in itertools.permutations(range(n)):
            # a random tie-break: sort by (-score, position in perm)
            pos_in = {c: i for i, c in enumerate(perm)}
            order = sorted(range(n), key=lambda c: (-s[c], pos_in[c]))
            tot += float(any(p[c] for c in order[:k]))
            cnt += 1
        hits.append(tot / cnt)
    return torch.tensor(hits, dtype=torch.float64)


def test_expected_hits_matches_permutation_reference():
    torch.manual_seed(0)
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.5],
                           [0.2, 0.9, 0.9, 0.9, 0.9, 0.1],
                           [0.3, 0.3, 0.3, 0.7, 0.3, 0.3],
                           [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]])
    positive = torch.tensor([[1, 0, 0, 1, 0, 0],
                             [0, 1, 0, 1, 0, 0],
                             [1, 0, 0, 0, 0, 1],
                             [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    for k in (1, 2, 3, 5):
        got = expected_hits(scores, positive, [k])[k]
        torch.testing.assert_close(got, _tie_order_reference(scores, positive, k))


def test_perfect_model_gets_recall_and_top1_of_one():
    torch.manual_seed(0)
    N = 30
    feats = F.normalize(torch.randn(N, 16), dim=-1)
    out = retrieval_recall(TableModel({"image_emb": feats}, {"text_emb": feats}), torch.arange(N), torch.arange(N))
    assert all(v == 1.0 for v in out.values())
    C = 7  # "features equal to labels": image of class c is e_c, class c's prompt is e_c
    labels = torch.arange(40) % C
    e = torch.eye(C)
    index = {f"t|c{c}": c for c in range(C)}
    model = TableModel({"image_emb": e[labels]}, {"text_emb": e})
    assert zero_shot_classify(model, torch.arange(40), labels, [f"c{c}" for c in range(C)], ["t|{}"],
                              _IdTokenizer(index)) == {"top1": 1.0, "top5": 1.0}


def test_shuffled_model_gets_chance():
    """Images paired with random captions: recall@k ~ k/N and top-1 ~ 1/C, within a few standard errors."""
    torch.manual_seed(1)
    N = 600
    feats = F.normalize(torch.randn(N, 64), dim=-1)
    perm = torch.randperm(N)
    out = retrieval_recall(TableModel({"image_emb": feats[perm]}, {"text_emb": feats}), torch.arange(N),
                           torch.arange(N), ks=(1, 10, 50))
    for k in (10, 50):
        p = k / N
        se = (p * (1 - p) / N) ** 0.5
        assert abs(out[f"i2t_r@{k}"] - p) < 4 * se + 1e-3 and abs(out[f"t2i_r@{k}"] - p) < 4 * se + 1e-3
    C, M = 10, 3000
    protos = F.normalize(torch.randn(C, 32), dim=-1)
    labels = torch.randint(0, C, (M,))
    img = protos[torch.randint(0, C, (M,))]  # the image looks like a random class
    model = TableModel({"image_emb": img}, {"text_emb": protos})
    top1 = zero_shot_classify(model, torch.arange(M), labels, [f"c{c}" for c in range(C)], ["t|{}"],
                              _IdTokenizer({f"t|c{c}": c for c in range(C)}))["top1"]
    assert abs(top1 - 0.1) < 4 * (0.09 / M) ** 0.5


def test_multi_caption_known_answer():
    """3 images with 2 captions each (COCO style), hand-built scores without ties:
    image 0 ranks its own caption 1 first (hit at 1); image 1 ranks two foreign captions (0, 4) above
    its own caption 2 (hit at 3); image 2's own caption 4 scores highest (hit at 1). Text->image
    averages over the 6 captions and is checked against top-k read straight off the score matrix."""
    e = torch.eye(4)
    caps = torch.stack([e[0], e[1], e[2], e[3], F.normalize(e[0] + e[1], dim=0), F.normalize(e[2] + e[3], dim=0)])
    owner = torch.tensor([0, 0, 1, 1, 2, 2])
    img = torch.stack([
        0.2 * e[0] + 0.9 * e[1] + 0.01 * e[3],
        0.8 * e[0] + 0.5 * e[2] + 0.02 * e[3],
        0.9 * e[0] + 0.8 * e[1] + 0.1 * e[2] + 0.03 * e[3],
    ])
    model = TableModel({"image_emb": img}, {"text_emb": caps})
    out = retrieval_recall(model, torch.arange(3), torch.arange(6), ks=(1, 2, 3), caption_image=owner)
    assert (out["i2t_r@1"], out["i2t_r@2"], out["i2t_r@3"]) == pytest.approx((2 / 3, 2 / 3, 1.0))
    S = img @ caps.T

    def t2i(k):
        return sum(int(owner[c]) in S[:, c].topk(k).indices.tolist() for c in range(6)) / 6

    assert (out["t2i_r@1"], out["t2i_r@2"], out["t2i_r@3"]) == pytest.approx((t2i(1), t2i(2), t2i(3)))
    assert out["t2i_r@1"] == pytest.approx(3 / 6)  # captions 1, 2 and 4 find their image first


def test_duplicate_captions_are_one_text_not_negatives():
    """Two images share the caption "red heart" (identical tokens). Counted as two different texts,
    each image would tie with a foreign copy of its own caption; as one text both images have it as a
    positive and recall is 1."""
    N = 5
    feats = F.normalize(torch.randn(N, 8, generator=torch.Generator().manual_seed(3)), dim=-1)
    img = feats.clone()
    img[4] = feats[3]  # images 3 and 4 look alike and share their caption
    tokens = torch.tensor([[0], [1], [2], [3], [3]])  # captions 3 and 4 are the same token sequence
    model = TableModel({"image_emb": img}, {"text_emb": feats})
    out = retrieval_recall(model, torch.arange(N), tokens, ks=(1,))
    assert out["i2t_r@1"] == 1.0
    # text->image: caption "3" has two positive images tied at the top: still a hit at 1
    assert out["t2i_r@1"] == 1.0


def test_zero_shot_tau_list_reports_each_tau_and_tau_changes_llip_scores():
    torch.manual_seed(0)
    cfg = SIZES["micro"].replace(pooling="llip")
    m = LlipModel(cfg)
    tok = WordHashTokenizer(cfg.vocab_size, cfg.context_length)
    names = ["cat", "dog", "tree", "car", "boat", "apple"]
    images = torch.randn(12, 3, cfg.image_size, cfg.image_size)
    labels = torch.arange(12) % 6
    out = zero_shot_classify(m, images, labels, names, ["a {c}."], tok, taus=[1, 5])
    assert set(out) == {"top1@tau=1", "top5@tau=1", "top1@tau=5", "top5@tau=5"}
    with torch.no_grad():
        img, txt = m.encode_image(images), m.encode_text(torch.as_tensor(tok(["a cat."])))
        assert not torch.allclose(m.pair_scores(img, txt, tau=1.0), m.pair_scores(img, txt, tau=5.0))
        torch.testing.assert_close(m.pair_scores(img, txt, tau=cfg.tau), m.pair_scores(img, txt))
    single = zero_shot_classify(m, images, labels, names, ["a {c}."], tok, taus=[cfg.tau])
    assert single[f"top1@tau={cfg.tau:g}"] == pytest.approx(zero_shot_classify(m, images, labels, names, ["a {c}."], tok)["top1"])


def test_zero_shot_class_index_out_of_range_is_an_error():
    e = torch.eye(3)
    model = TableModel({"image_emb": e}, {"text_emb": e})
    with pytest.raises(ValueError, match="class index 3 out of range for 3"):
        zero_shot_classify(model, torch.arange(3), torch.tensor([0, 1, 3]), ["a", "b", "c"], ["t|{}"],
                           _IdTokenizer({f"t|{c}": i for i, c in enumerate("abc")}))


def test_retrieval_chance_equals_a_constant_model_and_k_over_n_without_repeats():
    from llip_core.evaluate import retrieval_chance

    tokens = torch.tensor([[0], [1], [1], [2], [3], [3], [3], [4]])  # caption rows; 1 and 3 repeat
    owner = torch.tensor([0, 0, 1, 1, 2, 3, 4, 4])
    flat = F.normalize(torch.ones(5, 4), dim=-1)
    const = TableModel({"image_emb": flat}, {"text_emb": F.normalize(torch.ones(5, 4), dim=-1)})
    got = retrieval_chance(tokens, owner, 5, ks=(1, 2))
    want = retrieval_recall(const, torch.arange(5), tokens, ks=(1, 2), caption_image=owner)
    for k in ("i2t_r@1", "i2t_r@2", "t2i_r@1", "t2i_r@2"):
        assert got[k] == pytest.approx(want[k])
    assert got["t2i_r@1"] > 1 / 5  # "3" captions images 2, 3 and 4: 3 positives among 5
    distinct = retrieval_chance(torch.arange(9)[:, None], torch.arange(9), 9, ks=(1, 3))
    assert distinct == pytest.approx({"i2t_r@1": 1 / 9, "t2i_r@1": 1 / 9, "i2t_r@3": 3 / 9, "t2i_r@3": 3 / 9})


def test_expected_hits_in_row_blocks_equals_one_block(monkeypatch):
    import llip_core.evaluate as ev

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (50, 9), generator=g).float()  # many ties
    positive = torch.rand(50, 9, generator=g) < 0.3
    positive[:, 0] |= ~positive.any(1)
    whole = expected_hits(scores, positive, [1, 3])
    monkeypatch.setattr(ev, "_ROWS_PER_BLOCK", 7)
    blocks = expected_hits(scores, positive, [1, 3])
    for k in (1, 3):
        torch.testing.assert_close(blocks[k], whole[k])

"""Holistic CLIP (arXiv 2412.00440): the multi_cls image encoder, the `holistic` loss and branch-averaged
evaluation, each against a literal implementation written here from the paper / official code's
equations (loops over images, captions and branches), and the loss on 2 and 3 real gloo processes
against one process on the concatenated batch.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from llip_core.config import SIZES, ModelConfig
from llip_core.losses import HolisticLoss, branch_mean_scores, build_loss
from llip_core.model import LlipModel
from llip_core.task import build_task


# ------------------------------------------------------------------------------------------ model
def _multi(branches, layers=1, **kw):
    return SIZES["micro"].replace(pooling="multi_cls", branches=branches, layers=layers, **kw)


def test_multi_cls_shapes_and_positional_rows():
    m = LlipModel(_multi(3))
    grid = (16 // 8) ** 2
    assert m.class_embedding.shape == (3, 32)
    assert m.positional_embedding.shape == (3 + grid, 32)  # one row per class token, one per patch
    feats = m.encode_image(torch.randn(5, 3, 16, 16))
    assert feats["branch_emb"].shape == (5, 3, 32)
    assert "image_emb" not in feats  # a one-embedding loss cannot silently take branch 0
    torch.testing.assert_close(feats["branch_emb"].norm(dim=-1), torch.ones(5, 3))


def test_one_layer_branch_equals_a_single_class_token_model():
    """With one layer, class token k sees only itself and the patches: its output is what a CLS model
    with class token k (and its positional row) computes. Catches a missing or wrong attention mask."""
    torch.manual_seed(0)
    multi = LlipModel(_multi(3)).double()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    got = multi.encode_image(x)["branch_emb"]
    for k in range(3):
        single = LlipModel(SIZES["micro"].replace(pooling="cls", layers=1)).double()
        state = multi.state_dict()
        state["class_embedding"] = state["class_embedding"][k:k + 1]
        state["positional_embedding"] = torch.cat([state["positional_embedding"][k:k + 1],
                                                   state["positional_embedding"][3:]])
        single.load_state_dict(state)
        torch.testing.assert_close(got[:, k], single.encode_image(x)["image_emb"])


def test_patches_see_the_class_tokens_in_deeper_layers():
    """Two layers: class token 1 reaches branch 0 only through the patches (which attend to it)."""
    torch.manual_seed(0)
    m = LlipModel(_multi(2, layers=2)).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    before = m.encode_image(x)["branch_emb"][:, 0].clone()
    with torch.no_grad():
        m.class_embedding[1] += torch.randn(32, dtype=torch.float64)
    assert not torch.allclose(m.encode_image(x)["branch_emb"][:, 0], before)
    m1 = LlipModel(_multi(2, layers=1)).double()
    before = m1.encode_image(x)["branch_emb"][:, 0].clone()
    with torch.no_grad():
        m1.class_embedding[1] += torch.randn(32, dtype=torch.float64)
    torch.testing.assert_close(m1.encode_image(x)["branch_emb"][:, 0], before)


@pytest.mark.parametrize("loss_type", ["clip", "siglip"])
def test_one_branch_works_with_one_embedding_losses(loss_type):
    """multi_cls with M = 1 is CLIP's class-token model: same weights, same loss as pooling cls."""
    torch.manual_seed(0)
    multi = build_task(_multi(1, layers=2), loss_type).double()
    single = build_task(SIZES["micro"].replace(pooling="cls", layers=2), loss_type).double()
    single.load_state_dict(multi.state_dict())
    images = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    tokens = torch.zeros(4, 8, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:3], tokens[:, 3] = 1, torch.randint(3, 500, (4, 2)), 2
    torch.testing.assert_close(multi(images, tokens)["loss"], single(images, tokens)["loss"])


def test_branch_mean_scores_is_the_mean_over_branches_of_the_cosines():
    g = torch.Generator().manual_seed(0)
    br = F.normalize(torch.randn(5, 3, 8, generator=g, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(7, 8, generator=g, dtype=torch.float64), dim=-1)
    want = torch.zeros(5, 7, dtype=torch.float64)
    for i in range(5):
        for j in range(7):
            want[i, j] = sum(float(br[i, k] @ t[j]) for k in range(3)) / 3
    torch.testing.assert_close(branch_mean_scores(br, t), want)
    m = LlipModel(_multi(3))
    assert torch.equal(m.pair_scores({"branch_emb": br.float()}, {"text_emb": t.float()}),
                       branch_mean_scores(br.float(), t.float()))


def test_retrieval_on_a_multi_branch_model_uses_branch_averaged_scores():
    from llip_core.evaluate import retrieval_recall

    torch.manual_seed(0)
    m = LlipModel(_multi(3, layers=1)).eval()
    images = torch.randn(6, 3, 16, 16)
    tokens = torch.zeros(6, 8, dtype=torch.long)
    tokens[:, 0], tokens[:, 1:3], tokens[:, 3] = 1, torch.randint(3, 500, (6, 2)), 2
    with torch.no_grad():
        S = branch_mean_scores(m.encode_image(images)["branch_emb"], m.encode_text(tokens)["text_emb"])
    rank = (S >= S.diagonal()[:, None]).sum(1) - 1
    assert retrieval_recall(m, images, tokens, ks=(1,))["i2t_r@1"] == pytest.approx(float((rank < 1).float().mean()))


# ------------------------------------------------------------------------------------------ bad input
def test_bad_branches_and_one_embedding_loss_with_several_branches():
    with pytest.raises(ValueError, match="model.branches"):
        ModelConfig(pooling="multi_cls", branches=0)
    with pytest.raises(ValueError, match=r"model\.branches is 3.*loss\.type holistic"):
        build_task(_multi(3), "clip")
    with pytest.raises(ValueError, match="multi_cls"):
        build_task(SIZES["micro"].replace(pooling="cls"), "holistic")


# ------------------------------------------------------------------------------------------ loss
def literal_holistic(img, txt, mask, scale, weight=1.0, margin=0.7):
    """Holistic CLIP's loss written out pair by pair.

    img (B, Mb, D), txt (B, Mc, D) unit vectors; mask (B, Mc) real captions. Caption slot c is paired
    with branch c when Mc >= Mb and c < Mb; otherwise caption c of image i takes the branch with the
    highest <branch, caption> for its own image. Each real caption gives an image->text cross-entropy
    (branch k of image i against slot-c captions of every image, padded ones excluded) and a text->image
    one (the caption against branch k of every image); the two are averaged, then over captions.
    Diversity: max(mean over images and ordered branch pairs a != b of cos - margin, 0) * weight."""
    B, Mb, _ = img.shape
    Mc = txt.shape[1]
    terms = []
    for c in range(Mc):
        for i in range(B):
            if not mask[i, c]:
                continue
            if Mc >= Mb and c < Mb:
                k = c
            else:
                pos = [float((img[i, kk] @ txt[i, c]).detach()) for kk in range(Mb)]
                k = pos.index(max(pos))
            cols = [j for j in range(B) if mask[j, c] or j == i]
            row = torch.stack([scale * (img[i, k] @ txt[j, c]) for j in cols])
            i2t = torch.logsumexp(row, 0) - row[cols.index(i)]
            row = torch.stack([scale * (img[j, k] @ txt[i, c]) for j in range(B)])
            t2i = torch.logsumexp(row, 0) - row[i]
            terms.append((i2t + t2i) / 2)
    loss = torch.stack(terms).mean()
    if Mb > 1:
        cos = [img[i, a] @ img[i, b] for i in range(B) for a in range(Mb) for b in range(Mb) if a != b]
        loss = loss + weight * torch.clamp(torch.stack(cos).mean() - margin, min=0)
    return loss


def _features(B, Mb, Mc, seed, similar_branches=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    if similar_branches:  # mean branch cosine ~0.9: the diversity hinge is active
        img = F.normalize(r(B, 1, 16) + 0.3 * r(B, Mb, 16), dim=-1)
    else:
        img = F.normalize(r(B, Mb, 16), dim=-1)
    txt = F.normalize(r(B, Mc, 16), dim=-1)
    mask = torch.rand(B, Mc, generator=g) < 0.75
    mask[:, 0] = True  # every image keeps at least one caption (the pipeline skips the others)
    return img, txt, mask


def _loss_and_grads(img, txt, mask, log_scale, fn):
    leaves = [x.detach().clone().requires_grad_() for x in (img, txt, log_scale)]
    loss = fn(*leaves, mask)
    loss.backward()
    return loss.detach(), [x.grad for x in leaves]


def _ours(weight=1.0, margin=0.7):
    def fn(img, txt, log_scale, mask):
        loss = HolisticLoss(diversity_weight=weight, diversity_margin=margin)
        return loss({"branch_emb": img}, {"text_emb": txt.reshape(-1, txt.shape[-1])}, log_scale.exp(),
                    caption_mask=mask)["loss"]
    return fn


@pytest.mark.parametrize("Mb,Mc", [(3, 3), (2, 4), (4, 2), (1, 3), (3, 1), (1, 1)])
@pytest.mark.parametrize("similar", [False, True])
def test_holistic_loss_matches_literal(Mb, Mc, similar):
    img, txt, mask = _features(6, Mb, Mc, seed=Mb * 10 + Mc, similar_branches=similar)
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    ours = _loss_and_grads(img, txt, mask, log_scale, _ours(weight=0.5, margin=0.7))
    ref = _loss_and_grads(img, txt, mask, log_scale,
                          lambda i, t, s, m: literal_holistic(i, t, m, s.exp(), weight=0.5, margin=0.7))
    torch.testing.assert_close(ours[0], ref[0])
    for a, b in zip(ours[1], ref[1]):
        torch.testing.assert_close(a, b)


def test_diversity_term_is_reported_and_follows_weight_and_margin():
    img, txt, mask = _features(5, 3, 3, seed=3, similar_branches=True)
    s = torch.tensor(10.0, dtype=torch.float64)
    feats = ({"branch_emb": img}, {"text_emb": txt.reshape(-1, 16)})
    out = HolisticLoss(diversity_weight=2.0)(*feats, s, caption_mask=mask)
    cos = torch.stack([img[i, a] @ img[i, b] for i in range(5) for a in range(3) for b in range(3) if a != b]).mean()
    assert float(cos) > 0.7
    torch.testing.assert_close(out["diversity"], cos - 0.7)
    torch.testing.assert_close(out["loss"], out["contrastive"] + 2.0 * (cos - 0.7))
    off = HolisticLoss(diversity_margin=0.99)(*feats, s, caption_mask=mask)
    assert float(off["diversity"]) == 0.0


def test_holistic_task_end_to_end_backward():
    torch.manual_seed(0)
    task = build_task(_multi(3, layers=1), "holistic", multi_caption=True, diversity_weight=0.3)
    images = torch.randn(4, 3, 16, 16)
    tokens = torch.zeros(4, 3, 8, dtype=torch.long)
    tokens[..., 0], tokens[..., 1:3], tokens[..., 3] = 1, torch.randint(3, 500, (4, 3, 2)), 2
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    out = task(images, tokens, mask)
    out["loss"].backward()
    assert task.model.class_embedding.grad.abs().sum() > 0
    assert task.loss.diversity_weight == 0.3


# ------------------------------------------------------------------------------------------ distributed
B_LOCAL = 3
MC_LOSSES = ["holistic", "clip", "siglip", "llip", "llip_infonce"]


def _global(loss_type, world_size, seed=0):
    """Whole-batch leaves with 3 caption slots per image, some padded."""
    g = torch.Generator().manual_seed(seed)
    B, M, H, K, d = B_LOCAL * world_size, 3, 2, 3, 4
    D = H * d
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    unit = lambda x: F.normalize(x, dim=-1)
    mask = torch.rand(B, M, generator=g) < 0.7
    mask[:, 0] = True
    if loss_type == "holistic":  # branches close together so the diversity hinge is live
        img = {"branch_emb": unit(r(B, 1, D) + 0.3 * r(B, 2, D))}
        txt, params = {"text_emb": unit(r(B * M, D))}, {}
    elif loss_type in ("clip", "siglip"):
        img, txt, params = {"image_emb": unit(r(B, D))}, {"text_emb": unit(r(B * M, D))}, {}
    else:
        img = {"keys": r(B, H, K, d), "values": r(B, H, K, d)}
        txt = {"queries": r(B * M, H, d), "text_emb": unit(r(B * M, D))}
        params = {"out_proj": r(D, D) * D ** -0.5}
    params["logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    if loss_type in ("siglip", "llip"):
        params["logit_bias"] = torch.tensor(-2.0, dtype=torch.float64)
    return img, txt, params, mask


def _run(loss_type, img, txt, params, mask, rank, world_size):
    leaves = {**{f"img.{k}": v for k, v in img.items()}, **{f"txt.{k}": v for k, v in txt.items()}, **params}
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    fn = build_loss(loss_type, rank, world_size, tau=2.0, chunk_size=2, multi_caption=True, diversity_weight=0.5)
    out = fn({k[4:]: v for k, v in leaves.items() if k.startswith("img.")},
             {k[4:]: v for k, v in leaves.items() if k.startswith("txt.")},
             logit_scale=leaves["logit_scale"].exp(), logit_bias=leaves.get("logit_bias"), caption_mask=mask,
             **({"out_proj": leaves["out_proj"]} if "out_proj" in leaves else {}))
    out["loss"].backward()
    return out["loss"].detach(), {k: v.grad for k, v in leaves.items()}


def _worker(rank, world_size, init_file, out_dir):
    from test_distributed_losses import _finish, _init
    import torch.distributed as dist

    _init(rank, world_size, init_file)
    results = {}
    for loss_type in MC_LOSSES:
        img, txt, params, mask = _global(loss_type, world_size)
        M = mask.shape[1]
        si, st = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL), slice(rank * B_LOCAL * M, (rank + 1) * B_LOCAL * M)
        results[loss_type] = _run(loss_type, {k: v[si] for k, v in img.items()},
                                  {k: v[st] for k, v in txt.items()}, params, mask[si], rank, world_size)
    _finish(os.path.join(out_dir, f"rank{rank}.pt"), results)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("world_size", [2, 3])
def test_multi_caption_losses_on_gloo_ranks_equal_one_process(world_size, tmp_path):
    """holistic and the four multi-caption losses on real gloo ranks: the mean of the ranks' losses and
    the ranks' gradients (averaged as DDP does) equal one process on the concatenated batch."""
    from test_distributed_losses import _spawn

    ranks = _spawn(_worker, world_size, tmp_path)
    for loss_type in MC_LOSSES:
        img, txt, params, mask = _global(loss_type, world_size)
        single_loss, single_grads = _run(loss_type, img, txt, params, mask, 0, 1)
        if loss_type == "holistic":
            assert float(single_loss) > 0
        mean_loss = sum(r[loss_type][0] for r in ranks) / world_size
        torch.testing.assert_close(mean_loss, single_loss, msg=loss_type)
        for name, g in single_grads.items():
            if name.startswith(("img.", "txt.")):
                dist_g = torch.cat([r[loss_type][1][name] for r in ranks]) / world_size
            else:
                dist_g = sum(r[loss_type][1][name] for r in ranks) / world_size
            torch.testing.assert_close(dist_g, g, msg=f"{loss_type} {name}")


def _ddp_worker(rank, world_size, init_file, out_dir):
    from test_distributed_losses import _finish, _init
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    _init(rank, world_size, init_file)
    images, tokens, mask = _task_batch(world_size)
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    torch.manual_seed(0)
    task = build_task(_multi(3, layers=1), "holistic", rank, world_size, multi_caption=True).double()
    ddp = DDP(task, find_unused_parameters=False)  # held: a collected wrapper averages nothing
    loss = ddp(images[sl], tokens[sl], mask[sl])["loss"]
    loss.backward()
    dist.all_reduce(mean := loss.detach().clone())
    _finish(os.path.join(out_dir, f"rank{rank}.pt"), (mean / world_size, {n: p.grad for n, p in task.named_parameters()}))


def _task_batch(world_size):
    g = torch.Generator().manual_seed(1)
    B = B_LOCAL * world_size
    images = torch.randn(B, 3, 16, 16, generator=g, dtype=torch.float64)
    tokens = torch.zeros(B, 3, 8, dtype=torch.long)
    tokens[..., 0], tokens[..., 1:4], tokens[..., 4] = 1, torch.randint(3, 500, (B, 3, 3), generator=g), 2
    mask = torch.rand(B, 3, generator=g) < 0.7
    mask[:, 0] = True
    return images, tokens, mask


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ddp_holistic_task_parity(tmp_path):
    """The whole holistic task (multi_cls encoder, masked captions) under DDP on 2 gloo ranks: loss and
    every parameter's gradient equal one process on the whole batch; no unused parameter."""
    from test_distributed_losses import _spawn

    ranks = _spawn(_ddp_worker, 2, tmp_path)
    images, tokens, mask = _task_batch(2)
    torch.manual_seed(0)
    task = build_task(_multi(3, layers=1), "holistic", multi_caption=True).double()
    loss = task(images, tokens, mask)["loss"]
    loss.backward()
    for mean, grads in ranks:
        torch.testing.assert_close(mean, loss.detach())
        for n, p in task.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, msg=n)


def test_holistic_experiment_is_a_valid_sweep_over_all_five_losses():
    from pathlib import Path

    from orchestrator.config.schema import load_config
    from orchestrator.sweeps.tune import check_sweep, count_trials

    cfg = load_config(Path(__file__).parent.parent / "experiments" / "holistic.yaml")
    check_sweep(cfg)  # every loss.type value gives a valid config with data.captions: all
    assert count_trials(cfg) == 5
    m = cfg.resolved_model()
    assert (m.pooling, m.branches, cfg.data.captions, cfg.loss.type) == ("multi_cls", 3, "all", "holistic")

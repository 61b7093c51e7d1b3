"""Training-step FLOP count (llip_core.flops) against torch's own FLOP counter and a hand count."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from llip_core import flops
from llip_core.config import model_config
from llip_core.model import LlipModel


@pytest.mark.parametrize("pooling, extra", [("cls", {}), ("llip", {}), ("avg", {}), ("register", {}),
                                            ("multi_cls", {"branches": 3})])
def test_step_flops_match_torch_flop_counter(pooling, extra):
    """torch counts every matmul/conv it executes, forward and backward; with the math attention
    kernel the attention products are plain bmm it sees too. The literal Llip scorer is counted (the
    efficient one recomputes in its backward, which MFU leaves out by convention)."""
    torch.manual_seed(0)
    cfg = model_config("micro", pooling=pooling, vocab_size=600, **extra)
    m = LlipModel(cfg)
    B = 6
    img = torch.randn(B, 3, cfg.image_size, cfg.image_size)
    tok = torch.randint(1, 500, (B, cfg.context_length))
    tok[:, -1] = m.eot_id
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fi, ft = m.encode_image(img), m.encode_text(tok)
        if pooling == "multi_cls":  # the training loss scores every branch against every caption
            s = fi["branch_emb"] @ ft["text_emb"].T
        else:
            s = m.pair_scores(fi, ft, literal=True)
        s.sum().backward()
    counted = fc.get_total_flops()
    # The images need no gradient, so the patch convolution's backward skips its input gradient:
    # torch runs one conv-sized product fewer than the 3x-forward convention.
    conv_fwd = fc.get_flop_counts()["Global"][torch.ops.aten.convolution]
    assert flops.train_step_flops(cfg, B, literal=True) == counted + conv_fwd


def test_hand_count_tiny_llip_efficient():
    """Every term written out for a small Llip config, at a batch where the Gram route is the cheaper."""
    cfg = model_config("micro", pooling="llip", vocab_size=600)  # 16 px, patch 8, w 32, 1 layer, T 8, D 32, K 4, H 4
    assert (cfg.image_size, cfg.patch_size, cfg.width, cfg.layers, cfg.context_length, cfg.embed_dim,
            cfg.mixture_tokens, cfg.cross_heads, cfg.text_width, cfg.text_layers) == (16, 8, 32, 1, 8, 32, 4, 4, 32, 1)
    B = 40
    w, D, K, H = 32, 32, 4, 4
    patches, N, T = 4, 8, 8
    f = 4 * w  # MLP hidden (ratio 4)
    img = 2 * patches * (3 * 64) * w + (2 * N * (4 * w * w + 2 * w * f) + 4 * N * N * w) + 2 * 2 * K * w * D
    txt = (2 * T * (4 * w * w + 2 * w * f) + 4 * T * T * w) + 2 * w * D + 2 * w * D
    # per pair: logits and <V, p> (4KD), a^T G a (2 (HK)^2); per image: G from C = W W^T, one head block
    # at a time (2 K D^2 + 2 H K^2 D); per text p = W t (2 D^2); once C (2 D^3)
    gram = B * B * (4 * K * D + 2 * (H * K) ** 2) + B * (2 * K * D * D + 2 * H * K * K * D) + B * 2 * D * D + 2 * D ** 3
    literal = B * B * (4 * K * D + 2 * D * D + 2 * D)
    assert gram < literal and flops.gram_route_cheaper(D, K, H, B, B)
    assert flops.train_step_flops(cfg, B) == 3 * (B * img + B * txt + gram)
    assert flops.train_step_flops(cfg, B, literal=True) == 3 * (B * img + B * txt + literal)
    # a few texts against the images (zero-shot prompts): the per-image Gram matrices cost more than
    # out_proj per pair, so the literal formulation runs (and is what is counted)
    assert not flops.gram_route_cheaper(D, K, H, B, 5)
    assert flops.scoring_forward_flops(cfg, B, 5) == B * 5 * (4 * K * D + 2 * D * D + 2 * D)
    # a sigmoid ring over 4 ranks: 16 calls of 10 images x 10 texts, direct route; InfoNCE on 4 ranks:
    # 4 calls of 10 images x 40 texts, Gram route
    assert flops.train_step_flops(cfg, B, literal=True) == flops.train_step_flops(cfg, B, world_size=4, ring=True)
    g4 = B * B * (4 * K * D + 2 * (H * K) ** 2) + B * (2 * K * D * D + 2 * H * K * K * D) + 4 * B * 2 * D * D + 4 * 2 * D ** 3
    assert flops.train_step_flops(cfg, B, world_size=4) == 3 * (B * img + B * txt + g4)
    big_k = cfg.replace(mixture_tokens=16)  # H*K > D: the Gram route never wins
    assert not flops.gram_route_cheaper(D, 16, H, 10 ** 6, 10 ** 6)
    assert flops.scoring_forward_flops(big_k, 3, 5) == 15 * (4 * 16 * D + 2 * D * D + 2 * D)


@pytest.mark.parametrize("n_txt, route", [(40, "gram"), (5, "direct")])
def test_scorer_flops_match_torch_flop_counter(n_txt, route, monkeypatch):
    """The scorer's forward as it runs (either route, chosen by the FLOP rule) against torch's counter."""
    import llip_core.losses as L

    torch.manual_seed(0)
    cfg = model_config("micro", pooling="llip", vocab_size=600)
    m = LlipModel(cfg)
    n_img = 6
    img = torch.randn(n_img, 3, cfg.image_size, cfg.image_size)
    tok = torch.randint(1, 500, (n_txt, cfg.context_length))
    tok[:, -1] = m.eot_id
    fi, ft = m.encode_image(img), m.encode_text(tok)
    ran = []
    real_direct, real_gram = L._direct_chunk, L._LlipScores.apply
    monkeypatch.setattr(L, "_direct_chunk", lambda *a: ran.append("direct") or real_direct(*a))
    monkeypatch.setattr(L._LlipScores, "apply", lambda *a: ran.append("gram") or real_gram(*a))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m.pair_scores(fi, ft)
    assert set(ran) == {route}
    assert flops.scoring_forward_flops(cfg, n_img, n_txt) == fc.get_total_flops()


def test_b16_order_of_magnitude_and_mfu():
    # CLIP B/16 at 224 px: the "17.6 GFLOPs" usually quoted for ViT-B/16 and ~3 for CLIP's 77-token
    # text tower are multiply-adds; we count 2 FLOPs per multiply-add.
    cfg = model_config("B/16", pooling="cls")
    assert 17.0e9 < flops.image_forward_flops(cfg) / 2 < 18.0e9
    assert 2.5e9 < flops.text_forward_flops(cfg) / 2 < 3.5e9
    step = flops.train_step_flops(cfg, 256)
    assert flops.mfu(step, step / 1e15, 1e15, 1) == pytest.approx(1.0)
    assert flops.mfu(step, 2 * step / 1e15, 1e15, 4) == pytest.approx(0.125)
    assert flops.peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert flops.peak_flops_for("NVIDIA L40S") == 362e12 and flops.peak_flops_for("NVIDIA L4") == 121e12
    assert flops.peak_flops_for("Some CPU") is None

"""Exports on S3 (issue 25): `llip export --out s3://...` through the real CLI against a real
S3-compatible server (moto on 127.0.0.1), read back by `llip eval`'s and `train.init_from`'s code."""
from __future__ import annotations

import pytest
import torch

from orchestrator.cli import main as llip_main
from test_models_export import TEXTS, images, make_checkpoint, reference_scores

try:
    from tests.s3server import moto_s3  # noqa: F401  (fixture)
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from s3server import moto_s3  # noqa: F401


@pytest.mark.timeout(180)
def test_export_to_s3_loads_back_and_seeds_init_from(moto_s3, tmp_path):  # noqa: F811
    import llip_core.pretrained as pretrained
    from orchestrator.storage.checkpoints import is_export, local_export
    from orchestrator.training import initweights

    moto_s3.create_bucket("llip-models")
    url = "s3://llip-models/exports/toy"
    ckpt, core = make_checkpoint(tmp_path, "llip")
    assert llip_main(["export", str(ckpt), "--out", url, "--dtype", "bf16"]) == 0
    keys = sorted(o["Key"] for o in moto_s3.client().list_objects_v2(Bucket="llip-models")["Contents"])
    assert keys == [f"exports/toy/{n}" for n in ("README.md", "bpe_simple_vocab_16e6.txt.gz", "config.json",
                                                   "model.safetensors")]
    assert is_export(url) and not is_export("s3://llip-models/exports")
    m = pretrained.load(local_export(url))
    imgs = images(3)
    ref = reference_scores(core, imgs, TEXTS, m.info["tokenizer"])
    assert (m.score(imgs, TEXTS) - ref).abs().max() < 0.05  # bf16 weights

    src = initweights._export_source(url, url)
    w = initweights.load_weights(src)
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert src.tokenizer == state["tokenizer"] and w["k_proj"].dtype == torch.bfloat16
    assert torch.equal(w["k_proj"], state["model"]["model.k_proj"].to(torch.bfloat16))

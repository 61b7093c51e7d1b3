"""Run in a subprocess by tests/test_models_export.py: open_clip's OWN loading of a `local-dir:`
export, from the installed open_clip_torch wheel, and its embeddings as JSON on stdout.

    python tests/open_clip_reference.py EXPORT_DIR IMAGES.npy TEXTS.json

What is stubbed, and why: torchvision and tqdm are not installed here (torchvision does not import
beside the CPU torch wheel), yet open_clip's package imports them at module level: `utils.py` takes
`FrozenBatchNorm2d` (ResNet freezing only), `transform.py` its transform classes (image pipelines,
which this check does not use: it feeds the same normalised tensor to both models), `pretrained.py`
tqdm (download progress). Those names become inert placeholders. Everything compared is open_clip's
real code: `create_model('local-dir:...')` reading open_clip_config.json and open_clip_model.safetensors
with strict loading, its ViT and text transformer, and `get_tokenizer('local-dir:...')`'s tokenizer.
"""
import json
import sys
import types

import numpy as np
import torch


class _Placeholder(type):
    def __getattr__(cls, name):  # InterpolationMode.BICUBIC etc. in default arguments
        return cls

    def __call__(cls, *a, **k):
        raise RuntimeError("a torchvision stand-in was called: this check must not run image transforms")


def _stub(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__getattr__ = lambda attr: _Placeholder(attr, (), {})
    mod.__path__ = []
    sys.modules[name] = mod
    return mod


for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops",
             "torchvision.ops.misc", "tqdm"):
    _stub(name)

import open_clip  # noqa: E402  (after the stubs)

folder, images_npy, texts_json = sys.argv[1:4]
model = open_clip.create_model(f"local-dir:{folder}")
model.eval()
tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
texts = json.loads(open(texts_json).read())
with torch.no_grad():
    img = model.encode_image(torch.from_numpy(np.load(images_npy)), normalize=True)
    tokens = tokenizer(texts)
    txt = model.encode_text(tokens, normalize=True)
print(json.dumps({"image": img.tolist(), "text": txt.tolist(), "tokens": tokens.tolist(),
                  "logit_scale": float(model.logit_scale.exp()),
                  "logit_bias": None if model.logit_bias is None else float(model.logit_bias),
                  "preprocess": getattr(model.visual, "preprocess_cfg", None),
                  "open_clip": open_clip.__version__, "class": type(model).__name__}))

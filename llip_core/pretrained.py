"""A trained model outside llip-orch: the export folder and one-line loading (no ray, no mlflow).

An export folder holds
  model.safetensors   weights only: the model's tensors under LlipModel's own names, plus the
                      learned `logit_scale` (log of the scale) and, for sigmoid losses, `logit_bias`;
                      float32 or bfloat16; no optimizer state
  config.json         FORMAT marker, the ModelConfig, the loss type, the tokenizer spec (a compact
                      vocabulary's id table included), preprocessing (size, mean, std), where the
                      weights came from (run, checkpoint or official file) and the llip-orch version
  bpe_simple_vocab_16e6.txt.gz   CLIP's merges (clip_bpe models), so loading needs no open_clip_torch
  README.md           a model card (written by `llip export` / `llip import-official`)

    m = llip_core.pretrained.load("exports/demo")           # eval mode, CPU; device="cuda" for a GPU
    s = m.score([Image.open("cat.png")], ["a cat", "a dog"]) # (1, 2) cosine scores; Llip: text-conditioned
    z = m.zero_shot(images, ["cat", "dog"], ["a photo of a {c}."])

Scores follow llip_core.evaluate exactly (the code evaluation during training runs): Llip's score of
(image, text) is the cosine between the text-conditioned image embedding and the text embedding at the
softmax temperature `tau` (the model's unless given); the other models' is the plain cosine.
Zero-shot averages normalised text embeddings over templates and renormalises (Llip: the queries are
averaged too), per class.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from llip_core.config import ModelConfig
from llip_core.preprocess import CLIP_MEAN, CLIP_STD

FORMAT = "llip-orch.pretrained"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
TASK_KEYS = ("logit_scale", "logit_bias")  # learned beside the model (llip_core.task.Task)
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class PretrainedError(ValueError):
    """A folder, file or tensor that is not what loading expects: one line naming it and the fix."""


# ============================================================================ weights <-> task state
def weights_from_task_state(task_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A training checkpoint's `state["model"]` (the Task: `model.*`, logit_scale, logit_bias) ->
    the export's tensor names (LlipModel's, plus logit_scale / logit_bias)."""
    out = {}
    for k, v in task_state.items():
        if k.startswith("model."):
            out[k[len("model."):]] = v
        elif k in TASK_KEYS:
            out[k] = v
        # anything else (a loss's buffers) is training state, not the model
    return out


def task_state_from_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(k if k in TASK_KEYS else f"model.{k}"): v for k, v in weights.items()}


def check_fits(expected: dict[str, torch.Tensor], found: dict[str, Any], source: str,
               optional: Sequence[str] = TASK_KEYS) -> None:
    """Every tensor `expected` (a model's state dict, or {name: shape}) is in `found` with its shape,
    and `found` holds nothing else; names in `optional` may be missing. One line naming the first
    tensor that does not fit, its expected and found shape."""
    def shape(v):
        return tuple(v.shape) if hasattr(v, "shape") else tuple(v)

    for k, v in expected.items():
        if k not in found:
            if k in optional:
                continue
            raise PretrainedError(f"{source}: tensor {k} is missing (expected shape {shape(v)}); "
                                  "the weights are not of the model the config describes")
        if shape(found[k]) != shape(v):
            raise PretrainedError(f"{source}: tensor {k} has shape {shape(found[k])}, expected {shape(v)}; "
                                  "the weights are of another model size than the config asks for")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise PretrainedError(f"{source}: unexpected tensor {extra[0]} (shape {shape(found[extra[0]])}) that the "
                              f"model has no place for{f' (+{len(extra) - 1} more)' if len(extra) > 1 else ''}; "
                              "the weights are of another model type than the config asks for")


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Within it, torch.nn.init's functions and in-place random fills leave tensors as they are.
    A torch function mode is thread-local, so other threads keep initialising normally."""

    _FILLS = ("normal_", "uniform_", "zero_", "fill_")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init" or getattr(func, "__name__", "") in self._FILLS:
            return args[0] if args else next(iter(kwargs.values()))
        return func(*args, **kwargs)


def model_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the model's state dict without allocating or initialising it: checking a
    G/14's files costs 0.1 s. (Initialising meta tensors would run torch's Python decompositions,
    whose first use costs seconds.)"""
    from llip_core.model import LlipModel

    with _SkipInit(), torch.device("meta"):
        return {k: tuple(v.shape) for k, v in LlipModel(model_cfg).state_dict().items()}


# ============================================================================ writing an export
def weights_bytes(weights: dict[str, torch.Tensor], dtype: str = "fp32") -> bytes:
    """safetensors bytes of the floating tensors cast to `dtype` (fp32 or bf16), contiguous, on CPU."""
    from safetensors.torch import save

    if dtype not in DTYPES:
        raise PretrainedError(f"unknown dtype {dtype!r}; choose fp32 or bf16")
    dt = DTYPES[dtype]
    tensors = {}
    for k, v in weights.items():
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.to(dt)
        tensors[k] = v.contiguous().clone()  # safetensors refuses tensors that share storage
    return save(tensors, metadata={"format": FORMAT})


def preprocess_info(model_cfg: ModelConfig) -> dict:
    """What an image goes through before the model (llip_core.preprocess's eval transform)."""
    return {"size": model_cfg.image_size, "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
            "interpolation": "bicubic", "resize_mode": "shortest", "center_crop": True,
            "transparency": "composited on white"}


def export_files(model_cfg: ModelConfig, weights: dict[str, torch.Tensor], tokenizer_spec: dict,
                 loss_type: str, dtype: str = "fp32", source: Optional[dict] = None,
                 extra: Optional[dict] = None, card: Optional[str] = None,
                 vocab: bool = True) -> dict[str, bytes]:
    """{file name: bytes} of an export folder. The weights are checked against the model the config
    builds (names and shapes) before anything is written."""
    expected = model_shapes(model_cfg)
    expected.update({k: () for k in TASK_KEYS})
    check_fits(expected, weights, "weights")
    blob = weights_bytes(weights, dtype)
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": dataclasses.asdict(model_cfg),
        "loss": loss_type,
        "tokenizer": tokenizer_spec,
        "preprocess": preprocess_info(model_cfg),
        "weights": {"file": WEIGHTS_FILE, "dtype": "bfloat16" if DTYPES[dtype] == torch.bfloat16 else "float32",
                    "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)},
        "source": source or {},
        **(extra or {}),
    }
    files = {WEIGHTS_FILE: blob, CONFIG_FILE: (json.dumps(config, indent=2) + "\n").encode()}
    if vocab and tokenizer_spec.get("name") == "clip_bpe":
        from llip_core.tokenizer import clip_vocab_path

        with open(clip_vocab_path(), "rb") as f:
            files[VOCAB_FILE] = f.read()
    if card is not None:
        files[CARD_FILE] = card.encode()
    return files


def write_folder(folder: str, files: dict[str, bytes]) -> None:
    """The files into a local folder, each whole or not at all."""
    os.makedirs(folder, exist_ok=True)
    for name, data in files.items():
        tmp = os.path.join(folder, f".{name}.part")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(folder, name))


# ============================================================================ reading an export
def read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isdir(folder):
        raise PretrainedError(f"{folder}: no such folder; give an export folder (`llip export RUN --out DIR`)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        what = " (open_clip's layout: load it with open_clip.create_model_and_transforms('local-dir:...'))" \
            if os.path.isfile(os.path.join(folder, "open_clip_config.json")) else ""
        raise PretrainedError(f"{folder}: not an llip export (no {CONFIG_FILE}){what}; "
                              "make one with `llip export RUN --out DIR`") from None
    except json.JSONDecodeError as e:
        raise PretrainedError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); re-export the model") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise PretrainedError(f"{path}: not an llip export config (format is {cfg.get('format') if isinstance(cfg, dict) else None!r}, "
                              f"expected {FORMAT!r}); make one with `llip export RUN --out DIR`")
    if int(cfg.get("format_version", 0)) > FORMAT_VERSION:
        raise PretrainedError(f"{path}: format version {cfg['format_version']} is newer than this llip-orch "
                              f"reads ({FORMAT_VERSION}); upgrade llip-orch")
    return cfg


def model_config_from(cfg: dict, source: str) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    raw = cfg.get("model") or {}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise PretrainedError(f"{source}: model.{unknown[0]} is not a model setting this llip-orch knows; upgrade llip-orch")
    try:
        return ModelConfig(**raw)
    except (TypeError, ValueError) as e:
        raise PretrainedError(f"{source}: model settings are inconsistent: {e}") from None


def read_weights(folder: str, device: Union[str, torch.device] = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise PretrainedError(f"{folder}: no {WEIGHTS_FILE}; the export is incomplete, export it again")
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise PretrainedError(f"{path}: not readable as safetensors ({str(e)[:120]}); export it again") from None


def weight_shapes(folder: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors header alone (checking a G/14's fit reads no weights)."""
    from safetensors import safe_open

    path = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise PretrainedError(f"{folder}: no {WEIGHTS_FILE}; the export is incomplete, export it again")
    with safe_open(path, framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def load(folder: str, device: Union[str, torch.device, None] = None) -> "PretrainedModel":
    """The exported model in eval mode with its tokenizer and preprocessing, on `device` (default CPU)."""
    from llip_core.model import LlipModel
    from llip_core.tokenizer import build_tokenizer

    folder = os.fspath(folder)
    cfg = read_config(folder)
    source = os.path.join(folder, CONFIG_FILE)
    model_cfg = model_config_from(cfg, source)
    weights = read_weights(folder)
    model = LlipModel(model_cfg)
    check_fits(model.state_dict(), {k: v for k, v in weights.items() if k not in TASK_KEYS},
               os.path.join(folder, WEIGHTS_FILE), optional=())
    model.load_state_dict({k: v for k, v in weights.items() if k not in TASK_KEYS})  # casts bf16 up to fp32
    vocab = os.path.join(folder, VOCAB_FILE)
    tokenizer = build_tokenizer(cfg["tokenizer"], vocab if os.path.isfile(vocab) else None)
    scale = weights.get("logit_scale")
    bias = weights.get("logit_bias")
    pm = PretrainedModel(model=model.eval(), config=model_cfg, tokenizer=tokenizer, info=cfg,
                         logit_scale=float(scale.float().exp()) if scale is not None else None,
                         logit_bias=float(bias.float()) if bias is not None else None)
    return pm.to(device or "cpu")


# ============================================================================ the loaded model
ImageInput = Any  # PIL image, uint8 array (H, W, 3) or (N, H, W, 3), encoded bytes, or lists of those;
#                   or a float tensor (N, 3, S, S) already normalised


@dataclass
class PretrainedModel:
    model: Any  # llip_core.model.LlipModel, eval mode
    config: ModelConfig
    tokenizer: Any
    info: dict  # config.json
    logit_scale: Optional[float] = None  # s, as trained (exp of the stored log)
    logit_bias: Optional[float] = None
    device: torch.device = torch.device("cpu")
    batch_size: int = 256

    @property
    def pooling(self) -> str:
        return self.config.pooling

    @property
    def tau(self) -> float:
        return self.config.tau

    def to(self, device) -> "PretrainedModel":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    # -- inputs --------------------------------------------------------------------------------
    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """float32 (N, 3, S, S) on the model's device: resize the shorter side, center crop, CLIP
        normalisation; transparency on white (as training decodes)."""
        from PIL import Image

        from llip_core.preprocess import as_rgb, load_rgb, normalize, transform

        if isinstance(images, torch.Tensor):
            if images.is_floating_point():
                x = images if images.dim() == 4 else images[None]
                return x.to(self.device, torch.float32)
            images = images.cpu().numpy()
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        if not isinstance(images, (list, tuple)):
            images = [images]
        size = self.config.image_size
        out = np.empty((len(images), size, size, 3), dtype=np.uint8)
        for i, im in enumerate(images):
            if isinstance(im, (bytes, bytearray, memoryview)):
                im = load_rgb(bytes(im))
            elif isinstance(im, np.ndarray):
                if im.dtype != np.uint8 or im.ndim != 3 or im.shape[-1] not in (3, 4):
                    raise PretrainedError(f"image {i}: a uint8 array (H, W, 3) is expected, got {im.dtype} {im.shape}")
                im = as_rgb(Image.fromarray(im))
            elif isinstance(im, Image.Image):
                im = as_rgb(im)
            else:
                raise PretrainedError(f"image {i}: {type(im).__name__} is not an image; pass PIL images, uint8 "
                                      "arrays (H, W, 3), encoded bytes or a normalised float tensor")
            out[i] = transform(im, size)
        return torch.from_numpy(normalize(out)).to(self.device)

    def tokenize(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise PretrainedError(f"text {bad}: {type(texts[bad]).__name__} is not a string")
        return torch.as_tensor(np.asarray(self.tokenizer(texts)), device=self.device)

    # -- features ------------------------------------------------------------------------------
    @torch.no_grad()
    def image_features(self, images: ImageInput) -> dict[str, torch.Tensor]:
        """The model's own image features (Llip: keys and values; others: image_emb / branch_emb)."""
        from llip_core.evaluate import _encode

        return _encode(self.model.encode_image, self.preprocess(images), self.batch_size)

    @torch.no_grad()
    def text_features(self, texts: Union[str, Sequence[str]]) -> dict[str, torch.Tensor]:
        from llip_core.evaluate import _encode

        return _encode(self.model.encode_text, self.tokenize(texts), self.batch_size)

    def encode_image(self, images: ImageInput):
        """(N, D) unit vectors for models with one embedding per image (CLIP, SigLIP, avg, register);
        (N, M, D) for Holistic CLIP's M branches; for Llip, which has no image embedding until a
        caption conditions it, a dict of `keys` and `values` (N, H, K, D/H) to pass to `score_features`."""
        f = self.image_features(images)
        if self.pooling == "llip":
            return f
        return f["image_emb"] if "image_emb" in f else f["branch_emb"]

    def encode_text(self, texts: Union[str, Sequence[str]]):
        """(N, D) unit vectors; for Llip a dict of `text_emb` (N, D) and `queries` (N, H, D/H)."""
        f = self.text_features(texts)
        return f if self.pooling == "llip" else f["text_emb"]

    @torch.no_grad()
    def score_features(self, image_feats, text_feats, tau: Optional[float] = None) -> torch.Tensor:
        """(N_img, N_txt) float32 scores from `encode_image` / `encode_text` outputs."""
        from llip_core.evaluate import pair_scores

        img = image_feats if isinstance(image_feats, dict) else \
            {("image_emb" if image_feats.dim() == 2 else "branch_emb"): image_feats}
        txt = text_feats if isinstance(text_feats, dict) else {"text_emb": text_feats}
        return pair_scores(self.model, img, txt, self.batch_size, tau).float()

    def score(self, images: ImageInput, texts: Union[str, Sequence[str]], tau: Optional[float] = None) -> torch.Tensor:
        """(N_img, N_txt) float32 cosine scores, on the model's device. Llip: between the image
        embedding conditioned on each text (softmax temperature `tau`, default the model's) and the
        text embedding; the others: the plain cosine (`tau` is ignored)."""
        return self.score_features(self.image_features(images), self.text_features(texts),
                                   tau if self.pooling == "llip" else None)

    @torch.no_grad()
    def zero_shot(self, images: ImageInput, class_names: Sequence[str], templates: Sequence = ("{c}",),
                  tau: Optional[float] = None) -> torch.Tensor:
        """(N_img, n_classes) float32 scores; `.argmax(1)` is the predicted class. Templates use
        "{c}" (clip_benchmark) or "{}" (open_clip) for the class name."""
        from llip_core.evaluate import class_text_features, pair_scores

        cls = class_text_features(self.model, list(class_names), list(templates), self.tokenizer, self.device,
                                  self.batch_size)
        return pair_scores(self.model, self.image_features(images), cls, self.batch_size,
                           tau if self.pooling == "llip" else None).float()


__all__ = ["load", "PretrainedModel", "export_files", "write_folder", "read_config", "read_weights",
           "weights_from_task_state", "task_state_from_weights", "check_fits", "PretrainedError", "FORMAT"]

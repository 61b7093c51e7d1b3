"""The MLflow pyfunc of an llip export, logged as a model from code (MLflow loads this file, not a
pickle): serving it needs mlflow, torch and the `llip_core` folder logged beside it, not llip-orch.

Input: a DataFrame whose rows each hold an `image` (encoded PNG/JPEG bytes; base64 in a JSON request)
and a `text`. Output, per row: `score`, the score of the row's own (image, text) pair, and `scores`,
the row's image against every text of the request, i.e. row i of `PretrainedModel.score(images,
texts)` (Llip: text-conditioned at the param `tau`, default the model's; the others: cosine).
"""
from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class LlipScorer(PythonModel):
    def load_context(self, context):
        import torch

        from llip_core.pretrained import load

        self.model = load(context.artifacts["export"], device="cuda" if torch.cuda.is_available() else "cpu")

    def predict(self, context, model_input, params=None):
        import pandas as pd

        images = [bytes(b) for b in model_input["image"]]
        texts = [str(t) for t in model_input["text"]]
        tau = (params or {}).get("tau")
        s = self.model.score(images, texts, tau=float(tau) if tau is not None else None).double().cpu()
        return pd.DataFrame({"score": s.diagonal().tolist(), "scores": [row.tolist() for row in s]})


mlflow.models.set_model(LlipScorer())

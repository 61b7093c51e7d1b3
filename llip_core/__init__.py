"""Pure PyTorch/numpy core of llip-orch: models, losses, scoring, tokenizer, curation, evaluation.

Nothing in this package imports ray or mlflow, so every function here runs in one process.
"""

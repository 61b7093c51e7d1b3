"""The driver-side console filter drops Ray's per-report/per-execution INFO lines and keeps the rest."""
from orchestrator.console import filter_batch, is_noise

# Lines as Ray 2.60 forwards them from workers (copied from a real `llip run` console).
NOISE = [
    "Reporting training result 5: TrainingReport(checkpoint=None, metrics={'train/loss': 5.14}, validation=False) from rank 0",
    "Starting execution of Dataset train_0357Hejxfg7CdOcvT1C0yu_0. Full logs are in /tmp/ray/session_x/logs/ray-data",
    "Execution plan of Dataset eval_0357: InputDataBuffer[Input] -> TaskPoolMapOperator[ReadTolerantWebDataset->MapBatches(Decoder)]",
    "✔️  Dataset train_0357Hejxfg7CdOcvT1C0yu_0 execution finished in 11.30 seconds",
    "[dataset]: A new progress UI is available. To enable, set ...",
    "",
    "   ",
    "[2026-12-02 02:43:44,115 E 30407 30437] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: "
    "'5fc22830ab3b9f3dc88c832f01000000' has constructor arguments in the object store and max_restarts > 0. If the "
    "arguments in the object store go out of scope or are lost, the actor restart will fail. See "
    "https://github.com/ray-project/ray/issues/53727 for more details.",
]
KEEP = [
    "[llip] step 5/30 loss 7.1361 lr 1.00e-03 67 samples/s",
    "2026-12-01 18:53:14,450\tWARNING util.py:650 -- The argument ``concurrency`` is deprecated",
    "Traceback (most recent call last):",
    "RuntimeError: CUDA out of memory",
    "[llip] eval step 50: emoji R@1 12.5%  (Reporting is done by rank 0)",
    # the same error about another actor is news, and passes
    "[2026-12-02 02:43:44,115 E 1 2] core_worker.cc:2465: Actor with class name: 'MyActor' and ID: '5fc2' has "
    "constructor arguments in the object store and max_restarts > 0.",
]


def test_noise_and_keep():
    assert all(is_noise(x) for x in NOISE)
    assert not any(is_noise(x) for x in KEEP)


def test_filter_batch_keeps_fields_and_drops_empty_batches():
    data = {"pid": 7196, "ip": "127.0.0.1", "is_err": False, "lines": NOISE[:2] + KEEP[:1]}
    out = filter_batch(data)
    assert out["lines"] == KEEP[:1] and out["pid"] == 7196 and data["lines"][0] == NOISE[0]  # input untouched
    assert filter_batch({**data, "lines": NOISE}) is None


def test_eval_line_and_natural_order():
    from orchestrator.console import natural_key
    from orchestrator.training.worker import eval_line

    assert sorted(["top1_tau10", "top1_tau3", "top1_tau1"], key=natural_key) == ["top1_tau1", "top1_tau3", "top1_tau10"]
    line = eval_line(50, {"eval/recall1": 0.123, "eval/i2t_recall1": 0.5, "eval/fashion_mnist/top1_tau10": 0.1,
                          "eval/fashion_mnist/top1_tau3": 0.11, "eval/fashion_mnist/top5_tau3": 0.5,
                          "eval/seconds": 0.8, "eval/fashion_mnist/seconds": 1.1, "train/loss": 3.0})
    assert line == ("[llip] eval step 50: held-out recall1 12.3%, fashion_mnist top1_tau3 11.0%, "
                    "fashion_mnist top1_tau10 10.0% (1.9 s)")

"""The classifier trap (issue 27): a pooled head called from Python on short unpadded text gives what
`thl-np predict` gives, since the models' __call__ left-pads the rows itself (docs/TASKS.md)."""
import json

import numpy as np

import thl_np
from thl_np.cli import main


def _classifier(tmp_path):
    config = thl_np.THLConfig(vocab_size=259, dim=16, num_tiers=2, tier_dims=[16, 16], tier_timescales=[1, 4],
                              memory_slots=8, query_dim=8, num_heads=2, head_dim=8, local_window=4,
                              pad_token_id=256, dtype="float64")
    model = thl_np.THLForSequenceClassification(config, id2label={0: "a", 1: "b", 2: "c"}, seed=3)
    model.save_pretrained(str(tmp_path / "clf"))
    return thl_np.THLForSequenceClassification.from_pretrained(str(tmp_path / "clf"))


def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_python_and_predict_give_the_same_probabilities(tmp_path, capsys):
    model = _classifier(tmp_path)
    texts = ["hi!", "import os", "def f(x):\n    return x"]
    capsys.readouterr()
    assert main(["predict", "--model", str(tmp_path / "clf"), "--json", "--batch-size", "1", *texts]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    for text, line in zip(texts, lines, strict=True):
        ids = np.frombuffer(text.encode(), np.uint8).astype(np.int64)[None]
        logits, _ = model(ids)  # unpadded, one text
        p = _softmax(logits[0])
        want = [line["probabilities"][k] for k in ("a", "b", "c")]
        np.testing.assert_allclose(p, want, atol=2e-6)
    # a batch padded on the right gives what predict gives for the same batch (padded to its longest row)
    assert main(["predict", "--model", str(tmp_path / "clf"), "--json", *texts]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    rows = [np.frombuffer(t.encode(), np.uint8) for t in texts]
    batch = np.full((len(rows), max(map(len, rows))), 256, np.int64)
    for i, r in enumerate(rows):
        batch[i, :len(r)] = r
    p_batch = _softmax(model(batch)[0])
    for i, line in enumerate(lines):
        np.testing.assert_allclose(p_batch[i], [line["probabilities"][k] for k in ("a", "b", "c")], atol=2e-6)


def test_padding_false_runs_the_rows_as_given(tmp_path):
    model = _classifier(tmp_path)
    ids = np.frombuffer(b"hi!!", np.uint8).astype(np.int64)[None]  # T = 4: (T - 1) mod 4 != 0
    aligned, _ = model(ids)
    raw, _ = model(ids, padding=False)
    assert not np.allclose(aligned, raw)
    padded = np.concatenate([np.full((1, 1), 256), ids], axis=1)  # T = 5: already aligned
    np.testing.assert_array_equal(model(padded, padding=False)[0], aligned)

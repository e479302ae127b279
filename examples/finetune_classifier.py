#!/usr/bin/env python3
"""Fine-tune a THL sequence classifier with the Python API: the loop a PyTorch user writes, in thl-np.

    python examples/finetune_classifier.py                 # the packaged model, 200 steps
    python examples/finetune_classifier.py --steps 20 --tiny   # a small fresh model, in seconds (the test suite)

The task: which of two standard-library modules (``json`` or ``email``) a 2-3 line snippet comes from;
training snippets from some of their files, test snippets from the others. Where PyTorch writes

    logits, loss = model(input_ids, labels=labels); loss.backward(); optimizer.step()

thl-np computes the loss and the exact gradients in one call, ``model.value_and_grad`` (back-propagation
through the head, the pooling and every step of the body), and ``AdamW.step`` applies them. Dropout and
training-mode routing are on when their random draws are passed in (``dropout=rng``,
``gumbel_uniform=...``), off otherwise: ``model(input_ids, labels)`` is evaluation mode and returns
``(logits, loss)`` as the PyTorch THL's does. ``thl-np finetune`` is the same loop with checkpoints.
"""
from __future__ import annotations

import argparse
import os
import random
import sysconfig

import numpy as np

import thl_np
from thl_np.finetune.examples import batch, parse_records
from thl_np.finetune.models import Subset
from thl_np.training import AdamW, clip_grad_norm, lr_at


def snippets(package, rng, n, test):
    """n snippets of whole lines (40-128 bytes) from the package's files: the first file held out for test."""
    root = os.path.join(sysconfig.get_paths()["stdlib"], package)
    files = sorted(f for f in os.listdir(root) if f.endswith(".py"))
    files = files[:1] if test else files[1:]
    lines = [ln for f in files for ln in open(os.path.join(root, f), encoding="utf-8").read().split("\n")]
    out = []
    while len(out) < n:
        i = rng.randrange(len(lines))
        text = ""
        while i < len(lines) and len((text + lines[i] + "\n").encode()) <= 128:
            text += lines[i] + "\n"
            i += 1
        if len(text.encode()) >= 40 and text.strip():
            out.append({"text": text, "label": package})
    return out


def dataset(n_per_class, test, seed):
    rng = random.Random(seed + test)
    records = [r for p in ("email", "json") for r in snippets(p, rng, n_per_class, test)]
    return parse_records([(i, f"example {i}", r) for i, r in enumerate(records, 1)], "sequence-classification",
                         "stdlib", label2id={"email": 0, "json": 1})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--tiny", action="store_true", help="a small fresh model instead of the packaged one")
    args = parser.parse_args(argv)

    labels = {0: "email", 1: "json"}
    if args.tiny:
        config = thl_np.THLConfig(vocab_size=259, dim=16, num_tiers=2, tier_dims=[16, 16], tier_timescales=[1, 8],
                                  memory_slots=8, query_dim=8, num_heads=2, head_dim=8, local_window=8,
                                  pad_token_id=256)
        model = thl_np.THLForSequenceClassification(config, id2label=labels, seed=0)
    else:
        from thl_np.cli.basic import resolve_model_dir

        model = thl_np.THLForSequenceClassification.from_pretrained(
            resolve_model_dir(None), id2label=labels, seed=0, log=print, pad_token_id=256)  # the byte tokenizer's pad
    train, test = dataset(200, False, 0), dataset(50, True, 0)
    trainable = model.trainable_names()          # not the language-model output head
    params = Subset(model.params, trainable)
    optimizer = AdamW(params, weight_decay=0.01)
    rng = np.random.default_rng(0)
    for step in range(args.steps):
        index = rng.choice(len(train), size=args.batch_size, replace=False)
        input_ids, y = batch(train, index, model.config, max_len=129)
        T, N, c = input_ids.shape[1], input_ids.shape[0], model.config
        noise = rng.random((T, N, c.num_heads, c.memory_slots))        # training-mode routing
        loss, grads = model.value_and_grad(input_ids, y, dropout=rng, gumbel_uniform=noise)
        grads = {name: grads[name] for name in trainable}
        clip_grad_norm(grads, 1.0)
        optimizer.step(params, grads, lr_at(step, args.lr, warmup=20, total_steps=args.steps))
        if (step + 1) % 20 == 0:
            print(f"step {step + 1}: loss {loss:.4f}")

    correct = 0
    for start in range(0, len(test), 32):
        index = np.arange(start, min(len(test), start + 32))
        input_ids, y = batch(test, index, model.config, max_len=129)
        logits, loss = model(input_ids, labels=y)                  # evaluation mode: (logits, loss)
        correct += int((logits.argmax(axis=1) == y).sum())
    accuracy = correct / len(test)
    print(f"held-out accuracy {accuracy:.3f} on {len(test)} snippets (chance 0.5)")
    return accuracy


if __name__ == "__main__":
    main()

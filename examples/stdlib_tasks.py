#!/usr/bin/env python3
"""Three labelled data sets built from the Python standard library on this machine, and two baselines.

    python examples/stdlib_tasks.py build --out data/stdlib-tasks      # train.jsonl / test.jsonl per task
    python examples/stdlib_tasks.py baselines data/stdlib-tasks         # majority class, bag-of-bytes LR

Nobody here wrote the data: it is CPython's own source (``sysconfig``'s ``stdlib`` folder, test folders left
out), and the labels come from where a snippet lives or from Python's own ``tokenize`` and ``ast``.
Train and test examples come from *different files* (a seeded ~25% of each package's files is held out),
so no test snippet overlaps a training one.

- ``topic`` (sequence classification): a snippet of whole lines, 48-128 bytes, labelled with the package it
  comes from (8 packages, 1,000 training and 100 test snippets each).
- ``tokens`` (token classification): a snippet of whole lines, 48-128 bytes, starting outside any multi-line
  token; every byte labelled with the type of the ``tokenize`` token covering it: NAME, OP, NUMBER,
  STRING, COMMENT, NEWLINE (NEWLINE and NL), or WS (no token: spaces, indentation, line continuations).
- ``nextline`` (multiple choice): up to three lines of a function (``ast``) as the context; the choices are
  the line that follows them and three non-blank lines drawn from functions of other files (4 choices, the
  right one at a random place); 8,000 training and 400 test examples.

The baselines (NumPy and SciPy only): the majority class of the training set; and multinomial logistic
regression on bags of bytes (standardised), its L2 weight chosen on a fifth of the training set and then
refitted on all of it. Features: the byte frequencies of the snippet (topic); the one-hot byte and the byte
frequencies of the 16 bytes before it (tokens; the model reads left to right too); per choice, the byte
frequencies of the choice and their product with those of the context's last line, one score per choice,
softmax over the four (nextline).
"""
from __future__ import annotations

import argparse
import ast
import io
import json
import os
import random
import sysconfig
import tokenize

import numpy as np

PACKAGES = ["asyncio", "distutils", "email", "idlelib", "lib2to3", "multiprocessing", "tkinter", "xml"]
SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages"}
TOKEN_LABELS = {tokenize.NAME: "NAME", tokenize.OP: "OP", tokenize.NUMBER: "NUMBER", tokenize.STRING: "STRING",
                tokenize.COMMENT: "COMMENT", tokenize.NEWLINE: "NEWLINE", tokenize.NL: "NEWLINE"}
MIN_BYTES, MAX_BYTES = 48, 128
SEED = 16


def stdlib() -> str:
    return sysconfig.get_paths()["stdlib"]


def python_files(folder):
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        out += [os.path.join(root, f) for f in sorted(files) if f.endswith(".py")]
    return out


def read(path) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (UnicodeDecodeError, OSError):
        return None


def split_files(files, rng, fraction=0.25):
    """A seeded ``fraction`` of the files (at least one) for testing, the rest for training."""
    files = list(files)
    rng.shuffle(files)
    n_test = max(1, round(len(files) * fraction))
    return sorted(files[n_test:]), sorted(files[:n_test])


def line_windows(lines, starts, rng, count):
    """Up to ``count`` snippets of whole lines, MIN_BYTES..MAX_BYTES UTF-8 bytes, starting at a line of
    ``starts``: (first line, number of lines, text)."""
    out, tries = [], 0
    while len(out) < count and tries < 50 * count and starts:
        tries += 1
        i = rng.choice(starts)
        text, j = "", i
        while j < len(lines) and len((text + lines[j]).encode()) <= MAX_BYTES:
            text += lines[j]
            j += 1
        if len(text.encode()) >= MIN_BYTES and text.strip():
            out.append((i, j - i, text))
    return out


# ------------------------------------------------------------------------------------------ the data sets
def topic(rng, per_class=(1000, 100)):
    sets = {"train": [], "test": []}
    for package in PACKAGES:
        train_files, test_files = split_files(python_files(os.path.join(stdlib(), package)), rng)
        for part, files, n in (("train", train_files, per_class[0]), ("test", test_files, per_class[1])):
            pool = []
            for path in files:
                text = read(path)
                if text:
                    lines = list(io.StringIO(text))
                    pool += [(lines, i) for i in range(len(lines))]
            seen = set()
            while sum(1 for e in sets[part] if e["label"] == package) < n:
                lines, i = rng.choice(pool)
                (w,) = line_windows(lines, [i], rng, 1) or [None]
                if w is None or (id(lines), i) in seen:
                    continue
                seen.add((id(lines), i))
                sets[part].append({"text": w[2], "label": package})
    return sets


def _token_labels(text):
    """Per character of ``text``: the label of the tokenize token covering it, WS where none does; and the
    lines where a multi-line token is open at the line's start (no snippet may start there)."""
    lines = list(io.StringIO(text))               # split at "\n" only, as tokenize reads it
    offsets = np.cumsum([0] + [len(line) for line in lines])
    labels = ["WS"] * len(text)
    inside = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        name = TOKEN_LABELS.get(tok.type)
        (r0, c0), (r1, c1) = tok.start, tok.end
        if r1 > r0:
            inside.update(range(r0, r1))          # 0-based lines r0 .. r1-1 are continued into
        if name is None:
            continue
        a, b = offsets[r0 - 1] + c0, offsets[r1 - 1] + c1
        labels[a:b] = [name] * (b - a)
    return lines, labels, offsets, inside


def tokens(rng, counts=(2000, 400)):
    files = [f for package in PACKAGES for f in python_files(os.path.join(stdlib(), package))]
    train_files, test_files = split_files(files, rng)
    sets = {}
    for part, files, n in (("train", train_files, counts[0]), ("test", test_files, counts[1])):
        examples = []
        per_file = -(-n // len(files)) + 1
        for path in files:
            text = read(path)
            if not text:
                continue
            try:
                lines, labels, offsets, inside = _token_labels(text)
            except (tokenize.TokenError, SyntaxError, IndentationError):
                continue
            starts = [i for i in range(len(lines)) if i not in inside]
            for i, k, snippet in line_windows(lines, starts, rng, per_file):
                chars = labels[offsets[i]:offsets[i + k]]
                per_byte = [lab for ch, lab in zip(snippet, chars, strict=True) for _ in ch.encode()]
                examples.append({"text": snippet, "labels": per_byte})
        rng.shuffle(examples)
        sets[part] = examples[:n]
    return sets


def _function_lines(text):
    """(lines, [(first body line, last line)] of every function) for a source text (0-based, inclusive)."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None, []
    spans = [(node.lineno - 1, node.end_lineno - 1) for node in ast.walk(tree)
             if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return text.split("\n"), spans


def _usable(line):
    return line.strip() and 8 <= len(line) <= 80 and line.isascii()


def nextline(rng, counts=(8000, 400), n_choices=4):
    files = [f for package in PACKAGES for f in python_files(os.path.join(stdlib(), package))]
    train_files, test_files = split_files(files, rng)
    sets = {}
    for part, files, n in (("train", train_files, counts[0]), ("test", test_files, counts[1])):
        parsed = [(path, *_function_lines(read(path) or "")) for path in files]
        parsed = [(path, lines, spans) for path, lines, spans in parsed if lines and spans]
        pool = {path: [ln for a, b in spans for ln in lines[a:b + 1] if _usable(ln)] for path, lines, spans in parsed}
        examples = []
        while len(examples) < n:
            path, lines, spans = rng.choice(parsed)
            a, b = rng.choice(spans)
            if b - a < 2:
                continue
            i = rng.randint(a + 1, b)              # the line to guess; the context is up to 3 lines before it
            if not _usable(lines[i]) or not any(ln.strip() for ln in lines[max(a, i - 3):i]):
                continue
            others = [p for p in pool if p != path and pool[p]]
            distractors = []
            while len(distractors) < n_choices - 1:
                line = rng.choice(pool[rng.choice(others)])
                if line != lines[i] and line not in distractors:
                    distractors.append(line)
            k = rng.randrange(n_choices)
            choices = distractors[:k] + [lines[i]] + distractors[k:]
            context = "".join(ln + "\n" for ln in lines[max(a, i - 3):i])
            examples.append({"context": context, "choices": choices, "label": k})
        sets[part] = examples
    return sets


TASKS = {"topic": ("sequence-classification", topic), "tokens": ("token-classification", tokens),
         "nextline": ("multiple-choice", nextline)}


def build(out):
    for name, (_task, make) in TASKS.items():
        sets = make(random.Random(SEED))
        os.makedirs(os.path.join(out, name), exist_ok=True)
        for part, examples in sets.items():
            with open(os.path.join(out, name, f"{part}.jsonl"), "w", encoding="utf-8") as f:
                for ex in examples:
                    f.write(json.dumps(ex) + "\n")
        print(f"{name}: {len(sets['train'])} training, {len(sets['test'])} test examples -> {out}/{name}/")


# ------------------------------------------------------------------------------------------ baselines
def _bag(data: bytes) -> np.ndarray:
    v = np.bincount(np.frombuffer(data, np.uint8), minlength=256).astype(np.float64)
    return v / max(1, len(data))


def softmax_regression(X, y, groups=None, lam=1e-3, classes=None):
    """Multinomial logistic regression with an L2 weight ``lam`` (per example), fitted with L-BFGS.
    ``groups``: None (one row per example, ``classes`` outputs), or the number of choices C (rows are
    consecutive groups of C choices, one shared weight vector scores each, softmax within a group)."""
    from scipy.optimize import minimize
    from scipy.special import log_softmax

    n, d = X.shape
    k = 1 if groups else classes
    m = n // groups if groups else n

    def f(w):
        W = w.reshape(d + 1, k)
        Z = X @ W[:-1] + W[-1]
        Z = Z.reshape(m, groups) if groups else Z
        logp = log_softmax(Z, axis=1)
        loss = -logp[np.arange(m), y].mean() + 0.5 * lam * (W[:-1] ** 2).sum()
        G = np.exp(logp)
        G[np.arange(m), y] -= 1.0
        G = (G / m).reshape(n, k)
        grad = np.vstack([X.T @ G + lam * W[:-1], G.sum(axis=0, keepdims=True)])
        return loss, grad.ravel()

    res = minimize(f, np.zeros((d + 1) * k), jac=True, method="L-BFGS-B", options={"maxiter": 500})
    W = res.x.reshape(d + 1, k)
    return lambda Xt: (Xt @ W[:-1] + W[-1])


def _standardise(X, Xt):
    """Features scaled to unit variance on the training set (and centred, when dense), so that one L2 grid
    suits every feature set."""
    from scipy import sparse

    if sparse.issparse(X):
        mean = np.asarray(X.mean(axis=0)).ravel()
        var = np.asarray(X.multiply(X).mean(axis=0)).ravel() - mean ** 2
        scale = sparse.diags(1.0 / np.sqrt(np.maximum(var, 1e-12)))
        return (X @ scale).tocsr(), (Xt @ scale).tocsr()
    mean, std = X.mean(axis=0), np.maximum(X.std(axis=0), 1e-12)
    return (X - mean) / std, (Xt - mean) / std


def _fit_and_score(X, y, Xt, yt, groups=None, classes=None, seed=0):
    """Choose the L2 weight on a fifth of the training set, refit on all of it; accuracy on the test set."""
    X, Xt = _standardise(X, Xt)
    rng = np.random.default_rng(seed)
    m = len(y)
    perm = rng.permutation(m)
    val, fit = perm[: m // 5], perm[m // 5:]

    def rows(index):
        return (index[:, None] * groups + np.arange(groups)).ravel() if groups else index

    def accuracy(model, Xe, ye):
        Z = model(Xe)
        Z = Z.reshape(len(ye), groups) if groups else Z
        return float((Z.argmax(axis=1) == ye).mean())

    best = max((accuracy(softmax_regression(X[rows(fit)], y[fit], groups, lam, classes), X[rows(val)], y[val]), -lam)
               for lam in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1))
    lam = -best[1]
    return accuracy(softmax_regression(X, y, groups, lam, classes), Xt, yt), lam


def _load(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def baselines(folder, window=16):
    from scipy import sparse

    report = {}
    train, test = (_load(os.path.join(folder, "topic", f"{p}.jsonl")) for p in ("train", "test"))
    names = sorted({e["label"] for e in train})
    y, yt = (np.array([names.index(e["label"]) for e in s]) for s in (train, test))
    X, Xt = (np.stack([_bag(e["text"].encode()) for e in s]) for s in (train, test))
    acc, lam = _fit_and_score(X, y, Xt, yt, classes=len(names))
    report["topic"] = {"majority": float((yt == np.bincount(y).argmax()).mean()), "bag_of_bytes_lr": acc, "l2": lam}

    train, test = (_load(os.path.join(folder, "tokens", f"{p}.jsonl")) for p in ("train", "test"))
    names = sorted({lab for e in train for lab in e["labels"]})

    def token_features(examples):
        rows, cols, vals, labels = [], [], [], []
        r = 0
        for e in examples:
            data = np.frombuffer(e["text"].encode(), np.uint8)
            for t, b in enumerate(data):
                rows.append(r)
                cols.append(int(b))
                vals.append(1.0)
                before = data[max(0, t - window):t]
                if len(before):
                    counts = np.bincount(before, minlength=256)
                    nz = np.flatnonzero(counts)
                    rows += [r] * len(nz)
                    cols += list(256 + nz)
                    vals += list(counts[nz] / len(before))
                labels.append(names.index(e["labels"][t]))
                r += 1
        return sparse.csr_matrix((vals, (rows, cols)), shape=(r, 512)), np.array(labels)

    (X, y), (Xt, yt) = token_features(train), token_features(test)
    acc, lam = _fit_and_score(X, y, Xt, yt, classes=len(names))
    report["tokens"] = {"majority": float((yt == np.bincount(y).argmax()).mean()), "bag_of_bytes_lr": acc,
                        "l2": lam}

    train, test = (_load(os.path.join(folder, "nextline", f"{p}.jsonl")) for p in ("train", "test"))

    def choice_features(examples):
        out = []
        for e in examples:
            last = _bag(e["context"].splitlines()[-1].encode())
            for c in e["choices"]:
                bag = _bag(c.encode())
                out.append(np.concatenate([bag, bag * last * 256]))
        return np.stack(out)

    C = len(train[0]["choices"])
    y, yt = (np.array([e["label"] for e in s]) for s in (train, test))
    acc, lam = _fit_and_score(choice_features(train), y, choice_features(test), yt, groups=C)
    report["nextline"] = {"majority": float((yt == np.bincount(y, minlength=C).argmax()).mean()),
                          "bag_of_bytes_lr": acc, "l2": lam}
    for name, r in report.items():
        print(f"{name}: majority class {r['majority']:.4f}, bag-of-bytes logistic regression "
              f"{r['bag_of_bytes_lr']:.4f} (L2 weight {r['l2']:g})")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write <out>/{topic,tokens,nextline}/{train,test}.jsonl")
    b.add_argument("--out", required=True)
    s = sub.add_parser("baselines", help="majority class and bag-of-bytes logistic regression on the test sets")
    s.add_argument("folder")
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.out)
    else:
        baselines(args.folder)


if __name__ == "__main__":
    main()

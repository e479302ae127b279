#!/usr/bin/env python3
"""Write docs/SPEC_MAP.md from the code: for each step of spec §4 and for §5's losses, the equation as the
implementing module or function states it in its docstring, the forward function, its backward, and the
reference vectors (reference/manifest.json) that exercise it.

    python docs/make_spec_map.py            # rewrite docs/SPEC_MAP.md
    python docs/make_spec_map.py --check    # exit 1 (and say so) if docs/SPEC_MAP.md is out of date

The table below (SECTIONS) only says which function implements which step; every equation and every
description in the output is read from the code, so the map changes when the code does (and
tests/test_reference.py fails until this script is rerun).
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
import textwrap
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "docs", "SPEC_MAP.md")
MANIFEST = os.path.join(ROOT, "reference", "manifest.json")


@dataclass
class Section:
    number: str                 # "§4.3"
    title: str
    equation: list              # dotted names whose docstrings state the equation
    forward: list
    backward: list
    helpers: list = field(default_factory=list)
    note: str = ""              # where the step is composed, when that is not obvious


NN = "thl_np.components"
SECTIONS = [
    Section("§4.1", "Embed", [f"{NN}.embedding"], [f"{NN}.embedding.embedding_forward"],
            [f"{NN}.embedding.embedding_backward"]),
    Section("§4.2", "Local attention (Tier-0 sliding window)", [f"{NN}.local_attention"],
            [f"{NN}.local_attention.local_attention_forward"],
            [f"{NN}.local_attention.local_attention_backward"],
            helpers=[f"{NN}.local_attention.buffer_push"],
            note="The gradient reaching the stored embeddings is routed to earlier tokens by "
                 "`thl_np.step.sequence_backward`."),
    Section("§4.3", "Router read", [f"{NN}.router"], [f"{NN}.router.router_forward"],
            [f"{NN}.router.router_backward"],
            helpers=[f"{NN}.router.router_input", f"{NN}.router.gumbel_noise", f"{NN}.primitives.top_k_desc",
                     f"{NN}.router.slot_scores", f"{NN}.router.apply_slot_capacity"]),
    Section("§4.4", "Read metadata", [f"{NN}.router.read_meta_forward"], [f"{NN}.router.read_meta_forward"],
            [f"{NN}.router.read_meta_backward"], helpers=[f"{NN}.router.read_weights_per_slot"]),
    Section("§4.5", "Tiers (GRU cells under their clocks)", [f"{NN}.gru", "thl_np.step.tiers_forward"],
            [f"{NN}.gru.gru_forward", "thl_np.step.tiers_forward"],
            [f"{NN}.gru.gru_backward", "thl_np.step.tiers_backward"], helpers=[f"{NN}.primitives.sigmoid"]),
    Section("§4.6", "Writer", [f"{NN}.writer"], [f"{NN}.writer.writer_forward"],
            [f"{NN}.writer.writer_backward"],
            helpers=[f"{NN}.writer.writer_input", f"{NN}.writer.affinities", f"{NN}.writer.novelty_of",
                     f"{NN}.writer.eviction_scores", f"{NN}.primitives.top_k_desc"],
            note="`thl_np.step.sequence_backward` adds the writer's `d_m_star` to the memory gradient at "
                 "row j*."),
    Section("§4.7", "Memory decay and write", [f"{NN}.writer.memory_write_forward"],
            [f"{NN}.writer.memory_write_forward"], [f"{NN}.writer.memory_write_backward"]),
    Section("§4.8", "Output (LayerNorm + head)", [f"{NN}.output"],
            [f"{NN}.output.layer_norm_forward", f"{NN}.output.linear_forward", "thl_np.step.output_forward"],
            [f"{NN}.output.layer_norm_backward", f"{NN}.output.linear_backward"]),
    Section("§4.9", "Advance (t ← t + 1, tier states ← s_new), and the whole step",
            ["thl_np.step.thl_step"],
            ["thl_np.step.thl_step", "thl_np.step.run_sequence"], ["thl_np.step.sequence_backward"],
            note="`thl_np.state.InferenceState` holds the spec §3 state. Which implementation of "
                 "each component the step calls is the config's choice (`thl_np.components.registry`)."),
    Section("§5", "Losses and gradients", ["thl_np.step.sequence_loss"],
            [f"{NN}.output.cross_entropy_forward", f"{NN}.output.load_balance_forward",
             "thl_np.step.sequence_loss", "thl_np.step.add_load_balance", "thl_np.step.loss_and_grads",
             "thl_np.model.value_and_grad"],
            ["thl_np.step.sequence_backward", "thl_np.step.head_loss_and_backward"],
            note="`cross_entropy_forward` returns d loss / d logits and `load_balance_forward` returns "
                 "d KL / d A with their values: each is its own backward."),
    Section("§H", "Task heads (docs/TASKS.md; not part of THL_SPEC.md)", [f"{NN}.heads"],
            [f"{NN}.heads.last_positions", f"{NN}.heads.pooled_head_forward", f"{NN}.heads.token_head_forward",
             f"{NN}.heads.masked_cross_entropy"],
            [f"{NN}.heads.pooled_head_backward", f"{NN}.heads.token_head_backward"],
            helpers=[f"{NN}.heads.pool_last_forward", f"{NN}.heads.pool_last_backward",
                     f"{NN}.heads.dropout_forward", f"{NN}.heads.dropout_backward", f"{NN}.heads.token_labels"],
            note="`thl_np.finetune.models` composes them with the body: the head's backward gives d tier states "
                 "[N, T, Σd_k], which `thl_np.step.sequence_backward` (plain) or "
                 "`thl_np.engines.gradient.fast_backward` (fast) takes through the T steps."),
]


def resolve(dotted: str):
    """A module, or a function inside one, from its dotted name."""
    try:
        return importlib.import_module(dotted)
    except ImportError:
        module, _, name = dotted.rpartition(".")
        return getattr(importlib.import_module(module), name)


def docstring(obj) -> str:
    return inspect.cleandoc(obj.__doc__ or "(no docstring)")


def first_paragraph(obj) -> str:
    return " ".join(docstring(obj).split("\n\n")[0].split())


def signature(dotted: str) -> str:
    obj = resolve(dotted)
    return f"{obj.__name__}{inspect.signature(obj)}"


def location(dotted: str) -> str:
    obj = resolve(dotted)
    module = obj if inspect.ismodule(obj) else inspect.getmodule(obj)
    return os.path.relpath(inspect.getsourcefile(module), ROOT)


def reference_cases(number: str) -> list:
    """Reference cases whose manifest entry names this spec section (§4 and §5 sections also list the
    whole-sequence and training cases)."""
    if not os.path.exists(MANIFEST):
        return []
    with open(MANIFEST, encoding="utf-8") as f:
        cases = json.load(f)["cases"]
    hits = [cid for cid, c in cases.items() if number in c.get("spec", [])]
    if number in ("§4.9", "§5"):
        hits += [cid for cid, c in cases.items() if c["kind"] in ("sequence", "training") and cid not in hits]
    return hits


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    out = [
        "# Spec map: where each step of THL_SPEC.md lives in the code",
        "",
        "<!-- Generated by docs/make_spec_map.py from the code's docstrings; do not edit by hand. "
        "Rerun `python docs/make_spec_map.py` after changing a docstring. -->",
        "",
        "For each step of spec §4 and for §5's losses: the equation as the implementing module or function "
        "states it, the forward function, its backward (each forward/backward pair sits side by side in one "
        "file), and the reference vectors that exercise it (see docs/PORTING.md). Parameter names follow "
        "spec §2; linear weights are `[out, in]` and applied as `x W^T + b`.",
        "",
        "| § | step | forward | backward | reference vectors |",
        "|---|---|---|---|---|",
    ]
    for s in SECTIONS:
        fwd = "<br>".join(f"`{resolve(d).__module__}.{resolve(d).__name__}`" for d in s.forward)
        bwd = "<br>".join(f"`{resolve(d).__module__}.{resolve(d).__name__}`" for d in s.backward)
        refs = "<br>".join(f"`{c}`" for c in reference_cases(s.number)) or "—"
        out.append(f"| {s.number} | [{s.title}](#{anchor(s)}) | {fwd} | {bwd} | {refs} |")
    for s in SECTIONS:
        out += ["", f"## {s.number} {s.title}", ""]
        for dotted in s.equation:
            out.append(f"Equation, from the docstring of `{dotted}` ({location(dotted)}):")
            out += ["", "```text", docstring(resolve(dotted)), "```", ""]
        out.append("| role | function | what its docstring says |")
        out.append("|---|---|---|")
        rows = [("forward", d) for d in s.forward] + [("backward", d) for d in s.backward]
        rows += [("helper", d) for d in s.helpers]
        for role, dotted in rows:
            out.append(f"| {role} | `{cell(signature(dotted))}`<br>{location(dotted)} | "
                       f"{cell(first_paragraph(resolve(dotted)))} |")
        if s.note:
            out += ["", textwrap.fill(s.note, 110)]
        refs = reference_cases(s.number)
        if refs:
            out += ["", "Reference vectors: " + ", ".join(f"`reference/{c}/`" for c in refs) + "."]
    return "\n".join(out) + "\n"


def anchor(s: Section) -> str:
    text = f"{s.number} {s.title}".lower()
    keep = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return keep.replace(" ", "-")


def main(argv) -> int:
    text = render()
    if "--check" in argv:
        current = open(OUT, encoding="utf-8").read() if os.path.exists(OUT) else ""
        if current != text:
            print(f"{os.path.relpath(OUT, ROOT)} is out of date: run `python docs/make_spec_map.py`")
            return 1
        print(f"{os.path.relpath(OUT, ROOT)} is up to date")
        return 0
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {os.path.relpath(OUT, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main(sys.argv[1:]))

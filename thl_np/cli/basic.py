"""`thl-np init`, `thl-np info` and `thl-np generate`: make a model, look inside it, sample from it.

Heavy modules (the model, the safetensors reader) are imported inside the commands, so that
`thl-np --help` stays instant and one missing piece does not take the whole CLI down.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..checks import check_output_dir, check_output_file
from ..config import DTYPES, THLConfig
from ..errors import WeightsError
from .params import Number, check_new_model_folder

BYTE_VOCAB_SIZE = 259  # the byte tokenizer's 256 bytes + pad, eos, unk
WIDTH_FIELDS = ("embedding_dim", "hidden_dim", "memory_dim", "value_dim", "tier_dims")


# ---------------------------------------------------------------------------------------- helpers


def resolve_model_dir(model: str | None) -> Path:
    """The folder to load for --model (``thl_np.io.folder.resolve_model_dir``: a model folder, a training
    run's latest checkpoint, or the packaged default model)."""
    from ..io.folder import resolve_model_dir as resolve

    return Path(resolve(model))


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB': sizes a reader can compare at a glance."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def build_init_config(config_file, overrides: dict, dim: int | None, num_tiers: int | None) -> THLConfig:
    """A config from an optional config.json plus flags. Flags win; --dim sets every width.

    Without a config file the vocabulary defaults to the byte tokenizer's 259. When --dim or --num-tiers
    is given, per-tier lists from the file are rebuilt (d per tier, timescales 8**k) so they agree.
    """
    data = THLConfig.load(config_file).to_dict() if config_file else {"vocab_size": BYTE_VOCAB_SIZE}
    data.update({k: v for k, v in overrides.items() if v is not None})
    if dim is not None:
        for name in WIDTH_FIELDS:
            data.pop(name, None)
    if num_tiers is not None:
        data["num_tiers"] = num_tiers
        widths = data.get("tier_dims") or [dim or data.get("embedding_dim", 768)]
        if len(widths) != num_tiers:
            data["tier_dims"] = [widths[0]] * num_tiers
        if len(data.get("tier_timescales") or []) != num_tiers:
            data["tier_timescales"] = [8**k for k in range(num_tiers)]
    return THLConfig(dim=dim, **data)


def model_summary(model_dir: Path) -> dict:
    """Everything `info` shows, as plain JSON-able values. Reads config.json and the weights header only."""
    from ..io.safetensors import list_tensors
    from ..params import num_parameters
    from ..quant.report import file_summary
    from ..state import InferenceState

    config = THLConfig.load(str(model_dir))
    n = num_parameters(config)
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise WeightsError(
            f"no model.safetensors in {model_dir}: a model folder needs config.json + model.safetensors"
        )
    infos = list_tensors(str(weights))
    tensors = [
        {"name": t.name, "dtype": str(t.dtype), "shape": [int(s) for s in t.shape], "nbytes": int(t.nbytes)}
        for t in infos
    ]
    return {
        "model": str(model_dir),
        "config": config.to_dict(),
        "num_parameters": n,
        "parameter_bytes": {dt: n * (4 if dt == "float32" else 8) for dt in DTYPES},
        "state_bytes_per_sequence": {dt: InferenceState.init(1, config, dtype=dt).nbytes for dt in DTYPES},
        "weights_file": {"path": str(weights), "bytes": weights.stat().st_size, "num_tensors": len(tensors)},
        "tensors": tensors,
        **({"quantization": file_summary(config, infos)} if config.quantization else {}),
    }


def print_summary(info: dict) -> None:
    config, pbytes, sbytes = info["config"], info["parameter_bytes"], info["state_bytes_per_sequence"]
    click.echo(f"model: {info['model']}")
    click.echo("config:")
    for key, value in config.items():
        click.echo(f"  {key}: {json.dumps(value)}")
    click.echo(f"parameters: {info['num_parameters']:,} "
               f"({human_bytes(pbytes['float32'])} float32, {human_bytes(pbytes['float64'])} float64)")
    click.echo(f"state per sequence: {sbytes['float32']:,} bytes float32, "
               f"{sbytes['float64']:,} bytes float64 (fixed, whatever the context length)")
    wf = info["weights_file"]
    click.echo(f"weights: {wf['path']} ({human_bytes(wf['bytes'])}, {wf['num_tensors']} tensors)")
    q = info.get("quantization")
    if q:
        click.echo(f"quantization: {q['scheme']}: {q['int8_tensors']} matrices int8 + float32 scales "
                   f"(W = scale * q), {q['float_tensors']} tensors float; {human_bytes(q['stored_bytes'])}, "
                   f"{q['ratio_to_float32']:.3f}x the float32 size ({human_bytes(q['float32_bytes'])})")
    rows = [(t["name"], t["dtype"], "x".join(map(str, t["shape"])) or "scalar", f"{t['nbytes']:,}")
            for t in info["tensors"]]
    header = ("name", "dtype", "shape", "bytes")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        cells = [cell.ljust(w) for cell, w in zip(row[:3], widths[:3], strict=True)]
        click.echo("  " + "  ".join([*cells, row[3].rjust(widths[3])]))


def read_prompt(prompt: str) -> str | bytes:
    """`-` means stdin, read as bytes so that any input (even invalid UTF-8) reaches the model as is."""
    if prompt == "-":
        return sys.stdin.buffer.read()
    return prompt


# ---------------------------------------------------------------------------------------- commands


@click.command()
@click.option("--out", required=True, type=click.Path(), help="Folder for config.json + model.safetensors.")
@click.option("--dim", type=int, help="Every width at once: embedding, hidden, memory, value, tier widths.")
@click.option("--vocab-size", type=int, help="Vocabulary size [default: 259, the byte tokenizer].")
@click.option("--num-tiers", type=int, help="Number of GRU tiers K (timescales 1, 8, 64, ...).")
@click.option("--memory-slots", type=int, help="Memory slots J.")
@click.option("--local-window", type=int, help="Tier-0 local attention window (0 disables it).")
@click.option("--num-heads", type=int, help="Router heads H (value width must be divisible by H).")
@click.option("--head-dim", type=int, help="Router query/key width per head.")
@click.option("--read-topk", type=int, help="Slots read per head.")
@click.option("--config", "config_file", type=click.Path(), help="Start from this config.json; flags win.")
@click.option("--seed", type=Number("seed"), help="Seed for the initial weights (same seed, same model).")
@click.option("--dtype", type=click.Choice(DTYPES), help="Compute and storage dtype [default: float32].")
@click.option("--force", is_flag=True, help="Overwrite a non-empty --out folder.")
def init(out, dim, vocab_size, num_tiers, memory_slots, local_window, num_heads, head_dim, read_topk,
         config_file, seed, dtype, force):
    """Write a freshly initialised (untrained) model folder.

    Unset fields take THLConfig's defaults (or the --config file's values).

    \b
    Examples:
      thl-np init --out tiny --dim 64 --memory-slots 32 --local-window 16 --seed 0
      thl-np init --out big --config my_config.json --dtype float64 --force
    """
    from ..model import THLModel
    from ..params import num_parameters

    check_new_model_folder(out, force)
    overrides = dict(vocab_size=vocab_size, memory_slots=memory_slots, local_window=local_window,
                     num_heads=num_heads, head_dim=head_dim, read_topk=read_topk, dtype=dtype)
    config = build_init_config(config_file, overrides, dim, num_tiers)
    check_output_dir(out, "--out", need_bytes=num_parameters(config) * (4 if config.dtype == "float32" else 8))
    model = THLModel(config, seed=seed)
    model.save_pretrained(out)  # all or nothing: a failed write leaves no folder it made
    n = model.num_parameters()
    click.echo(f"wrote {out}: {n:,} parameters ({human_bytes(n * model.dtype.itemsize)} {model.dtype})")
    click.echo(f"try: thl-np generate --model {out} \"Hello\"")


@click.command()
@click.argument("model", required=False, metavar="[MODEL]")
@click.option("--model", "model_dir", type=click.Path(), help="Model folder [default: the packaged model].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def info(model, model_dir, as_json):
    """Show a model's config, size, per-sequence state size and stored tensors.

    MODEL (or --model) is a model folder, a training run's folder, or `default` for the shipped model.
    Reads config.json and the safetensors header only: fast, even for large models.

    \b
    Examples:
      thl-np info default
      thl-np info --model tiny
      thl-np info --model tiny --json | python -m json.tool
    """
    if model is not None and model_dir is not None and model != model_dir:
        raise click.UsageError(f"two models named: {model!r} and --model {model_dir!r}; give one")
    summary = model_summary(resolve_model_dir(model if model is not None else model_dir))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        print_summary(summary)


@click.command()
@click.argument("prompt", default="", required=False)
@click.option("--model", "model_dir", type=click.Path(), help="Model folder [default: the packaged model].")
@click.option("--max-length", type=Number("max_length"), default=100, show_default=True,
              help="Number of new tokens (bytes).")
@click.option("--temperature", type=Number("temperature"), default=1.0, show_default=True, help="0 means greedy.")
@click.option("--top-k", type=Number("top_k"), help="Sample among the K most likely tokens only.")
@click.option("--top-p", type=Number("top_p"), help="Nucleus sampling: the fewest tokens with probability >= P.")
@click.option("--seed", type=Number("seed"), help="Seed for sampling (same seed, same text).")
@click.option("--stop", multiple=True, help="Stop before this text (not printed); repeat for several.")
@click.option("--repetition-penalty", type=Number("repetition_penalty"), default=1.0, show_default=True,
              help="Divide a seen token's positive logit by R, multiply a negative one (prompt included).")
@click.option("--presence-penalty", type=Number("presence_penalty"), default=0.0, show_default=True,
              help="Subtract P from the logit of every token seen (prompt included).")
@click.option("--echo", is_flag=True, help="Print the prompt before the continuation.")
@click.option("--file", "prompts_file", type=click.Path(),
              help="Many prompts as one batch: one per line (a .jsonl file: one JSON string or "
                   "{\"prompt\": ..., \"seed\": ...} per line; '-': stdin); prints one JSON line per prompt.")
@click.option("--state-in", type=click.Path(), help="Continue the context saved in this .npz state file.")
@click.option("--state-out", type=click.Path(), help="Save the context (prompt + new text) to this .npz.")
@click.option("--dtype", type=click.Choice(DTYPES), help="Compute dtype [default: the model's].")
@click.option("--path", "path", type=click.Choice(["auto", "fast", "plain"]), default="auto", show_default=True,
              help="fast: the Numba decode path; plain: the spec's step; auto: fast unless the job is so small "
                   "that the plain path finishes it in about a second. Both give the same text.")
def generate(prompt, model_dir, max_length, temperature, top_k, top_p, seed, stop, repetition_penalty,
             presence_penalty, echo, prompts_file, state_in, state_out, dtype, path):
    """Continue PROMPT with text sampled from the model, streamed as it is produced.

    PROMPT '-' reads the prompt from stdin; an empty prompt starts a new document. Only the
    continuation is printed (--echo prints the prompt first). --state-out/--state-in carry a context
    from one run to the next. With --stop the text ends before the first stop string (the saved state
    has seen it). --file generates many prompts as one batch: each line of output is
    {"prompt": ..., "text": ...} and each text is what that prompt gives alone with the same flags
    (--seed applies to every prompt; a .jsonl line may carry its own "seed"; --echo puts the prompt
    at the start of "text"; --state-in is continued by every prompt).

    \b
    Examples:
      thl-np generate "def fibonacci(n):" --max-length 200 --temperature 0.8 --top-p 0.95
      thl-np generate "def f(x):" --temperature 0 --stop $'\\n\\n' --repetition-penalty 1.2 --echo
      thl-np generate "Once upon a time" --model tiny --temperature 0 --state-out ctx.npz
      thl-np generate " and then" --model tiny --state-in ctx.npz --state-out ctx.npz
      thl-np generate --file prompts.txt --temperature 0 --max-length 40
      echo "Hello" | thl-np generate - --seed 1
    """
    from ..generation import check_penalties, check_sampling_args, generate_text, stream_text
    from ..model import THLModel
    from ..state import InferenceState
    from ..tokenizer import Tokenizer

    check_sampling_args(temperature, top_k, top_p)
    check_penalties(repetition_penalty, presence_penalty)
    if any(not s for s in stop):
        raise click.UsageError("--stop '' is empty: give the text to stop before")
    if prompts_file is not None:
        if prompt:
            raise click.UsageError("give PROMPT or --file, not both")
        if state_out:
            raise click.UsageError("--state-out saves one context: it takes one PROMPT, not --file")
        prompts, seeds = read_prompts_file(prompts_file, seed)
    if state_out:  # checked before the generation, which would otherwise be lost at the save
        check_output_file(state_out, "--state-out")
    state = InferenceState.load(state_in) if state_in else None
    model = THLModel.from_pretrained(str(resolve_model_dir(model_dir)), dtype=dtype)
    vocab = model.config.vocab_size
    if vocab > BYTE_VOCAB_SIZE:
        click.echo(f"warning: the model's vocab_size {vocab} is not the byte tokenizer's {BYTE_VOCAB_SIZE}; "
                   f"only ids < {BYTE_VOCAB_SIZE} will be sampled", err=True)
    options = dict(max_length=max_length, temperature=temperature, top_k=top_k, top_p=top_p, state=state,
                   path=path, stop=list(stop) or None, repetition_penalty=repetition_penalty,
                   presence_penalty=presence_penalty)
    if prompts_file is not None:
        texts = generate_text(model, Tokenizer(), prompts, seed=seeds, **options)
        for p, t in zip(prompts, texts, strict=True):
            shown = p.decode("utf-8", errors="replace")
            click.echo(json.dumps({"prompt": shown, "text": shown + t if echo else t}, ensure_ascii=False))
        return
    text = read_prompt(prompt)
    if echo:
        click.echo(text, nl=False)
    pieces = stream_text(model, Tokenizer(), text, seed=seed, return_state=state_out is not None, **options)
    final_state = yield_to_stdout(pieces)
    if sys.stdout.isatty():
        click.echo()
    if state_out:
        final_state.save(state_out)


def read_prompts_file(path: str, seed) -> tuple[list[bytes], list]:
    """The prompts of --file and a seed for each. A .jsonl file holds one JSON value per line: a string
    (the prompt) or an object with "prompt" and optionally "seed"; any other file holds one prompt per
    line (bytes as they are, the line break not included). Blank lines are skipped in both."""
    from ..checks import check_seed
    from ..errors import InputError

    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as exc:
        raise InputError(f"cannot read --file {path} ({exc.strerror or exc})") from None
    lines = [(n, line.rstrip(b"\r")) for n, line in enumerate(data.split(b"\n"), 1) if line.strip()]
    if not lines:
        raise InputError(f"--file {path} holds no prompt: write one per line")
    if not str(path).endswith(".jsonl"):
        return [line for _, line in lines], [seed] * len(lines)
    prompts, seeds = [], []
    for n, line in lines:
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise InputError(f"--file {path} line {n} is not JSON ({exc})") from None
        if isinstance(item, dict) and set(item) <= {"prompt", "seed"} and isinstance(item.get("prompt"), str):
            prompts.append(item["prompt"].encode("utf-8", errors="replace"))
            seeds.append(check_seed(item.get("seed", seed), f"--file {path} line {n}: seed"))
        elif isinstance(item, str):
            prompts.append(item.encode("utf-8", errors="replace"))
            seeds.append(seed)
        else:
            raise InputError(f"--file {path} line {n} must be a JSON string or {{\"prompt\": \"...\", "
                             "\"seed\": 0}")
    return prompts, seeds


def yield_to_stdout(pieces):
    """Write each piece as soon as it exists (click.echo flushes); return the generator's return value."""
    while True:
        try:
            piece = next(pieces)
        except StopIteration as stop:
            return stop.value
        click.echo(piece, nl=False)


COMMANDS = [init, info, generate]

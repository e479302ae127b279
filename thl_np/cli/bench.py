"""`thl-np bench`: decode, prompt and training throughput against the machine's bandwidth bound."""
import functools
import json

import click

from ..errors import InputError

#: The PyTorch THL harness (``benchmarks/bench_peer.py`` of a checkout: ``load_peer``, ``check_config``,
#: ``PeerModel``, ``train_tokens_per_s``). It is not part of the package; that script sets this and runs
#: this command, so ``--peer`` works from a checkout: ``python benchmarks/bench_peer.py --peer PATH``.
PEER_HARNESS = None


@click.command()
@click.option("--model", "model_dir", type=click.Path(), default=None,
              help="Model folder to measure (default: a fresh model of the default config, 174M parameters).")
@click.option("--dim", type=int, default=None, help="Width for a fresh model (default config's 768).")
@click.option("--memory-slots", type=int, default=None, help="J for a fresh model.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--decode-steps", type=int, default=64, show_default=True,
              help="Timed decode steps per batch size (in rounds of 8, alternating with the GEMV bandwidth "
                   "measurement, after a warm-up of at least 1 s); the median is reported.")
@click.option("--prompt-len", type=int, default=128, show_default=True)
@click.option("--no-train", is_flag=True, help="Skip the training throughput figure.")
@click.option("--int8", "int8", type=click.Choice(["int8", "int8-row", "int8-block32", "none"]), default="int8",
              show_default=True, help="Also decode the model's int8 copy (this scheme) in the same rounds, against "
                                      "its own bandwidth bound; none skips it.")
@click.option("--peer", "peer_dir", type=click.Path(), default=None, metavar="PATH",
              help="Also run the PyTorch THL (the thl/ package in PATH; needs torch: pip install 'thl-np[torch]') "
                   "in the same run, same config, float32 and the same weights, and print thl-np / PyTorch. "
                   "Run from a checkout as python benchmarks/bench_peer.py --peer PATH [options].")
@click.option("--generation-only", is_flag=True,
              help="With --model: only the one-thread prefill and generation figures (see below).")
@click.option("--onnx", "onnx", is_flag=True,
              help="Only decode (batch 1 and 8): the model's ONNX export in onnxruntime (CPU) beside thl-np's "
                   "fast path, same weights, same rounds, and the ratio (needs pip install 'thl-np[onnx]').")
@click.option("--json", "as_json", is_flag=True,
              help="Print the figures as one JSON object on standard output (the text lines go to standard error).")
def bench(model_dir, dim, memory_slots, dtype, decode_steps, prompt_len, no_train, int8, peer_dir, generation_only,
          onnx, as_json):
    """Measure decode (batch 1 and 8), prompt and training tokens/s, the GEMV bandwidth, the bandwidth
    bound of a decode step and the ratio to it, and peak memory, all in one run; the same for the model's
    int8 copy (--int8), decoded in the same rounds as the float model. With --peer, the PyTorch THL's
    decode (batch 1 and 8), prompt and training (forward + backward by torch autograd) figures beside
    thl-np's, each pair measured close in time, with the ratio thl-np / PyTorch.

    \b
    Examples:
      thl-np bench                      # the default config (174M parameters, float32)
      thl-np bench --dim 256 --memory-slots 128 --no-train
      thl-np bench --model my-model --json
      thl-np bench --model thl_np/assets/default_model --generation-only
      python benchmarks/bench_peer.py --peer PEER_DIR --json   # beside the PyTorch THL, same weights
      thl-np bench --onnx --model thl_np/assets/default_model   # onnxruntime beside thl-np
    """
    from ..config import THLConfig
    from ..errors import ConfigError
    from ..eval import bench as B
    from ..model import THLModel

    if decode_steps < 1 or prompt_len < 1:
        raise InputError("--decode-steps and --prompt-len must be >= 1")
    if generation_only and not model_dir:
        raise InputError("--generation-only measures a model folder: give --model DIR")
    if onnx and (generation_only or peer_dir or dtype != "float32"):
        raise InputError("--onnx measures float32 decoding alone: drop --generation-only, --peer and --dtype")
    if onnx:
        from ..onnx import require

        require()
    peer = None
    if peer_dir is not None:  # before any work: a missing torch or thl/ is one line, not a late failure
        if PEER_HARNESS is None:
            raise InputError("--peer runs the PyTorch THL harness of a thl-np checkout: run "
                             "python benchmarks/bench_peer.py --peer PATH [options] there")
        if dtype != "float32":
            raise ConfigError(f"--peer compares float32 with float32, got --dtype {dtype}: drop --dtype")
        peer = PEER_HARNESS.load_peer(peer_dir)
    model = None
    config = None
    if model_dir:
        model = THLModel.from_pretrained(model_dir, dtype=dtype)
        if peer is not None:
            PEER_HARNESS.check_config(model.config)
    else:
        kw = {"dtype": dtype}
        if dim:
            kw["dim"] = dim
        if memory_slots:
            kw["memory_slots"] = memory_slots
        config = THLConfig(**kw)
    echo = functools.partial(click.echo, err=as_json)  # with --json, stdout holds the JSON object alone
    if onnx:
        from ..onnx.bench import bench_onnx

        model = model or THLModel(config, seed=0)
        echo(f"{model!r}")
        figures = bench_onnx(model, echo=echo, decode_steps=decode_steps)
        if as_json:
            click.echo(json.dumps(figures, indent=2))
        return
    if generation_only:
        g = B.bench_generation(model)
        echo(f"{model!r}, one thread ({g['threads']} used): prefill {g['prefill_bytes_s']:,.0f} bytes/s; "
             f"generate_text ({g['path']} path) greedy {g['greedy_bytes_s']:,.0f} bytes/s, sampled "
             f"{g['sampled_bytes_s']:,.0f} bytes/s")
        if as_json:
            click.echo(json.dumps({f"generation_{k}": v for k, v in g.items()}, indent=2))
        return
    figures = B.run(model=model, config=config, echo=echo, decode_steps=decode_steps,
                    prompt_len=prompt_len, train=not no_train, int8=None if int8 == "none" else int8, peer=peer,
                    generation=model is not None)
    if as_json:
        click.echo(json.dumps(figures, indent=2))


COMMANDS = [bench]

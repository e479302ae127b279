"""`thl-np quantize`: a float model folder → an int8 model folder (docs/QUANTIZATION.md)."""
from __future__ import annotations

import os

import click

# The choices of thl_np.quant.scheme (SCHEMES and "int8" for the default), spelled out so that the help
# needs no NumPy; a test keeps them equal.
SCHEME_CHOICES = ("int8", "int8-row", "int8-block32")


@click.command("quantize")
@click.option("--model", "model_dir", type=click.Path(), help="Float model folder [default: the packaged model].")
@click.option("--out", required=True, type=click.Path(), help="Folder for the int8 model (config.json + "
                                                                "model.safetensors).")
@click.option("--scheme", type=click.Choice(SCHEME_CHOICES), default="int8", show_default=True,
              help="int8 = int8-row (one float32 scale per row); int8-block32: one per 32 columns of a row.")
@click.option("--force", is_flag=True, help="Overwrite a non-empty --out folder.")
def quantize(model_dir, out, scheme, force):
    """Quantize a model's weights to int8: every matrix (embedding, local attention, router, writer, tiers,
    output head) becomes int8 values and float32 scales, W = scale·q; LayerNorm and biases stay float.

    The result is an ordinary model folder: `generate`, `eval`, `info`, `bench --model` and the layered
    engine load it memory-mapped and decode with int8 kernels. Judge it against its float original with
    `thl-np eval --data TEXT --model FLOAT --compare OUT`.

    \b
    Examples:
      thl-np quantize --out default-int8
      thl-np quantize --model my-model --out my-model-int8 --scheme int8-block32
      thl-np eval --data /usr/lib/python3.11/json --compare default-int8
    """
    from ..io.safetensors import list_tensors
    from ..model import THLModel, quantize_model
    from ..quant.report import file_summary, weight_errors
    from .basic import human_bytes, resolve_model_dir
    from .params import check_new_model_folder

    src = resolve_model_dir(model_dir)
    check_new_model_folder(out, force)
    if os.path.isdir(out) and os.path.samefile(src, out):
        from ..errors import InputError

        raise InputError(f"--out {out} is the model folder itself: choose a new folder")
    model = THLModel.from_pretrained(str(src))
    qmodel = quantize_model(model, scheme)
    qmodel.save_pretrained(out)
    errors = weight_errors(model.params, qmodel.params)
    summary = file_summary(qmodel.config, list_tensors(os.path.join(out, "model.safetensors")))
    worst = max(errors.items(), key=lambda kv: kv[1]["frobenius_rel"])
    click.echo(f"wrote {out}: {summary['scheme']} weights, {summary['int8_tensors']} int8 tensors + "
               f"{summary['float_tensors']} float tensors, model.safetensors {human_bytes(summary['stored_bytes'])} "
               f"({summary['ratio_to_float32']:.3f}x the float32 size {human_bytes(summary['float32_bytes'])})")
    click.echo(f"weight error ||W_q - W|| / ||W||: largest {worst[1]['frobenius_rel']:.2e} ({worst[0]}), "
               f"mean {sum(e['frobenius_rel'] for e in errors.values()) / len(errors):.2e}")
    click.echo(f"judge it: thl-np eval --data TEXT --model {src} --compare {out}")


COMMANDS = [quantize]

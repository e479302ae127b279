"""`thl-np export`: one THL step + head as an ONNX (or ORT-format) file, for ONNX Runtime on servers, phones and
in the browser (docs/DEPLOY.md)."""
from __future__ import annotations

import os

import click


@click.command("export")
@click.option("--format", "fmt", type=click.Choice(["onnx", "ort"]), default="onnx", show_default=True,
              help="onnx: an ONNX file; ort: ONNX Runtime's ORT format (mobile / minimal builds) plus the "
                   "required-operators config beside it.")
@click.option("--model", "model_dir", type=click.Path(), help="Model folder [default: the packaged model].")
@click.option("--out", required=True, type=click.Path(), help="File to write (OUT.json, the state layout, "
                                                                "is written beside it).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("--external-data", is_flag=True,
              help="Keep the weights in OUT.data beside the file (ONNX external data). Automatic past 1.8 GB, "
                   "protobuf's limit being 2 GiB.")
def export(fmt, model_dir, out, force, external_data):
    """Export one spec §4 step plus the head: inputs token_ids [B] and state.<name> for every state array,
    outputs logits [B, V] and next_state.<name> (B dynamic), float32 or int8-row weights, with the
    thl-np version, config and state layout in the file's metadata (and OUT.json).

    \b
    Examples:
      thl-np export --out thl.onnx
      thl-np export --model my-model-int8 --out my.onnx --force
      thl-np export --format ort --out thl.ort
      thl-np check-port thl.onnx            # the export against thl-np, step by step
    """
    from ..onnx import require

    require()
    from ..onnx.export import check_output_path, export_onnx
    from .basic import human_bytes
    from .train import _StderrProgress

    if fmt == "ort":
        out = check_output_path(out, force)
        if external_data:
            from ..errors import InputError

            raise InputError("--external-data does not apply to --format ort (the ORT format holds the weights)")
        import tempfile

        from ..onnx.ort_format import convert_to_ort

        with tempfile.TemporaryDirectory(prefix=".thl-np-export-", dir=os.path.dirname(os.path.abspath(out))) as tmp:
            with _StderrProgress("export: read, build, write") as bar:
                done = export_onnx(model_dir, os.path.join(tmp, "thl_step.onnx"), external_data=False, progress=bar)
            ort = convert_to_ort(done["onnx"], out)
            os.replace(done["json"], out + ".json")
        click.echo(f"wrote {out} ({human_bytes(os.path.getsize(out))}), {ort['operators']} and {out}.json")
        return
    with _StderrProgress("export: read, build, write") as bar:
        done = export_onnx(model_dir, out, force=force, external_data=external_data or None, progress=bar)
    size = os.path.getsize(out) + (os.path.getsize(done["data"]) if done["data"] else 0)
    extra = f" + {done['data']}" if done["data"] else ""
    c = done["config"]
    click.echo(f"wrote {out}{extra} ({human_bytes(size)}; weights "
               f"{'int8-row' if c.quantization else 'float32'}) and {done['json']}")
    click.echo(f"check it: thl-np check-port {out}" + (f" --model {model_dir}" if model_dir else ""))


COMMANDS = [export]

"""`thl-np convert`: turn a PyTorch THL checkpoint into a thl-np model folder.

The conversion module (and NumPy) is imported inside the command so that `thl-np --help` stays instant.
"""
from __future__ import annotations

import click

# The storage precisions write_safetensors accepts (thl_np.io.safetensors.STORAGE_DTYPES, which a test
# keeps equal to this), spelled out here so the CLI does not import NumPy just to build its help.
STORAGE_DTYPES = ("float32", "float16", "bfloat16", "float64")


@click.command("convert")
@click.argument("pytorch_dir", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--dtype", type=click.Choice(STORAGE_DTYPES), default=None,
              help="Storage precision of model.safetensors (default: the checkpoint's own, "
                   "bfloat16 widened to float32).")
@click.option("--force", is_flag=True, help="Overwrite a non-empty OUT_DIR (an existing model, say).")
@click.option("--task", type=click.Choice(["sequence-classification", "token-classification", "multiple-choice"]),
              default=None, help="A task model's checkpoint: its task, where the classifier's shape leaves it "
                                 "open (one tier). Default: read from the checkpoint.")
def convert(pytorch_dir, out_dir, dtype, force, task):
    """Convert a PyTorch THL save_pretrained folder into a thl-np model folder.

    PYTORCH_DIR holds config.json and pytorch_model.bin; OUT_DIR receives config.json and
    model.safetensors. The checkpoint is read without torch and without running its pickle: anything
    but a plain tensor state_dict is refused. The PyTorch THL ignores write_rate (it behaves as
    write_rate = 1.0), so a converted PyTorch checkpoint's config sets write_rate to 1.0; a thl-np
    model folder (float, int8 or task head) is copied unchanged. A task model's checkpoint
    (THLForSequenceClassification & co.: the body under 'thl.', a 'classifier') becomes a task-model
    folder: load it with thl_np.THLForSequenceClassification.from_pretrained(OUT_DIR) (or the others).

    \b
    Example:
      thl-np convert ./thl-pytorch-ckpt ./thl-np-model --dtype float32
      thl-np info --model ./thl-np-model
    """
    from ..io.convert import convert_pytorch_checkpoint
    from .params import check_new_model_folder

    check_new_model_folder(out_dir, force, "OUT_DIR")
    config = convert_pytorch_checkpoint(pytorch_dir, out_dir, dtype=dtype, log=click.echo, task=task)
    loader = "THLModel"
    if config.task is not None:
        from ..task_fields import class_name_for

        loader = class_name_for(config.task)
    click.echo(f"done: {out_dir} is a thl-np model (vocab {config.vocab_size}, tiers {config.tier_dims}); "
               f"load it with {loader}.from_pretrained({out_dir!r})")


COMMANDS = [convert]

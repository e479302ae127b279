"""`thl-np golden` (write the reference vectors) and `thl-np check-port` (compare a port's results with
them). The logic lives in ``thl_np.reference`` (the checker alone in ``thl_np/reference/check.py``);
docs/PORTING.md tells a porter how to use both."""
from __future__ import annotations

import os

import click

from .params import Number


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


@click.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder to write (the repository keeps its copy in reference/).")
@click.option("-q", "--quiet", is_flag=True, help="Do not list the cases as they are written.")
def golden(out_dir, quiet):
    """Regenerate the reference vectors for ports into OUT.

    Deterministic (fixed seeds): the same files every time, so the committed reference/ can be checked
    against a fresh run. Writes manifest.json, cases/, components/ and training/ (see docs/PORTING.md).
    """
    import shutil

    from ..checks import check_output_dir
    from ..reference import generate

    check_output_dir(out_dir, "--out", need_bytes=4 << 20)  # the reference vectors take about 2 MB
    created = not os.path.lexists(out_dir)
    log = None if quiet else (lambda name: click.echo(f"  {name}"))
    try:
        manifest = generate(out_dir, log=log)
    except BaseException:
        if created:  # a folder this command made is not left half written
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    size = _folder_bytes(out_dir) / 1e6
    click.echo(f"wrote {len(manifest['cases'])} reference cases to {out_dir} ({size:.2f} MB)")


@click.command("check-port")
@click.argument("results_dir", type=click.Path())
@click.option("--reference", "reference_dir", type=click.Path(), default=None,
              help="Reference folder (default: reference/ of this checkout).")
@click.option("--case", "cases", multiple=True, metavar="NAME",
              help="Check only this case: a full id (components/gru_cell), its name (gru_cell) or a glob "
                   "(components/writer_*). Repeatable.")
@click.option("--dtype", type=click.Choice(["float64", "float32"]), default="float64", show_default=True,
              help="Which results to compare: RESULTS_DIR/<case>/outputs_<dtype>.npz.")
@click.option("--atol", type=Number("atol"), default=None,
              help="Absolute tolerance for values (default: the manifest's, 1e-9 / 2e-3; with an ONNX file 1e-5).")
@click.option("--rtol", type=Number("rtol"), default=None,
              help="Tolerance for gradients, relative to the tensor's largest entry (default 1e-8 / 3e-2).")
@click.option("-q", "--quiet", is_flag=True, help="List only the tensors that fail.")
@click.option("--model", "model_dir", type=click.Path(), default=None,
              help="With an ONNX file: the model folder it was exported from [default: the packaged model].")
@click.option("--steps", type=click.IntRange(min=1), default=64, show_default=True,
              help="With an ONNX file: steps to run from the zero state.")
@click.option("--batch", type=click.IntRange(min=1), default=3, show_default=True,
              help="With an ONNX file: sequences per step.")
def check_port(results_dir, reference_dir, cases, dtype, atol, rtol, quiet, model_dir, steps, batch):
    """Compare a port's results (laid out like reference/) with the reference vectors, or an ONNX export
    of one step (RESULTS_DIR is then the .onnx file) with thl-np's step on its model.

    Prints OK / NOT OK per tensor with the max absolute and relative difference, then
    "N passed, M failed"; exits with status 1 if anything failed or a result file is missing. For an
    ONNX file: runs it and thl-np side by side from the zero state (float32, abs tolerance 1e-5, slots
    read and written exactly equal) and names the first divergent step and array.

    
    Examples:
      thl-np check-port my-port-results --dtype float32
      thl-np check-port thl.onnx --model my-model --steps 128
    """
    if os.path.isfile(results_dir):
        from ..onnx import require

        require()
        from ..onnx.check import ATOL, check_export, format_check
        from .train import _StderrProgress

        with _StderrProgress("check-port: steps", quiet=quiet) as bar:
            result = check_export(results_dir, model_dir, steps=steps, batch=batch,
                                  atol=ATOL if atol is None else atol, progress=bar)
        click.echo(format_check(result))
        if not result.ok:
            raise SystemExit(1)
        return
    from ..reference import compare_results, format_report

    report = compare_results(results_dir, reference_dir=reference_dir, cases=list(cases) or None, dtype=dtype,
                             atol=atol, rtol=rtol)
    click.echo(format_report(report, verbose=not quiet))
    if not report.ok:
        # SystemExit rather than ctx.exit(1): thl_np.cli.main runs click with standalone_mode=False, where
        # click returns ctx.exit's code instead of raising it, and main() does not pass that code on.
        raise SystemExit(1)


COMMANDS = [golden, check_port]

"""The fgq-onnx command line: thin commands over the library.

Errors the user can fix (FgqError) become one red line on stderr and exit
code 1; anything else one line and exit code 2; `--debug` shows tracebacks.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fgq_onnx import pipeline
from fgq_onnx import model_io
from fgq_onnx.calibration import CalibMethod
from fgq_onnx.data import Color, ImageOptions, Layout
from fgq_onnx.errors import FgqError
from fgq_onnx.report import Report
from fgq_onnx.ternary import Method

app = typer.Typer(help="Fine-grained ternary (2-bit) quantization of ONNX models.", no_args_is_help=True, add_completion=False)
out = Console()
err = Console(stderr=True)


def _root_error(error: BaseException) -> BaseException:
    """The FgqError behind wrapped errors (onnx-ir wraps what a pass raises), if any."""
    seen = error
    while seen is not None:
        if isinstance(seen, FgqError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return error


def command(function):
    """Register a command whose errors end in one line and a non-zero exit."""

    @functools.wraps(function)
    def wrapper(*args, debug: bool = False, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return function(*args, **kwargs)
            except (typer.Exit, typer.Abort):
                raise
            except KeyboardInterrupt:
                err.print("[red]interrupted[/red]: no output was written")
                raise typer.Exit(130) from None
            except Exception as error:  # the one place that turns errors into exit codes
                if debug:
                    raise
                root = _root_error(error)
                if isinstance(root, FgqError):
                    err.print(f"[red]error[/red]: {root}", markup=True, highlight=False, soft_wrap=True)
                    raise typer.Exit(1) from None
                err.print(f"[red]internal error[/red]: {type(root).__name__}: {str(root).splitlines()[0] if str(root) else ''} (rerun with --debug for the traceback)", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            finally:
                for warning in caught:
                    err.print(f"[yellow]warning[/yellow]: {warning.message}", highlight=False, soft_wrap=True)

    # Expose --debug on every command without re-declaring it in each.
    signature = inspect.signature(function, eval_str=True)
    debug_param = inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[bool, typer.Option("--debug", help="Show tracebacks.")])
    wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), debug_param])
    return app.command()(wrapper)


# Options shared by every command that reads images.
SizeOpt = Annotated[Optional[tuple[int, int]], typer.Option("--size", help="Image height and width after the centre crop (default: the model's input).")]
ResizeOpt = Annotated[Optional[int], typer.Option("--resize", help="Shorter image side before cropping (default: the crop's larger side).")]
LayoutOpt = Annotated[Optional[Layout], typer.Option("--layout", help="Input layout (default: inferred from the input shape).")]
ColorOpt = Annotated[Optional[Color], typer.Option("--color", help="Channel order (default: grey for 1 channel, rgb for 3).")]
ScaleOpt = Annotated[float, typer.Option("--pixel-scale", help="Pixel values are multiplied by this first.")]
MeanOpt = Annotated[str, typer.Option("--mean", help="Per-channel mean subtracted after scaling, comma separated.")]
StdOpt = Annotated[str, typer.Option("--std", help="Per-channel std divided by after the mean, comma separated.")]


def image_options(size, resize, layout, color, pixel_scale, mean, std) -> ImageOptions:
    def floats(text: str, name: str) -> tuple[float, ...]:
        try:
            return tuple(float(v) for v in text.split(","))
        except ValueError:
            raise FgqError(f"{name} takes comma-separated numbers, got '{text}'") from None

    std_values = floats(std, "--std")
    if any(v == 0 for v in std_values):
        raise FgqError("--std values must not be zero")
    return ImageOptions(size=size, resize=resize, layout=layout, color=color, scale=pixel_scale, mean=floats(mean, "--mean"), std=std_values)


@contextlib.contextmanager
def progress_bar(description: str, quiet: bool):
    """A rich progress bar; yields a callback(advance, total)."""
    if quiet:
        yield None
        return
    with Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True) as progress:
        task = progress.add_task(description, total=None)

        def advance(step: int, total: int | None) -> None:
            progress.update(task, advance=step, total=total)

        yield advance


def _fmt_bytes(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def print_report(report: Report) -> None:
    table = Table(title="Layers", show_lines=False)
    for column in ("layer", "op", "weight shape", "N", "grouped along", "SQNR dB", "note"):
        table.add_column(column, overflow="fold")
    for layer in report.layers:
        sqnr = f"{layer.sqnr_db:.1f}" if layer.converted and math.isfinite(layer.sqnr_db) else ("exact" if layer.converted else "")
        status = "" if layer.converted else "[yellow]skipped[/yellow]: "
        table.add_row(layer.node, layer.op_type, "x".join(map(str, layer.shape)), str(layer.n or ""), layer.grouping, sqnr, status + layer.reason)
    out.print(table)
    summary = report.summary()
    totals = Table(title="Summary", show_header=False)
    totals.add_column("what")
    totals.add_column("value")
    worst = report.sqnr_worst
    rows = [
        ("settings", ", ".join(f"{k}={v}" for k, v in report.settings.items() if k != "source_sha256")),
        ("layers converted / skipped", f"{summary['layers_converted']} / {summary['layers_skipped']}"),
        ("parameters ternarized", f"{summary['params_converted']:,} of {summary['params_total']:,}"),
        ("weights", f"{_fmt_bytes(report.weight_bytes_before)} -> {_fmt_bytes(report.weight_bytes_after)}"),
        ("file size", f"{_fmt_bytes(report.file_bytes_before)} -> {_fmt_bytes(report.file_bytes_after)}" if report.file_bytes_after else "(not saved)"),
        ("multiplications eliminated", f"{100 * report.multiplications_eliminated:.1f}%"),
        ("weight SQNR mean / worst", f"{report.sqnr_mean_db:.1f} dB / {worst.sqnr_db:.1f} dB ({worst.node})" if worst else "-"),
    ]
    if report.calibration:
        rows.append(("calibration", ", ".join(f"{k}={v}" for k, v in report.calibration.items())))
    for row in rows:
        totals.add_row(*row)
    out.print(totals)
    for note in report.notes:
        out.print(f"note: {note}", highlight=False)


@command
def convert(
    model: Annotated[Path, typer.Argument(help="The fp32 ONNX model.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output path (default: MODEL with .fgq.onnx).")] = None,
    n: Annotated[int, typer.Option("--n", help="Group size: one scale per N weights along the reduction axis.")] = 4,
    method: Annotated[Method, typer.Option("--method", help="How codes and scales are chosen.")] = Method.EXACT,
    act_bits: Annotated[int, typer.Option("--act-bits", help="Activation bits: 8, 4, or 0 for float activations.")] = 8,
    calib: Annotated[Optional[Path], typer.Option("--calib", help="Calibration data: an image folder or an .npz keyed by input names.")] = None,
    calib_method: Annotated[CalibMethod, typer.Option("--calib-method", help="How activation ranges are chosen.")] = CalibMethod.MINMAX,
    percentile: Annotated[float, typer.Option("--percentile", help="Percentile of |x| kept, for --calib-method percentile.")] = 99.99,
    calib_batch_size: Annotated[int, typer.Option("--calib-batch-size", help="Samples per calibration batch (when the batch axis is dynamic).")] = 32,
    calib_limit: Annotated[Optional[int], typer.Option("--calib-limit", help="Use at most this many calibration samples.")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Keep matching node or weight names fp32 (a name or a regex; repeatable).")] = None,
    op_types: Annotated[str, typer.Option("--op-types", help="Comma-separated op types to ternarize.")] = "Conv,Gemm,MatMul",
    keep_first_last: Annotated[bool, typer.Option("--keep-first-last", help="Keep the first and last linear layers fp32.")] = False,
    weight_storage: Annotated[str, typer.Option("--weight-storage", help="int2 (opset 25, onnxruntime >= 1.24) or int8 (opset 21).")] = "int2",
    external_data: Annotated[Optional[bool], typer.Option("--external-data/--no-external-data", help="Weights in a side file (default: only over 2 GB).")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON here.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No report table or progress bar.")] = False,
    size: SizeOpt = None,
    resize: ResizeOpt = None,
    layout: LayoutOpt = None,
    color: ColorOpt = None,
    pixel_scale: ScaleOpt = 1.0 / 255.0,
    mean: MeanOpt = "0",
    std: StdOpt = "1",
):
    """Ternarize Conv/Gemm/MatMul weights in groups of N and quantize their activations."""
    output = output or model.with_name(model.name.removesuffix(".onnx") + ".fgq.onnx")
    model_io.check_output_path(output, [model])
    if json_path is not None:
        model_io.check_output_path(json_path, [model])
    config = pipeline.ConvertConfig(
        n=n, method=method, act_bits=act_bits, calib_method=calib_method, percentile=percentile,
        calib_batch_size=calib_batch_size, calib_limit=calib_limit, exclude=tuple(exclude or ()),
        op_types=tuple(t.strip() for t in op_types.split(",") if t.strip()), keep_first_last=keep_first_last,
        weight_storage=weight_storage, image=image_options(size, resize, layout, color, pixel_scale, mean, std),
    )
    with progress_bar("calibrating", quiet) as advance:
        result = pipeline.convert(model, config, calib=calib, on_progress=advance)
    pipeline.save(result.model, output, external_data=external_data, inputs=(model,))
    result.report.file_bytes_after = output.stat().st_size + sum(p.stat().st_size for p in [output.with_name(output.name + ".data")] if p.exists())
    if json_path is not None:
        json_path.write_text(result.report.to_json())
    if not quiet:
        print_report(result.report)
        out.print(f"wrote {output}", highlight=False)


@command
def ops_path():
    """Print the path of the onnxruntime custom-op library."""
    from fgq_onnx.runtime import library_path

    print(library_path())


def main() -> None:
    app(prog_name="fgq-onnx")


if __name__ == "__main__":
    sys.exit(main())

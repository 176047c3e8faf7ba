"""The fgq-onnx command line: thin commands over the library.

Errors the user can fix (FgqError) become one red line on stderr and exit
code 1; anything else one line and exit code 2; `--debug` shows tracebacks.
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from fgq_onnx import console, model_io, pipeline
from fgq_onnx.calibration import CalibMethod
from fgq_onnx.data import Color, ImageOptions, Layout
from fgq_onnx.errors import FgqError, fgq_error_in
from fgq_onnx.ternary import Method

app = typer.Typer(help="Fine-grained ternary (2-bit) quantization of ONNX models.", no_args_is_help=True, add_completion=False)
out, err = console.out, console.err


def _root_error(error: BaseException) -> BaseException:
    """The FgqError behind wrapped errors (onnx-ir wraps what a pass raises), else the error itself."""
    return fgq_error_in(error) or error


# Options shared by every command that reads images.
SizeOpt = Annotated[Optional[tuple[int, int]], typer.Option("--size", help="Image height and width after the centre crop (default: the model's input).")]
ResizeOpt = Annotated[Optional[int], typer.Option("--resize", help="Shorter image side before cropping (default: the crop's larger side).")]
LayoutOpt = Annotated[Optional[Layout], typer.Option("--layout", help="Input layout (default: inferred from the input shape).")]
ColorOpt = Annotated[Optional[Color], typer.Option("--color", help="Channel order (default: grey for 1 channel, rgb for 3).")]
ScaleOpt = Annotated[float, typer.Option("--pixel-scale", help="Pixel values are multiplied by this first.")]
MeanOpt = Annotated[str, typer.Option("--mean", help="Per-channel mean subtracted after scaling, comma separated.")]
StdOpt = Annotated[str, typer.Option("--std", help="Per-channel std divided by after the mean, comma separated.")]
_KEYWORD = inspect.Parameter.KEYWORD_ONLY
IMAGE_PARAMETERS = [
    inspect.Parameter("size", _KEYWORD, default=None, annotation=SizeOpt),
    inspect.Parameter("resize", _KEYWORD, default=None, annotation=ResizeOpt),
    inspect.Parameter("layout", _KEYWORD, default=None, annotation=LayoutOpt),
    inspect.Parameter("color", _KEYWORD, default=None, annotation=ColorOpt),
    inspect.Parameter("pixel_scale", _KEYWORD, default=1.0 / 255.0, annotation=ScaleOpt),
    inspect.Parameter("mean", _KEYWORD, default="0", annotation=MeanOpt),
    inspect.Parameter("std", _KEYWORD, default="1", annotation=StdOpt),
]


def command(function):
    """Register a command whose errors end in one line and a non-zero exit."""

    signature = inspect.signature(function, eval_str=True)
    reads_images = "image" in signature.parameters

    @functools.wraps(function)
    def wrapper(*args, debug: bool = False, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if reads_images:
                    kwargs["image"] = image_options(*(kwargs.pop(p.name) for p in IMAGE_PARAMETERS))
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
                    err.print(f"[red]error[/red]: {escape(str(root))}", markup=True, highlight=False, soft_wrap=True)
                    raise typer.Exit(1) from None
                err.print(f"[red]internal error[/red]: {type(root).__name__}: {escape(str(root).splitlines()[0]) if str(root) else ''} (rerun with --debug for the traceback)", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            finally:
                for warning in caught:
                    err.print(f"[yellow]warning[/yellow]: {escape(str(warning.message))}", highlight=False, soft_wrap=True)

    # Expose --debug on every command, and the image options on those that read
    # images, without re-declaring them in each.
    parameters = [p for p in signature.parameters.values() if p.name != "image"]
    if reads_images:
        parameters += IMAGE_PARAMETERS
    debug_param = inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[bool, typer.Option("--debug", help="Show tracebacks.")])
    wrapper.__signature__ = signature.replace(parameters=[*parameters, debug_param])
    return app.command()(wrapper)


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


def _group_size(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise FgqError(f"--n takes a whole number or 'auto', got '{text}'") from None


@command
def convert(
    model: Annotated[Path, typer.Argument(help="The fp32 ONNX model.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output path (default: MODEL with .fgq.onnx).")] = None,
    n: Annotated[str, typer.Option("--n", help="Group size: one scale per N weights along the reduction axis; 'auto': one per layer, under --max-drop.")] = "4",
    min_sqnr: Annotated[Optional[float], typer.Option("--min-sqnr", help="With --n auto, instead of --max-drop: the least SQNR (dB) of the output against the source model on held-out calibration samples.")] = None,
    sqnr_output: Annotated[Optional[str], typer.Option("--sqnr-output", help="The output that fidelity and --min-sqnr are about (default: the first).")] = None,
    max_drop: Annotated[Optional[float], typer.Option("--max-drop", help="With --n auto: points of top-1 the model may lose on --data (without --data: % of calibration samples whose top-1 changes).")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="With --n auto: labelled data the budget is measured on (keep it apart from the test set).")] = None,
    method: Annotated[Method, typer.Option("--method", help="How codes and scales are chosen.")] = Method.EXACT,
    act_bits: Annotated[int, typer.Option("--act-bits", help="Activation bits: 8, 4, or 0 for float activations.")] = 8,
    calib: Annotated[Optional[Path], typer.Option("--calib", help="Calibration data: an image folder or an .npz keyed by input names.")] = None,
    calib_method: Annotated[CalibMethod, typer.Option("--calib-method", help="How activation ranges are chosen.")] = CalibMethod.MINMAX,
    percentile: Annotated[float, typer.Option("--percentile", help="Percentile of |x| kept, for --calib-method percentile.")] = 99.99,
    calib_batch_size: Annotated[int, typer.Option("--calib-batch-size", help="Samples per calibration batch (when the batch axis is dynamic).")] = 8,
    calib_limit: Annotated[Optional[int], typer.Option("--calib-limit", help="Use at most this many calibration samples.")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Keep matching node or weight names fp32 (a name or a regex; repeatable).")] = None,
    op_types: Annotated[str, typer.Option("--op-types", help="Comma-separated op types to ternarize.")] = "Conv,Gemm,MatMul",
    keep_first_last: Annotated[bool, typer.Option("--keep-first-last", help="Keep the first and last linear layers fp32.")] = False,
    ternarize_float_layers: Annotated[bool, typer.Option("--ternarize-float-layers", help="In a model trained ternary (some weights already ternary), ternarize its float layers too.")] = False,
    keep_quantized_weights: Annotated[bool, typer.Option("--keep-quantized-weights", help="Leave integer-coded weights (DequantizeLinear, Cast*Mul) as they are instead of ternarizing their decoded values.")] = False,
    float_embeddings: Annotated[bool, typer.Option("--float-embeddings", help="Keep constant embedding tables read by Gather float32 (default: int8 rows with a scale per row).")] = False,
    float_between_layers: Annotated[bool, typer.Option("--float-between-layers", help="Keep float32 NCHW activations between TernaryConv layers (default: NHWC where every consumer is a TernaryConv, as 8-bit levels where they quantize it alike; a residual then reads the same levels).")] = False,
    weight_storage: Annotated[str, typer.Option("--weight-storage", help="int2 (opset 25, onnxruntime >= 1.24) or int8 (opset 21).")] = "int2",
    scale_format: Annotated[str, typer.Option("--scale-format", help="Group scales: f32, f16, or u8 (8-bit codes under one float32 scale per output row).")] = pipeline.ConvertConfig.scale_format,
    output_format: Annotated[pipeline.OutputFormat, typer.Option("--format", help="qdq: standard ONNX; custom: com.fgq ops for the fgq custom-op library (runs without it, slower).")] = pipeline.ConvertConfig.format,
    bias_correction: Annotated[bool, typer.Option("--bias-correction/--no-bias-correction", help="Match each converted layer's per-channel output mean and std to fp32 on the calibration data (needs --calib).")] = True,
    refine_samples: Annotated[int, typer.Option("--refine-samples", help="Calibration samples that bias correction and fitting use (memory grows with it).")] = pipeline.ConvertConfig.refine_samples,
    input_weighting: Annotated[bool, typer.Option("--input-weighting", help="Weigh each weight's error by the mean square of its input channel on the calibration data (needs --calib; docs/fidelity.md).")] = False,
    external_data: Annotated[Optional[bool], typer.Option("--external-data/--no-external-data", help="Weights in a side file (default: only over 2 GB).")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON here.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No report table or progress bar.")] = False,
    image: ImageOptions = ImageOptions(),  # replaced by the shared image options (see `command`)
):
    """Ternarize Conv/Gemm/MatMul weights in groups of N and quantize their activations."""
    output = output or model.with_name(model.name.removesuffix(".onnx") + ".fgq.onnx")
    sources = [model, *(p for p in (calib, data) if p is not None)]
    model_io.check_output_path(output, sources)
    if json_path is not None:
        model_io.check_output_path(json_path, sources)
        if json_path.resolve() == output.resolve():
            raise FgqError(f"--json '{json_path}' is also the output model's path; choose another")
    config = pipeline.ConvertConfig(
        n=_group_size(n), max_drop=max_drop, min_sqnr=min_sqnr, fidelity_output=sqnr_output, method=method, act_bits=act_bits, calib_method=calib_method, percentile=percentile,
        calib_batch_size=calib_batch_size, calib_limit=calib_limit, exclude=tuple(exclude or ()),
        op_types=tuple(t.strip() for t in op_types.split(",") if t.strip()), keep_first_last=keep_first_last,
        ternarize_float_layers=ternarize_float_layers, keep_quantized_weights=keep_quantized_weights, float_embeddings=float_embeddings,
        float_between_layers=float_between_layers,
        weight_storage=weight_storage, scale_format=scale_format, format=output_format, image=image,
        bias_correction=bias_correction, refine_samples=refine_samples, input_weighting=input_weighting,
    )
    with console.progress_bar("calibrating", quiet or config.n == "auto") as advance, console.search_progress(quiet or config.n != "auto") as on_search:
        result = pipeline.convert(model, config, calib=calib, on_progress=advance, data=data, on_search=on_search)
    pipeline.save(result.model, output, external_data=external_data, inputs=(model,))
    result.report.file_bytes_after = output.stat().st_size + sum(p.stat().st_size for p in [output.with_name(output.name + ".data")] if p.exists())
    if json_path is not None:
        json_path.write_text(result.report.to_json())
    if not quiet:
        console.print_report(result.report)
        if result.report.search:
            console.print_search(result.report.search)
        out.print(f"wrote {output}", highlight=False)
    worst = result.report.sqnr_worst
    warning = result.report.fidelity.warning(result.report.settings, worst.node if worst else "")
    if warning:
        err.print(f"[yellow]warning[/yellow]: {escape(warning)}", highlight=False, soft_wrap=True)


@command
def ops_path():
    """Print the path of the onnxruntime custom-op library."""
    from fgq_onnx.runtime import library_path

    print(library_path())


# -- checking the result: eval, compare, sweep, view ---------------------------

DataOpt = Annotated[Path, typer.Option("--data", help="Labelled data: an image folder with one sub-folder per class (sorted names are the labels) or an .npz with the input(s) and 'y'.")]


@command
def eval(  # noqa: A001 - the command is called eval
    model: Annotated[Path, typer.Argument(help="The ONNX model (fp32 or converted).")],
    data: DataOpt,
    output_name: Annotated[Optional[str], typer.Option("--output-name", help="The output holding class scores (default: the first).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per batch (when the batch axis is dynamic).")] = 64,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Evaluate at most this many samples.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object (top1, top5, n, ...) instead of the table.")] = False,
    csv_out: Annotated[bool, typer.Option("--csv", help="Print CSV (a header and one row: top1, top5, n, ...) instead of the table.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    image: ImageOptions = ImageOptions(),  # replaced by the shared image options (see `command`)
):
    """Top-1 and top-5 accuracy on labelled data."""
    from fgq_onnx.evaluate import evaluate

    if json_out and csv_out:
        raise FgqError("choose one of --json and --csv")
    if limit is not None and limit < 1:
        raise FgqError(f"--limit must be at least 1, got {limit}")
    with console.progress_bar("evaluating", quiet or json_out or csv_out) as advance:
        result = evaluate(model, data, options=image, batch_size=batch_size, limit=limit, output=output_name, on_progress=advance)
    if json_out:
        console.print_json(result.to_dict())
        return
    if csv_out:
        console.print_csv([result.to_dict()])
        return
    table = Table(title=f"Accuracy of {model.name}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("top-1", f"{console.pct(result.top1)} ({result.correct1:,} of {result.n:,})")
    table.add_row(f"top-{result.k}", f"{console.pct(result.top5)} ({result.correct5:,} of {result.n:,})")
    table.add_row("classes", f"{result.classes} (output '{escape(result.output)}')")
    if result.skipped:
        table.add_row("unreadable images skipped", str(result.skipped))
    if result.dropped:
        table.add_row("left out for the fixed batch size", str(result.dropped))
    table.add_row("time", f"{result.seconds:.1f} s")
    out.print(table)


@command
def compare(
    reference: Annotated[Path, typer.Argument(help="The reference model (usually the fp32 original).")],
    candidate: Annotated[Path, typer.Argument(help="The model to check (usually the converted one).")],
    data: Annotated[Path, typer.Option("--data", help="Inputs: an image folder or an .npz keyed by input names (labels not needed).")],
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per batch (when the batch axis is dynamic).")] = 32,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Compare on at most this many samples.")] = None,
    layers: Annotated[bool, typer.Option("--layers/--no-layers", help="Also compare the outputs of the ternarized layers.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the tables.")] = False,
    csv_out: Annotated[bool, typer.Option("--csv", help="Print CSV (one row per output and per layer) instead of the tables.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    image: ImageOptions = ImageOptions(),  # replaced by the shared image options (see `command`)
):
    """How far CANDIDATE's outputs and ternarized layers drift from REFERENCE's (SQNR worst first)."""
    from fgq_onnx.compare import compare as run_compare

    if json_out and csv_out:
        raise FgqError("choose one of --json and --csv")
    if limit is not None and limit < 1:
        raise FgqError(f"--limit must be at least 1, got {limit}")
    with console.progress_bar("comparing", quiet or json_out or csv_out) as advance:
        result = run_compare(reference, candidate, data, options=image, batch_size=batch_size, limit=limit, layers=layers, on_progress=advance)
    if json_out:
        console.print_json(result.to_dict())
        return
    if csv_out:
        sys.stdout.write(result.to_csv())
        return
    outputs = Table(title=f"Outputs over {result.n:,} samples")
    for column in ("output", "top-1 agreement", "max |diff|", "mean |diff|", "cosine", "KL(softmax)", "SQNR dB"):
        outputs.add_column(column, overflow="fold")
    for row in result.outputs:
        outputs.add_row(escape(row.name), console.pct(row.top1_agreement), console.num(row.max_abs_diff), console.num(row.mean_abs_diff), console.num(row.cosine, 6), console.num(row.kl), console.num(row.sqnr_db, 3))
    out.print(outputs)
    if layers:
        settings = sorted({row.setting for row in result.layers})
        table = Table(title="Ternarized layers, worst SQNR first" + (f" ({escape(settings[0])})" if len(settings) == 1 else ""))
        columns = ("node", "op", *(("setting",) if len(settings) > 1 else ()), "SQNR dB", "max |diff|", "cosine")
        for column in columns:
            table.add_column(column, overflow="fold", justify="left" if column in ("node", "op", "setting") else "right")
        for row in result.layers:
            cells = (escape(row.node or row.name), row.op_type, *((escape(row.setting),) if len(settings) > 1 else ()), console.num(row.sqnr_db, 3), console.num(row.max_abs_diff), console.num(row.cosine, 6))
            table.add_row(*cells)
        out.print(table)
        if not result.layers and not result.unmatched:
            out.print("note: the candidate has no ternarized layers (no node carries 'fgq.ternary')", highlight=False)
    for name in result.unmatched:
        out.print(f"note: ternarized tensor '{escape(name)}' has no counterpart of the same name and shape in the reference", highlight=False)
    if result.skipped:
        out.print(f"note: skipped {result.skipped} unreadable image(s)", highlight=False)


@command
def sweep(
    model: Annotated[Path, typer.Argument(help="The fp32 ONNX model.")],
    data: DataOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for sweep.csv and sweep.png (created if missing).")],
    calib: Annotated[Optional[Path], typer.Option("--calib", help="Calibration data: an image folder or an .npz keyed by input names.")] = None,
    n: Annotated[Optional[list[int]], typer.Option("--n", help="Group sizes to try (repeatable; default 4 8 16 32 64).")] = None,
    act_bits: Annotated[Optional[list[int]], typer.Option("--act-bits", help="Activation widths to try: 8, 4, 0 (repeatable; default 8 4).")] = None,
    method: Annotated[Optional[list[Method]], typer.Option("--method", help="Ternarization methods to try (repeatable; default exact twn).")] = None,
    calib_method: Annotated[CalibMethod, typer.Option("--calib-method", help="How activation ranges are chosen.")] = CalibMethod.MINMAX,
    percentile: Annotated[float, typer.Option("--percentile", help="Percentile of |x| kept, for --calib-method percentile.")] = 99.99,
    calib_limit: Annotated[Optional[int], typer.Option("--calib-limit", help="Use at most this many calibration samples.")] = None,
    bias_correction: Annotated[bool, typer.Option("--bias-correction/--no-bias-correction", help="Match each converted layer's per-channel output mean and std to fp32 on the calibration data.")] = True,
    scale_format: Annotated[str, typer.Option("--scale-format", help="Group scales: f32, f16, or u8.")] = pipeline.ConvertConfig.scale_format,
    recalibrate: Annotated[bool, typer.Option("--recalibrate", help="Calibrate every setting on its converted model (slower) instead of reusing fp32 statistics.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per evaluation batch.")] = 64,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Evaluate on at most this many samples.")] = None,
    keep_models: Annotated[bool, typer.Option("--keep-models", help="Keep the converted models in OUTPUT/models.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
    csv_out: Annotated[bool, typer.Option("--csv", help="Print OUTPUT/sweep.csv (fp32 first, then one row per setting) instead of the table.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No table or progress bar.")] = False,
    image: ImageOptions = ImageOptions(),  # replaced by the shared image options (see `command`)
):
    """Top-1, size and multiplications eliminated for every N x activation width x method."""
    from fgq_onnx.sweep import sweep as run_sweep

    if json_out and csv_out:
        raise FgqError("choose one of --json and --csv")
    if limit is not None and limit < 1:
        raise FgqError(f"--limit must be at least 1, got {limit}")
    config = pipeline.ConvertConfig(
        calib_method=calib_method, percentile=percentile, calib_limit=calib_limit, bias_correction=bias_correction,
        scale_format=scale_format, image=image,
    )
    with console.progress_bar("sweeping", quiet or json_out or csv_out) as advance:
        result = run_sweep(
            model, calib, data, ns=n or (4, 8, 16, 32, 64), act_bits=act_bits or (8, 4), methods=method or (Method.EXACT, Method.TWN),
            config=config, out_dir=output, keep_models=keep_models, eval_batch_size=batch_size, eval_limit=limit,
            recalibrate=recalibrate, on_progress=advance,
        )
    if json_out:
        console.print_json(result.to_dict())
        return
    if csv_out:
        sys.stdout.write(Path(result.csv_path).read_text())
        return
    if quiet:
        return
    table = Table(title=f"Sweep of {model.name} on {result.fp32.samples:,} samples")
    for column in ("N", "method", "act", "top-1", "top-5", "Δ top-1", "size", "mults cut", "SQNR"):
        table.add_column(column, justify="left" if column in ("method", "act") else "right", no_wrap=True)
    reference = result.fp32

    def kb(count: int) -> str:
        return f"{count / 1024:.0f} KB"

    table.add_row("-", "fp32", "fp32", console.pct(reference.top1), f"{100 * reference.top5:.1f}%", "", kb(reference.file_bytes), "0%", "")
    for row in result.rows:
        table.add_row(
            str(row.n), row.method, "float" if not row.act_bits else f"int{row.act_bits}", console.pct(row.top1), f"{100 * row.top5:.1f}%",
            f"{100 * (row.top1 - reference.top1):+.2f}", kb(row.file_bytes), f"{100 * row.multiplications_eliminated:.1f}%", console.num(row.sqnr_mean_db, 3),
        )
    out.print("size: the saved model file; mults cut: share of Conv/Gemm/MatMul multiplications eliminated; SQNR: mean weight SQNR (dB) of the ternarized layers", highlight=False)
    out.print(table)
    if result.recalibrated:
        out.print(f"calibration: {result.calibrations} run(s), one per setting (--recalibrate)", highlight=False)
    elif result.calibrations:
        out.print(
            f"calibration: collected once on the fp32 model in {result.calibration_seconds:.1f} s and reused by {result.settings_calibrated} setting(s); "
            f"a conversion took {result.reusing_convert_seconds:.1f} s with it and {result.plain_convert_seconds:.1f} s calibrating itself, "
            f"so about {result.time_saved_seconds:.1f} s saved in all",
            highlight=False,
        )
    out.print(f"wrote {escape(result.csv_path)} and {escape(result.plot_path)}", highlight=False)


@command
def view(
    model: Annotated[Path, typer.Argument(help="The ONNX model to look at.")],
    port: Annotated[int, typer.Option("--port", help="Port on localhost (0: a free one).")] = 0,
    host: Annotated[str, typer.Option("--host", help="Address to serve on.")] = "localhost",
    browser: Annotated[bool, typer.Option("--browser/--no-browser", help="Open a web browser (--no-browser prints the URL only).")] = True,
    screenshot: Annotated[Optional[Path], typer.Option("--screenshot", help="Render headless with chromium to this PNG and exit instead of serving.")] = None,
    window: Annotated[tuple[int, int], typer.Option("--window", help="Screenshot width and height in pixels.")] = (1400, 1000),
):
    """Show the model in Netron, served on localhost until Ctrl-C."""
    from fgq_onnx import view as viewer

    if screenshot is not None:
        model_io.check_output_path(screenshot, [model])
        dom = viewer.render(model, screenshot=screenshot, window=window)
        out.print(f"wrote {escape(str(screenshot))} ({len(viewer.rendered_node_names(dom))} nodes drawn)", highlight=False)
        return
    if not 0 <= port <= 65535:
        raise FgqError(f"--port must be in 0..65535, got {port}")
    served = viewer.serve(model, host=host, port=port, browse=browser)
    out.print(f"serving {escape(str(model))} at {served.url} (Ctrl-C to stop)", highlight=False, soft_wrap=True)
    try:
        served.wait()
    except KeyboardInterrupt:  # the normal way to stop: not an error
        out.print("stopped", highlight=False)


def main() -> None:
    app(prog_name="fgq-onnx")


if __name__ == "__main__":
    sys.exit(main())

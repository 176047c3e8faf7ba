"""What the command line prints: progress bars, the conversion report, the search table.

Results go to stdout (`out`), progress and errors to stderr (`err`), so that
`--json` output stays clean when piped. Into a terminal, tables fit its width;
into a pipe or a file (logs, `| tee`, `| grep`), nothing is wrapped: every row
stays one line with full layer names.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import sys

from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fgq_onnx.report import Report

UNWRAPPED_WIDTH = 10_000  # the width of a pipe or a file: wider than any row we print


class _Console(Console):
    """rich's Console, sized by the terminal when it writes to one, and never wrapping otherwise (rich assumes 80 columns)."""

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        return size if self.is_terminal else ConsoleDimensions(UNWRAPPED_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


out = _Console()
err = _Console(stderr=True)


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


@contextlib.contextmanager
def search_progress(quiet: bool):
    """Progress bars for the --n auto search; yields a callback(phase, advance, total), one bar per phase."""
    if quiet:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True) as progress:
        tasks: dict[str, int] = {}

        def advance(phase: str, step: int, total: int | None) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task({"sensitivity": "layer sensitivity (layer x N)", "verifying": "converting and measuring plans"}.get(phase, phase), total=total)
            progress.update(tasks[phase], advance=step, total=total)

        yield advance


def print_search(search: dict) -> None:
    """The --n auto search: the plans measured along the path and the one chosen."""
    table = Table(title=f"Group sizes chosen under {search['budget']} ({escape(search['measure'])})")
    for column in ("plan", "weights", "drop (points)" if search["budget"].startswith("--max-drop") else "dB short", "within budget"):
        table.add_column(column, justify="left" if column == "plan" else "right")
    for trial in sorted(search["trials"], key=lambda t: -t["weight_bytes"]):
        table.add_row(trial["summary"], fmt_bytes(trial["weight_bytes"]), f"{trial['drop_points']:.2f}", "yes" if trial["within_budget"] else "no")
    out.print(table)
    out.print(
        f"chosen: {search['plan_summary']}, {fmt_bytes(search['weight_bytes'])} of codes and scales "
        f"(N={search['smallest_n']} everywhere: {fmt_bytes(search['uniform_smallest_n_bytes'])}), "
        f"measured {_measured(search)}; the N of each layer is in the table above",
        highlight=False,
    )


def _measured(search: dict) -> str:
    value = search["drop_points"]
    return f"drop {value:.2f} points" if search["budget"].startswith("--max-drop") else f"SQNR {value:.2f} dB short of the budget (negative: above it)"


def fmt_bytes(count: int) -> str:
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
        ("weights", f"{fmt_bytes(report.weight_bytes_before)} -> {fmt_bytes(report.weight_bytes_after)}"),
        ("file size", f"{fmt_bytes(report.file_bytes_before)} -> {fmt_bytes(report.file_bytes_after)}" if report.file_bytes_after else "(not saved)"),
        ("multiplications eliminated", f"{100 * report.multiplications_eliminated:.1f}%"),
        ("bits per ternarized weight", f"{report.bits_per_weight:.2f} (codes + scales)"),
        ("weight SQNR mean / worst", f"{_db(report.sqnr_mean_db)} / {_db(worst.sqnr_db)} ({worst.node})" if worst else "-"),
    ]
    if report.calibration:
        rows.append(("calibration", ", ".join(f"{k}={v}" for k, v in report.calibration.items())))
    rows += _fidelity_rows(report)
    for row in rows:
        totals.add_row(*row)
    out.print(totals)
    for note in report.notes:
        out.print(f"note: {escape(note)}", highlight=False)


def _fidelity_rows(report: Report) -> list[tuple[str, str]]:
    """One row per output: the converted model against the source on held-out samples."""
    fidelity = report.fidelity
    if fidelity.skipped:
        return [("fidelity", f"not measured: {fidelity.skipped}")]
    rows = []
    for result in fidelity.outputs:
        agreement = f", top-1 agreement {100 * result.top1_agreement:.1f}%" if result.top1_agreement is not None else ""
        rows.append((f"fidelity of '{result.output}'", f"SQNR {_db(result.sqnr_db)}, cosine {result.cosine:.4f}{agreement} ({fidelity.samples} held-out samples)"))
    return rows


def print_json(payload: dict) -> None:
    print(json.dumps(payload, indent=2))


def print_csv(rows: list[dict[str, object]]) -> None:
    """Rows as CSV on stdout, a header of the first row's keys first."""
    writer = csv.DictWriter(sys.stdout, list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def num(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "exact" if value > 0 else "-inf"
    return f"{value:.{digits}g}"


def _db(value: float) -> str:
    return f"{value:.1f} dB" if math.isfinite(value) else "exact"

"""Output for scripts and logs: no wrapping into a pipe or a file, --json and --csv where a table is the result."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from rich.table import Table

from fgq_onnx import console

LONG = "backbone/stage_{}/residual_block_with_a_descriptive_and_rather_long_name/convolution_{}"  # ~85 characters


@pytest.fixture
def long_named_cnn(kit, tmp_path):
    model = kit.build_cnn()
    layers = [node for node in model.graph.node if node.op_type in ("Conv", "Gemm", "MatMul")]
    for i, node in enumerate(layers):
        node.name = LONG.format(i, i)
    return kit.write_model(model, tmp_path / "long_names.onnx"), [node.name for node in layers]


def test_piped_convert_prints_every_layer_name_whole_on_one_line(cli, long_named_cnn, tmp_path):
    path, names = long_named_cnn
    run = cli("convert", path, "--act-bits", "0", "-o", tmp_path / "out.onnx")  # CliRunner's stdout is not a terminal
    assert run.exit_code == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith("│ backbone/")]
    assert [row.split("│")[1].strip() for row in rows] == names
    assert max(len(line) for line in run.stdout.splitlines()) > 80  # wider than rich's default for a pipe


def test_a_terminal_still_gets_tables_that_fit_its_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    screen = console._Console(file=io.StringIO(), force_terminal=True, color_system=None)
    table = Table("layer", "note")
    table.add_row(LONG.format(0, 0), "a note long enough to need wrapping in eighty columns, together with the name")
    screen.print(table)
    lines = screen.file.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80 and len(lines) > 5


@pytest.fixture
def labelled(kit, cnn_path, cnn_samples, tmp_path):
    path = tmp_path / "labelled.npz"
    np.savez(path, x=cnn_samples, y=np.arange(len(cnn_samples)) % 10)
    return path


def test_eval_csv_is_the_json_as_one_row(cli, cnn_path, labelled):
    as_json = json.loads(cli("eval", cnn_path, "--data", labelled, "--json").stdout)
    run = cli("eval", cnn_path, "--data", labelled, "--csv")
    assert run.exit_code == 0, run.stderr
    (row,) = list(csv.DictReader(io.StringIO(run.stdout)))
    assert list(row) == list(as_json)
    assert float(row["top1"]) == pytest.approx(as_json["top1"]) and int(row["n"]) == as_json["n"] == 24


def test_sweep_csv_prints_the_table_it_writes(cli, cnn_path, calib_npz, labelled, tmp_path):
    run = cli("sweep", cnn_path, "--calib", calib_npz, "--data", labelled, "--n", "4", "--n", "8", "--act-bits", "0",
              "--method", "exact", "-o", tmp_path / "out", "--csv")
    assert run.exit_code == 0, run.stderr
    assert run.stdout == (tmp_path / "out" / "sweep.csv").read_text()
    rows = list(csv.DictReader(io.StringIO(run.stdout)))
    assert [row["method"] for row in rows] == ["fp32", "exact", "exact"] and [row["n"] for row in rows][1:] == ["4", "8"]


@pytest.mark.parametrize("command", ["eval", "sweep"])
def test_json_and_csv_together_are_refused(cli, cnn_path, labelled, tmp_path, command):
    extra = ["-o", tmp_path / "out"] if command == "sweep" else []
    run = cli(command, cnn_path, "--data", labelled, "--json", "--csv", *extra)
    assert run.exit_code == 1 and "choose one of --json and --csv" in run.stderr

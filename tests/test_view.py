"""`fgq-onnx view`: Netron serves the model; headless Chromium shows that the graph really renders."""

import re
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from fgq_onnx import view
from fgq_onnx.errors import FgqError

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (/usr/bin/chromium; CI installs it with apt-get install -y chromium)")


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def test_serve_gives_netron_the_model(converted):
    with view.serve(converted, host="127.0.0.1", port=0, browse=False) as served:
        assert served.alive and served.url.startswith("http://127.0.0.1:")
        page = fetch(served.url).decode()
        assert f'<meta name="file" content="/data/{converted.name}">' in page
        assert fetch(served.url + f"data/{converted.name}") == converted.read_bytes()
    assert not served.alive


def test_cli_no_browser_prints_the_url(cli, converted, monkeypatch):
    seen = []

    def wait(self):  # instead of blocking until Ctrl-C
        seen.append(fetch(self.url))
        self.stop()

    monkeypatch.setattr(view.Served, "wait", wait)
    monkeypatch.setattr("webbrowser.open", lambda *a, **k: pytest.fail("--no-browser opened a browser"))
    run = cli("view", converted, "--no-browser")
    assert run.exit_code == 0, run.output
    assert re.search(r"serving .*cnn\.fgq\.onnx at http://localhost:\d+/", run.stdout), run.stdout
    assert seen and b"netron" in seen[0].lower()


def test_bad_model_and_missing_netron(cli, tmp_path, monkeypatch, converted):
    run = cli("view", tmp_path / "missing.onnx", "--no-browser")
    assert run.exit_code == 1 and run.stderr.count("\n") == 1 and "does not exist" in run.stderr
    monkeypatch.setitem(__import__("sys").modules, "netron", None)
    with pytest.raises(FgqError, match="pip install netron"):
        view.serve(converted, browse=False)


def test_render_without_a_browser_is_a_clear_error(converted, monkeypatch):
    monkeypatch.setattr(view, "find_chromium", lambda: None)
    with pytest.raises(FgqError, match="install chromium"):
        view.render(converted)


@needs_chromium
def test_headless_chromium_renders_the_ternary_graph(converted, tmp_path, cli):
    dom = view.render(converted, screenshot=tmp_path / "shot.png", window=(900, 700), chromium=str(CHROMIUM))
    names = view.rendered_node_names(dom)
    # the blocked DequantizeLinear nodes that decode each ternary weight, drawn by Netron
    for node in ("conv1", "conv2", "fc1", "fc2"):
        assert f"{node}/dequantize_weight" in names, names
    assert "DequantizeLinear" in dom
    with Image.open(tmp_path / "shot.png") as image:
        assert image.size == (900, 700)
        assert len(image.convert("L").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20  # not a blank page
    run = cli("view", converted, "--screenshot", tmp_path / "cli.png", "--window", "800", "600")
    assert run.exit_code == 0, run.output
    assert (tmp_path / "cli.png").is_file() and "nodes drawn" in run.stdout


def test_ctrl_c_stops_serving_without_an_error(cli, converted, monkeypatch):
    served = []

    def wait(self):
        served.append(self)
        self.stop()
        raise KeyboardInterrupt

    monkeypatch.setattr(view.Served, "wait", wait)
    run = cli("view", converted, "--no-browser", "--port", "0")
    assert run.exit_code == 0, run.output
    assert "stopped" in run.stdout and not served[0].alive

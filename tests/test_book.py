"""The built book, checked in a real (headless Debian) Chromium with no internet access.

The book is built with the README's flags (warnings are errors) into a temporary folder and
served on 127.0.0.1. A small check page loads each book page in an iframe, waits for MathJax
to finish typesetting, and reports what a reader would see: whether every math block was
typeset (no raw TeX left, no MathJax errors), whether every figure of a notebook's outputs
loaded, and whether saved ipywidgets rendered. Screenshots go next to the built HTML.

Chromium comes from Debian (setup.sh installs it when run as root). Without it these tests
are skipped, except under CI (env CI set), where they fail.
Set MINIDIFF_BOOK_TEST_OUT=DIR to keep the build and the screenshots in DIR.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = {
    "intro": "book/intro.html",
    "notation": "book/notation.html",
    "chapter 1": "notebooks/01_ddpm.html",
    "chapter 2": "notebooks/02_ddim.html",
    "chapter 3": "notebooks/03_probability_flow.html",
    "chapter 4": "notebooks/04_ddgan.html",
    "chapter 5": "notebooks/05_progressive_distillation.html",
    "chapter 6": "notebooks/06_guidance.html",
    "chapter 7": "notebooks/07_patching.html",
    "chapter 8": "notebooks/08_patch_dm.html",
}
SCREENSHOTS = {"intro": "book/intro.html", "chapter 1": "notebooks/01_ddpm.html",
               "chapter 2": "notebooks/02_ddim.html"}
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Headless flags for a machine with no network: no background traffic, a fresh profile.
# --no-sandbox is needed when running as root (containers, CI).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-quic",
    "--no-first-run",
    "--hide-scrollbars",
)
VIRTUAL_TIME_MS = 30000  # virtual time: MathJax and the widget manager finish long before

pytestmark = pytest.mark.slow

CHECK_PAGE = r"""<!doctype html>
<html><head><meta charset="utf-8"><title>browser check</title></head>
<body>
<pre id="report">pending</pre>
<iframe id="page" style="width:1280px;height:1600px;border:0"></iframe>
<script>
const target = new URLSearchParams(location.search).get("page");
const frame = document.getElementById("page");
const report = document.getElementById("report");

function inspect(doc, note) {
  const math = Array.from(doc.querySelectorAll(".math"));
  const untypeset = math.filter(el => !el.querySelector("mjx-container"))
                        .map(el => el.textContent.trim().slice(0, 80));
  // Visible prose with code, scripts and typeset math removed: no TeX may be left in it.
  const prose = doc.querySelector("main") ? doc.querySelector("main").cloneNode(true)
                                          : doc.body.cloneNode(true);
  prose.querySelectorAll("pre, code, script, style, mjx-container, .highlight").forEach(e => e.remove());
  const text = prose.textContent;
  const rawTex = ["$$", "\\(", "\\[", "\\begin{", "\\frac"].filter(s => text.includes(s));
  // Display equations wider than the text column are cut off (or scroll) for the reader.
  const tooWide = Array.from(doc.querySelectorAll("div.math"))
      .filter(el => Array.from(el.querySelectorAll("mjx-container"))
                         .some(c => c.scrollWidth > c.clientWidth + 2))
      .map(el => (el.id || "") + " " + el.textContent.trim().slice(0, 60));
  const figures = Array.from(doc.querySelectorAll(".cell_output img"));
  const widgetViews = doc.querySelectorAll(
      'script[type="application/vnd.jupyter.widget-view+json"]').length;
  return {
    note: note,
    title: doc.title,
    mathjax_version: (frame.contentWindow.MathJax || {}).version || null,
    math_elements: math.length,
    mjx_containers: doc.querySelectorAll("mjx-container").length,
    untypeset: untypeset,
    mathjax_errors: doc.querySelectorAll("mjx-merror").length,
    mathjax_error_texts: Array.from(doc.querySelectorAll("mjx-merror")).map(
        e => (e.getAttribute("data-mjx-error") || e.textContent) + " in: "
             + (e.closest("p, li, td, div") || e).textContent.slice(0, 160)).slice(0, 5),
    raw_tex_in_prose: rawTex,
    too_wide: tooWide,
    figures: figures.map(img => ({src: img.getAttribute("src"), complete: img.complete,
                                  width: img.naturalWidth, height: img.naturalHeight})),
    images: Array.from(doc.querySelectorAll("img")).map(img => ({src: img.getAttribute("src"),
                       complete: img.complete, width: img.naturalWidth})),
    widget_views: widgetViews,
    widgets_rendered: doc.querySelectorAll(".jupyter-widgets").length,
  };
}

function finish(note) {
  let result;
  try { result = inspect(frame.contentDocument, note); }
  catch (e) { result = {error: String(e)}; }
  report.textContent = JSON.stringify(result);
}

frame.onload = () => {
  const win = frame.contentWindow;
  const started = Date.now();
  (function poll() {
    const mj = win.MathJax;
    if (mj && mj.startup && mj.startup.promise) {
      // Typesetting done; give the widget manager (loaded by require.js) a moment too.
      mj.startup.promise.then(() => setTimeout(() => finish("typeset"), 3000),
                              err => finish("MathJax failed: " + err));
    } else if (Date.now() - started < 15000) {
      setTimeout(poll, 100);
    } else {
      finish("MathJax never started");
    }
  })();
};
frame.src = target;
</script>
</body></html>
"""


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    exe = find_chromium()
    if exe is None:
        message = "no Chromium on PATH (bash setup.sh installs Debian's chromium when run as root)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(message + "; CI is set, so the browser check may not be skipped")
        pytest.skip(message)
    return exe


def build_book(source: Path, output: Path) -> Path:
    """Build the book at `source` into `output`/_build/html with warnings as errors."""
    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    command = [
        str(jupyter_book) if jupyter_book.exists() else "jupyter-book",
        "build",
        "--warningiserror",
        "--keep-going",
        "--path-output",
        str(output),
        str(source),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    log = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, f"jupyter-book build failed:\n{log}"
    html = output / "_build" / "html"
    assert (html / "index.html").is_file(), f"no index.html under {html}:\n{log}"
    return html


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture(scope="session")
def serve():
    """serve(folder) -> base URL of a local HTTP server (127.0.0.1) for that folder."""
    servers = []

    def start(folder: Path) -> str:
        handler = functools.partial(QuietHandler, directory=str(folder))
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="session")
def book(tmp_path_factory, serve):
    """(html folder, base URL) of the whole book, built from the working tree."""
    keep = os.environ.get("MINIDIFF_BOOK_TEST_OUT")
    output = Path(keep).resolve() if keep else tmp_path_factory.mktemp("book")
    html = build_book(ROOT, output)
    (html / "_browser_check.html").write_text(CHECK_PAGE)
    return html, serve(html)


def run_chromium(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    profile.mkdir(parents=True, exist_ok=True)
    command = [
        chromium,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        f"--virtual-time-budget={VIRTUAL_TIME_MS}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def browser_report(chromium: str, base_url: str, page: str, profile: Path) -> dict:
    """Open the check page in Chromium (--dump-dom) and return its JSON report for `page`."""
    proc = run_chromium(chromium, profile, "--dump-dom", f"{base_url}/_browser_check.html?page=/{page}")
    from html.parser import HTMLParser

    class ReportParser(HTMLParser):
        inside, text = False, ""

        def handle_starttag(self, tag, attrs):
            self.inside = tag == "pre" and ("id", "report") in attrs

        def handle_endtag(self, tag):
            self.inside = False

        def handle_data(self, data):
            if self.inside:
                self.text += data

    parser = ReportParser()
    parser.feed(proc.stdout)
    assert parser.text and parser.text != "pending", (
        f"no report from Chromium for {page} (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    )
    return json.loads(parser.text)


def assert_math_typeset(report: dict, page: str) -> None:
    assert report.get("note") == "typeset", f"{page}: {report}"
    assert report["mathjax_version"], f"{page}: MathJax did not load (offline copy missing?)"
    assert report["math_elements"] > 0, f"{page}: no math on the page"
    assert report["mjx_containers"] >= report["math_elements"], f"{page}: {report}"
    assert not report["untypeset"], f"{page}: math left as raw TeX: {report['untypeset']}"
    assert report["mathjax_errors"] == 0, f"{page}: MathJax reported errors: {report['mathjax_error_texts']}"
    assert not report["raw_tex_in_prose"], (
        f"{page}: raw TeX in the text: {report['raw_tex_in_prose']} (unparsed $$ or \\( ?)"
    )
    assert not report["too_wide"], (
        f"{page}: display equations wider than the page at 1280 px (split them, e.g. with "
        f"aligned): {report['too_wide']}"
    )


def assert_widgets_rendered(report: dict, page: str) -> None:
    if report["widget_views"]:
        assert report["widgets_rendered"] >= report["widget_views"], (
            f"{page}: {report['widget_views']} saved widget views but "
            f"{report['widgets_rendered']} rendered (offline widget manager not loaded?)"
        )


def assert_screenshot(path: Path) -> None:
    from PIL import Image

    assert path.is_file() and path.stat().st_size > 10_000, f"no usable screenshot at {path}"
    with Image.open(path) as image:
        rgb = image.convert("RGB")
        assert rgb.size[0] >= 800 and rgb.size[1] >= 600, rgb.size
        small = rgb.resize((320, 400))
        colours = small.getcolors(maxcolors=1 << 16) or []
        non_white = sum(n for n, c in colours if min(c) < 200)
    assert len(colours) > 30, f"{path}: only {len(colours)} colours: an empty page?"
    assert non_white > 0.01 * 320 * 400, f"{path}: almost blank"


@pytest.mark.parametrize("name", list(PAGES))
def test_page_in_browser(name, chromium, book, tmp_path):
    html, base_url = book
    page = PAGES[name]
    assert (html / page).is_file(), f"{page} missing from the build"
    report = browser_report(chromium, base_url, page, tmp_path / "profile")
    assert_math_typeset(report, page)
    assert_widgets_rendered(report, page)
    if page.startswith("notebooks/"):
        figures = report["figures"]
        assert figures, f"{page}: no figure in the notebook's outputs"
        for figure in figures:
            if not figure["src"].startswith("data:"):  # saved widget outputs embed their images
                assert (html / Path(page).parent / figure["src"]).resolve().is_file(), figure
            assert figure["complete"] and figure["width"] > 50 and figure["height"] > 50, (
                f"{page}: figure did not load in the browser: {figure}"
            )
        # the "Open in Colab" badge is the book's own image: no image of a chapter comes from the web
        images = report["images"]
        assert any("colab-badge.svg" in img["src"] for img in images), f"{page}: no Colab badge"
        for img in images:
            assert not img["src"].startswith(("http:", "https:", "//")), f"{page}: image from the web: {img}"
            assert img["complete"] and img["width"] > 0, f"{page}: image did not load offline: {img}"


@pytest.mark.parametrize("name", list(SCREENSHOTS))
def test_screenshot(name, chromium, book, tmp_path):
    html, base_url = book
    page = SCREENSHOTS[name]
    shot = html / "_screenshots" / (Path(page).stem + ".png")
    shot.parent.mkdir(exist_ok=True)
    shot.unlink(missing_ok=True)
    proc = run_chromium(
        chromium,
        tmp_path / "profile",
        f"--screenshot={shot}",
        "--window-size=1280,1600",
        f"{base_url}/{page}",
    )
    assert proc.returncode == 0 or shot.is_file(), proc.stderr[-3000:]
    assert_screenshot(shot)


WIDGET_NOTEBOOK_CODE = """\
import ipywidgets as widgets
widgets.IntSlider(value=3, min=0, max=10, description="steps")
"""


def test_widgets_render_offline(chromium, serve, tmp_path):
    """A saved ipywidget renders from the book's local widget manager, without a CDN."""
    import nbformat
    from nbclient import NotebookClient

    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(ROOT / "_config.yml", source)
    shutil.copytree(ROOT / "book", source / "book")
    (source / "_toc.yml").write_text("format: jb-book\nroot: widgets\n")
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell("# Widgets\n\nInline math $\\alpha_t^2 + \\sigma_t^2 = 1$."),
            nbformat.v4.new_code_cell(WIDGET_NOTEBOOK_CODE),
        ]
    )
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    assert "widgets" in nb.metadata, "nbclient did not save the widget state"
    nbformat.write(nb, source / "widgets.ipynb")

    html = build_book(source, tmp_path / "out")
    page_html = (html / "widgets.html").read_text()
    assert "cdn.jsdelivr.net" not in page_html and "cdnjs" not in page_html, "widget JS from a CDN"
    (html / "_browser_check.html").write_text(CHECK_PAGE)
    report = browser_report(chromium, serve(html), "widgets.html", tmp_path / "profile")
    assert_math_typeset(report, "widgets.html")
    assert report["widget_views"] == 1, report
    assert_widgets_rendered(report, "widgets.html")

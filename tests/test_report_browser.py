"""The run report in a real browser: headless Chromium renders the report of a tiny real run.

What a person would see: the page paints (a screenshot of the requested size, many colours, the
prediction grid's mask colours in a block of several grid cells) and the DOM Chromium built holds
every section heading and every gate check. Skipped only when no Chromium binary is installed;
.ci/run installs Debian's `chromium`, so CI always runs it.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segpipe.components.core import artifacts
from segpipe.components.core.visual import PALETTE
from segpipe.components.tools import report
from segpipe.pipeline.config import load_config
from segpipe.pipeline.local_runner import RunResult, run_pipeline

CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome")
                 if (path := shutil.which(name))), None)
WINDOW = (1200, 2400)
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")
TIMEOUT = 300  # seconds; Chromium starts slowly on a busy 2-core machine
MASK_TOLERANCE = 12  # per channel: the grid is scaled when painted, so edges blend

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install chromium)"),
]


def chromium(profile: Path, page: Path, *args: str) -> subprocess.CompletedProcess:
    """One headless Chromium call on a local page with its own profile folder."""
    command = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri()]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}: {done.stderr[-2000:]}"
    return done


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, write_tiny_span, tiny_pipeline_overrides) -> RunResult:
    """`segpipe run` on three tiny spans: two image sizes, and two images too small to train on."""
    root = tmp_path_factory.mktemp("browser") / "root"
    write_tiny_span(root / "data", 1, num=24, size=(32, 32))
    write_tiny_span(root / "data", 2, num=16, size=(40, 48))
    write_tiny_span(root / "data", 3, num=2, size=(24, 24))
    overrides = tiny_pipeline_overrides(root, **{"data.num_spans": 3, "validation.max_invalid_fraction": 0.1,
                                                 "train.epochs": 2})
    result = run_pipeline(load_config(overrides=overrides))
    assert result.status == "pushed" and result.report_path, result.message
    return result


def recorded_gate_checks(run: RunResult) -> list[report.GateCheck]:
    """The gate's checks as the report reads them from the run's evaluation and blessing."""
    outputs = next(step for step in run.steps if step.node == "evaluator").outputs
    metrics = json.loads((Path(outputs["evaluation_uri"]) / artifacts.EVALUATION_FILE).read_text())
    blessing = json.loads((Path(outputs["blessing_uri"]) / artifacts.BLESSING_FILE).read_text())
    return report.gate_checks(metrics, blessing)


def test_screenshot_paints_the_report_and_the_prediction_grid(tiny_run: RunResult, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    chromium(tmp_path / "profile", Path(tiny_run.report_path), f"--screenshot={shot}",
             f"--window-size={WINDOW[0]},{WINDOW[1]}")
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size == WINDOW
        pixels = np.asarray(image.convert("RGB")).astype(np.int64)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 100, f"only {len(colours)} distinct colours: a blank or unstyled page"
    mask = np.all(np.abs(pixels - PALETTE[1].astype(np.int64)) <= MASK_TOLERANCE, axis=-1)
    rows, cols = np.nonzero(mask)
    assert mask.sum() > 500, "the foreground mask colour is missing: no prediction grid painted"
    # Masks in several grid cells, i.e. a grid rather than a stray red pixel.
    assert rows.max() - rows.min() > 200 and cols.max() - cols.min() > 100


class Headings(HTMLParser):
    """The text of every h2 and every table cell in a page."""

    def __init__(self) -> None:
        super().__init__()
        self.h2: list[str] = []
        self.cells: list[str] = []
        self._into: list[str] | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("h2", "td", "th"):
            self._into, self._text = (self.h2 if tag == "h2" else self.cells), []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("h2", "td", "th") and self._into is not None:
            self._into.append(" ".join("".join(self._text).split()))
            self._into = None

    def handle_data(self, data: str) -> None:
        if self._into is not None:
            self._text.append(data)


def test_rendered_dom_holds_every_section_and_gate_check(tiny_run: RunResult, tmp_path: Path) -> None:
    dom = chromium(tmp_path / "profile", Path(tiny_run.report_path), "--dump-dom").stdout
    parsed = Headings()
    parsed.feed(dom)
    assert parsed.h2 == list(report.SECTION_TITLES)
    checks = recorded_gate_checks(tiny_run)
    assert checks, "the tiny run's gate recorded no checks"
    for check in checks:
        assert check.name in parsed.cells, check.name
    assert "pass" in parsed.cells and "quarantine" in parsed.cells  # the gate passed; two examples quarantined

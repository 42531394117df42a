"""`featkd report`: the HTML page of a run, a comparison and a sweep, partial ones, and what
is not a report; the page is self-contained and, where Chromium is installed, renders in it."""

import base64
import html
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from featkd.cli import main
from featkd.compare import run_comparison
from featkd.config import load_config
from featkd.engine import NonFiniteLoss
from featkd.report import write_report
from featkd.sweep import parse_grid, run_sweep
from featkd.trainer import train

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
# seconds per run: 48 synthetic 8x8 samples, a one-epoch teacher, a two-epoch student
TINY = ["logger=none", "progress=false", "teacher.train.epochs=1", "train.epochs=2", "data.name=synthetic",
        "data.args={num_classes: 4, input_shape: [1, 8, 8], train_size: 48, test_size: 24}", "data.batch_size=16"]
ALONE = {"teacher": None, "loss": {"kd": None, "ce": {"weight": 1.0}}}
BEST_ON_TEST = "best epoch (selected on the test set, so optimistic)"


def images(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]*)"', page)


def headings(page: str) -> list[str]:
    return re.findall(r"<h2>(.*?)</h2>", page)


def assert_self_contained(page_path: Path, plots: int) -> None:
    """`plots` images, each a PNG embedded in the page and the same bytes in report/; nothing
    the page loads comes from elsewhere."""
    page = page_path.read_text()
    sources = images(page)
    assert len(sources) == plots
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert all(url.startswith("data:") for url in re.findall(r'(?:src|href)="([^"]*)"', page))
    assert "<script" not in page and "http://" not in page and "https://" not in page
    embedded = {base64.b64decode(s.partition(",")[2]) for s in sources}
    files = sorted((page_path.parent / "report").glob("*.png"))
    assert len(files) == plots and {f.read_bytes() for f in files} == embedded
    assert all(data.startswith(b"\x89PNG") for data in embedded)


def write_spec(folder: Path, variants: dict, seeds: list[int]) -> Path:
    spec = {"name": "mini", "base": QUICKSTART, "seeds": seeds, "baseline": "alone", "variants": variants}
    path = folder / f"{'-'.join(variants)}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("report")


@pytest.fixture(scope="module")
def run_dir(work) -> Path:
    """A finished run that trained its teacher (its own output_dir: nothing cached), with latency."""
    config = load_config(QUICKSTART, [f"output_dir={work / 'run'}", *TINY, "measure.batch_sizes=[1]",
                                      "measure.repeats=3", "measure.warmup=0"])
    return train(config, verbose=False).run_dir


@pytest.fixture(scope="module")
def comparison(work):
    """Two variants x two seeds; the grids share one output_dir, so the teacher trains once."""
    spec = write_spec(work, {"alone": ALONE, "KD": {}}, [0, 1])
    return run_comparison(spec, [f"output_dir={work / 'grids'}", *TINY, "measure=false"], progress=False)


def test_a_run_report_has_curves_per_stage_sizes_best_and_last_and_the_config(run_dir, tmp_path, capsys):
    out = tmp_path / "page"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.html")
    assert_self_contained(out / "report.html", plots=2)  # the teacher stage and the distill stage
    page = (out / "report.html").read_text()
    assert f"<h1>Run {run_dir.name}</h1>" in page
    assert headings(page) == ["Outcome", "Sizes and latency", "Training curves", "Config"]
    outcome = json.loads((run_dir / "summary.json").read_text())["run"]
    assert f"student top-1, {BEST_ON_TEST}</td><td>{outcome['best_acc']:.2f}% (epoch {outcome['best_epoch']})" in page
    assert f"student top-1, last epoch</td><td>{outcome['last_acc']:.2f}% (epoch 2)" in page
    assert f"<td>student</td><td>{outcome['student/parameters']:,}</td>" in page
    assert f"<td>teacher cnn_large</td><td>{outcome['teacher/parameters']:,}</td>" in page
    assert "latency batch 1, ms median (p90)" in page and "latency batch 32" not in page
    assert "<pre>" + html.escape((run_dir / "config.yaml").read_text()) + "</pre>" in page
    assert 'class="partial"' not in page and "Partial report" not in page


def test_a_run_in_progress_gets_a_page_of_what_it_has_marked_partial(run_dir, tmp_path):
    live = tmp_path / run_dir.name
    shutil.copytree(run_dir, live, ignore=shutil.ignore_patterns("*.pt"))
    state = json.loads((live / "state.json").read_text())
    state["stages"]["distill"]["status"] = "running"
    del state["stages"]["distill"]["result"]  # written when a stage is done
    (live / "state.json").write_text(json.dumps(state))
    summary = json.loads((live / "summary.json").read_text())
    del summary["run"], summary["distill"]
    (live / "summary.json").write_text(json.dumps(summary))
    lines = (live / "metrics.jsonl").read_text().splitlines()[:-1]
    (live / "metrics.jsonl").write_text("\n".join(lines) + '\n{"stage": "distill", "ste')  # a line being written

    page = write_report(live).read_text()
    assert 'class="partial"><strong>Partial report.</strong>' in page
    assert "stage &#x27;distill&#x27; is still &#x27;running&#x27; in state.json (1 epoch logged)" in page
    assert "No outcome yet" in page and "Sizes and latency" not in headings(page)
    assert "<td>distill</td><td>running</td><td>1</td>" in page
    assert len(images(page)) == 2 and "<h2>Config</h2>" in page


def test_a_comparison_writes_its_report_with_bands_a_ranking_and_the_table(comparison):
    page_path = comparison.folder / "report.html"
    assert comparison.report == page_path  # written by run_comparison itself
    assert_self_contained(page_path, plots=3)  # ranking, top-1 curves, loss curves
    assert {p.stem for p in (comparison.folder / "report").glob("*.png")} == {"ranking", "accuracy", "losses"}
    page = page_path.read_text()
    assert "<h1>Comparison mini</h1>" in page
    assert headings(page) == ["Ranking", "Results", "Training curves", "Runs", "Configs"]
    kd, alone = (next(s for s in comparison.summaries if s.variant == v) for v in ("KD", "alone"))
    assert f"<td>KD</td><td>{kd.last_mean:.2f} ± {kd.last_std:.2f}</td><td>{kd.best_mean:.2f} ± {kd.best_std:.2f}</td>" \
           f"<td>{kd.interval or f'{kd.delta_last:+.2f}'}</td><td>2</td>" in page
    assert f"<td>alone</td><td>{alone.last_mean:.2f} ± {alone.last_std:.2f}</td>" in page
    assert "dashed line: the baseline (alone) mean" in page and BEST_ON_TEST in page
    assert "band: min–max over seeds" in page and "error bars: sample standard deviation over seeds" in page
    for row in comparison.rows:
        assert f"<td>{Path(row.run_dir).name}</td>" in page
    assert page.count("<details><summary>") == 2  # each variant's config
    assert 'class="partial"' not in page and "Failed" not in page


def test_failed_runs_are_listed_by_variant_and_seed(comparison, work, tmp_path, capsys):
    # a comparison stopped by a run that diverged: no results file, the finished runs still reported
    spec = write_spec(work, {"alone": ALONE, "exploding": {"train": {"optimizer": {"lr": 1.0e6}}}}, [0])
    with pytest.raises(NonFiniteLoss):
        run_comparison(spec, [f"output_dir={work / 'grids'}", *TINY, "measure=false"], progress=False)
    folder = next(p for p in (work / "grids").glob("mini-*") if not (p / "results.json").exists())
    assert main(["report", str(folder)]) == 0
    page = (folder / "report.html").read_text()
    assert 'class="partial"' in page and "has no results file yet" in page and "Of the 2 runs found, 1 finished" in page
    assert "<h2>Failed or unfinished runs</h2>" in page
    assert re.search(r"<td>exploding</td><td>0</td><td>did not finish: stage &#x27;\w+&#x27; is still "
                     r"&#x27;running&#x27;", page)
    assert len(images(page)) == 3 and "<td>alone</td>" in page

    # a run a comparison recorded as diverged (a selection run that hit a non-finite loss)
    copy = tmp_path / comparison.folder.name
    shutil.copytree(comparison.folder, copy, ignore=shutil.ignore_patterns("*.pt", "report*"))
    results = json.loads((copy / "results.json").read_text())
    results["selection"] = [{**results["runs"][1], "variant": "KD @ train.optimizer.lr=1000000.0", "seed": 7,
                             "last_acc": float("nan"), "best_acc": float("nan"), "diverged": True}]
    (copy / "results.json").write_text(json.dumps(results))
    page = write_report(copy).read_text()
    assert "<td>KD @ train.optimizer.lr=1000000.0 (selection run)</td><td>7</td><td>diverged: a loss term became " \
           "NaN or infinite</td>" in page
    assert 'class="partial"' not in page


def test_a_sweep_writes_its_report_with_top1_against_the_swept_parameter(work):
    grid = parse_grid(["loss.kd.temperature=1,4"])
    result = run_sweep(QUICKSTART, grid, [f"output_dir={work / 'grids'}", *TINY, "measure=false"], name="t-sweep",
                       progress=False)
    assert result.report == result.folder / "report.html"
    assert_self_contained(result.report, plots=4)  # parameter, ranking, top-1 curves, loss curves
    page = result.report.read_text()
    assert headings(page) == ["Results", "Top-1 against each swept parameter", "Ranking", "Training curves", "Runs",
                              "Configs"]
    for row in result.rows:
        value = row.setting["loss.kd.temperature"]
        assert f"<td>{value}</td><td>{row.last_mean:.2f} ± {row.last_std:.2f}</td>" in page
        assert f"<summary>loss.kd.temperature={value}</summary>" in page


def test_a_failure_to_draw_the_report_never_loses_the_results(work, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no plotting today")

    monkeypatch.setattr("featkd.report.write_report", broken)
    result = run_sweep(QUICKSTART, parse_grid(["loss.kd.temperature=2"]),
                       [f"output_dir={work / 'grids'}", *TINY, "measure=false", "train.epochs=1"], progress=False)
    assert result.report is None and not (result.folder / "report.html").exists()
    assert (result.folder / "results.md").is_file() and (result.folder / "runs.csv").is_file()
    err = capsys.readouterr().err
    assert "no plotting today" in err and f"featkd report {result.folder}" in err


def test_a_folder_that_is_no_run_comparison_or_sweep_exits_2_with_one_message(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a run")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.json").write_text('{"accuracy": 1}')
    cases = [(tmp_path, "is not a run, comparison or sweep folder"), (tmp_path / "missing", "no such folder"),
             (foreign, "is not the results file of `featkd compare`")]
    for folder, message in cases:
        assert main(["report", str(folder)]) == 2
        err = capsys.readouterr().err
        assert message in err and "A report is made from a run folder" in err, err
        assert "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "report.html").exists()


@pytest.fixture(scope="module")
def chromium() -> tuple[str, str]:
    """Chromium (or Chrome) and chromedriver from the system's packages; checked before the
    comparison fixture trains anything."""
    browser = next((found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))),
                   None)
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("no Chromium and chromedriver: install the system packages chromium and chromium-driver "
                    "(Debian: apt-get install chromium chromium-driver) to render the report in a browser")
    return browser, driver


def test_the_comparison_page_renders_in_a_real_browser_without_errors(chromium, comparison, monkeypatch):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra: pip install -e .[test]")
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # never let Selenium Manager fetch anything
    browser, driver_path = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))  # the system driver
    try:
        driver.get(comparison.report.resolve().as_uri())
        state = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);")
        assert len(state) == 3
        assert all(complete and width > 0 and height > 0 for complete, width, height in state), state
        assert driver.title == "Comparison mini"
        errors = [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()

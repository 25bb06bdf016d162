import json
import subprocess
import sys

import pytest

from lowmag.errors import LowmagError
from lowmag.metrics import classification_metrics
from lowmag.train.report import plot_accuracy_vs_gflops, render_markdown, write_report

CLASSES = ["tumor", "stroma", "normal"]
# Per class F1 of this pair, by hand: 4/7, 4/7, 2/3 -> 57.1, 57.1, 66.7; accuracy 60.0.
Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
Y_PRED = [0, 0, 1, 2, 1, 1, 0, 2, 2, 1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(name, phase, method, magnification, mpp, input_px, gflops, pred=None, n_bootstrap=200):
    metrics = classification_metrics(Y_TRUE, pred or Y_TRUE, CLASSES, n_bootstrap=n_bootstrap)
    return {"name": name, "phase": phase, "method": method, "magnification": magnification,
            "mpp": mpp, "input_px": input_px, "gflops": gflops, "metrics": metrics}


@pytest.fixture
def rows():
    """Rows given out of order: the report must sort them."""
    return [
        _row("distill-5x", "distill", "Distillation (labeled)", "5x", 1.98, 36, 0.05,
             pred=[0, 0, 0, 1, 1, 1, 0, 2, 2, 1]),
        _row("distill-10x", "distill", "Distillation (labeled)", "10x", 0.99, 72, 0.19,
             pred=[0, 0, 0, 2, 1, 1, 1, 2, 2, 1]),
        _row("baseline-10x", "baseline", "Baseline (from scratch)", "10x", 0.99, 72, 0.19,
             pred=Y_PRED, n_bootstrap=0),
        _row("baseline-5x", "baseline", "Baseline (from scratch)", "5x", 1.98, 36, 0.05,
             pred=[0, 1, 1, 2, 1, 1, 0, 2, 0, 1]),
        _row("teacher", "teacher", "Teacher", "40x", 0.25, 288, 3.05),
    ]


def _table_cells(markdown):
    """Each Markdown table row as its list of stripped cell texts."""
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in markdown.splitlines() if line.startswith("| ")]


def test_main_table_is_ordered_by_resolution_with_teacher_first(rows):
    cells = _table_cells(render_markdown(rows, title="Gleason grading"))
    header, body = cells[0], cells[1:6]
    assert header == ["Magnification", "Input (px)", "Method", "GFLOPs", "Accuracy", "F1",
                      "Precision", "Recall"]
    assert [row[2] for row in body] == ["Teacher", "Baseline (from scratch)",
                                        "Distillation (labeled)", "Baseline (from scratch)",
                                        "Distillation (labeled)"]
    assert [row[3] for row in body] == ["3.05", "0.19", "0.19", "0.05", "0.05"]
    # Magnification and input size only on the first row of each group.
    assert [row[:2] for row in body] == [["40x", "288"], ["10x", "72"], ["", ""],
                                         ["5x", "36"], ["", ""]]


def test_metrics_are_percent_with_one_decimal_ci(rows):
    markdown = render_markdown(rows)
    # The teacher is perfect, so every resample's accuracy is 1: CI exactly [100, 100].
    assert "| 40x | 288 | Teacher | 3.05 | 100.0 (100.0–100.0) | 100.0 (" in markdown
    # The baseline at 10x has no bootstrap: accuracy 60.0, macro F1 38/63, P = R = 11/18.
    assert "| Baseline (from scratch) | 0.19 | 60.0 | 60.3 | 61.1 | 61.1 |" in markdown
    distill = rows[1]["metrics"]["accuracy"]
    expected = (f"{100 * distill['value']:.1f} ({100 * distill['ci_low']:.1f}"
                f"–{100 * distill['ci_high']:.1f})")
    assert f"| Distillation (labeled) | 0.19 | {expected} |" in markdown
    assert "95% percentile bootstrap" in markdown and "N = 10 test items" in markdown


def test_per_class_f1_table_has_a_column_per_class(rows):
    markdown = render_markdown(rows)
    assert "| Magnification | Method | tumor | stroma | normal |" in markdown
    assert "| 10x | Baseline (from scratch) | 57.1 | 57.1 | 66.7 |" in markdown
    assert "| 40x | Teacher | 100.0 | 100.0 | 100.0 |" in markdown


def test_title_and_pipe_in_method_are_safe_markdown(rows):
    rows[0]["method"] = "Distillation | max-pool"
    markdown = render_markdown(rows, title="Gleason grading")
    assert markdown.startswith("## Gleason grading\n")
    assert "Distillation \\| max-pool" in markdown


def test_bad_rows_raise(rows):
    del rows[0]["mpp"]
    with pytest.raises(LowmagError, match="lacks mpp"):
        render_markdown(rows)
    with pytest.raises(LowmagError, match="phase 'student'"):
        render_markdown([dict(rows[1], phase="student")])
    with pytest.raises(LowmagError, match="no result rows"):
        render_markdown([])


def test_plot_is_a_png_of_the_requested_size(rows, tmp_path):
    from matplotlib.image import imread

    path = plot_accuracy_vs_gflops(rows, tmp_path / "plots" / "acc.png")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    height, width = imread(path).shape[:2]
    assert (width, height) == (1050, 720)  # 7.0 x 4.8 inches at 150 dpi
    assert [p.name for p in path.parent.iterdir()] == ["acc.png"]  # no temporary left


def test_plot_needs_gflops(rows, tmp_path):
    for row in rows:
        row["gflops"] = None
    with pytest.raises(LowmagError, match="no result row has a positive GFLOPs"):
        plot_accuracy_vs_gflops(rows, tmp_path / "acc.png")
    assert not (tmp_path / "acc.png").exists()


def test_write_report_writes_three_files_that_round_trip(rows, tmp_path):
    meta = {"command": "distill-train run cfg.toml", "machine": "1x H100", "wall_time_s": 3725,
            "git_sha": "abc123", "seed": 0, "config": {"epochs": 10}, "out": tmp_path}
    paths = write_report(rows, tmp_path / "report", meta)
    assert sorted(p.name for p in paths.values()) == [
        "accuracy_vs_gflops.png", "results.json", "results.md"]
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(
        p.name for p in paths.values())

    saved = json.loads(paths["json"].read_text())
    assert saved["results"] == json.loads(json.dumps(rows))
    assert saved["meta"]["config"] == {"epochs": 10}
    assert saved["meta"]["out"] == str(tmp_path)

    markdown = paths["markdown"].read_text()
    assert markdown.startswith("# distill-train results\n")
    assert "- Command: `distill-train run cfg.toml`" in markdown
    assert "- Machine: 1x H100" in markdown
    assert "- Wall time: 1 h 02 min" in markdown
    assert "- Git SHA: `abc123`" in markdown
    assert "- seed: 0" in markdown
    assert render_markdown(rows) in markdown
    assert "![Accuracy against GFLOPs](accuracy_vs_gflops.png)" in markdown
    assert paths["plot"].read_bytes().startswith(PNG_MAGIC)


def test_write_report_without_gflops_skips_only_the_plot(rows, tmp_path):
    for row in rows:
        row.pop("gflops")
    paths = write_report(rows, tmp_path, {})
    assert set(paths) == {"json", "markdown"}
    assert "| 40x | 288 | Teacher | – |" in paths["markdown"].read_text()
    assert not (tmp_path / "accuracy_vs_gflops.png").exists()


def test_importing_report_does_not_load_matplotlib():
    code = ("import sys, lowmag.train.report, lowmag.metrics; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_runs_that_differ_only_in_attention_weight_get_their_own_name_and_method():
    """Two attention weights at one resolution are two rows (and two series) in the report."""
    from lowmag.train.experiment import Step

    steps = [Step("distill", "scan/4", "labeled+unlabeled", "both", w) for w in (0.0, 0.1, 1.0)]
    assert [s.name for s in steps] == ["distill-aux-both-scan_4", "distill-aux-both-att0.1-scan_4",
                                       "distill-aux-both-att1-scan_4"]
    assert [s.method for s in steps] == ["Distillation (labeled + unlabeled)",
                                         "Distillation (labeled + unlabeled, + attention 0.1)",
                                         "Distillation (labeled + unlabeled, + attention 1)"]


def test_steps_trained_with_several_seeds_are_reported_as_mean_and_sd_with_each_seeds_ci(rows, tmp_path):
    seeded = []
    for seed, pred in ((0, Y_PRED), (1, [0, 0, 0, 0, 1, 1, 1, 2, 2, 1]), (2, Y_TRUE)):  # accuracy 60, 90, 100
        row = _row("teacher", "teacher", "Teacher", "40x", 0.25, 288, 3.05, pred=pred)
        seeded.append({**row, "seed": seed})
    all_rows = [r for r in rows if r["name"] != "teacher"] + seeded

    markdown = render_markdown(all_rows)

    main = _table_cells(markdown.split("Per-class")[0])
    assert [r[2] for r in main[1:]].count("Teacher") == 1  # the main table: one row per step (seed 0)
    assert main[1][4].startswith("60.0")
    over = _table_cells(markdown.split("Over seeds")[1])
    assert over[0] == ["Magnification", "Method", "Seeds", "Accuracy", "F1", "F1 per seed"]
    assert over[1][:4] == ["40x", "Teacher", "3", "83.3 ± 20.8"]  # mean 83.3, sample SD 20.8
    assert over[1][5].startswith("0: ") and "; 2: 100.0" in over[1][5]
    written = write_report(all_rows, tmp_path / "report", {"title": "seeds"})
    data = json.loads(written["json"].read_text())
    assert data["over_seeds"][0]["seeds"] == [0, 1, 2]
    assert written["plot"].read_bytes()[:8] == PNG_MAGIC


def test_report_gathers_the_extra_seeds_runs_of_a_run_folder(rows, tmp_path):
    from lowmag.train.report import gather_rows

    for folder, seed in ((tmp_path / "run", 0), (tmp_path / "run" / "seed-4", 4)):
        step = folder / "steps" / "teacher"
        step.mkdir(parents=True)
        (step / "metrics.json").write_text(json.dumps({**rows[-1], "seed": seed}))
    assert sorted(r["seed"] for r in gather_rows(tmp_path / "run")) == [0, 4]


def test_each_seed_is_compared_with_the_teacher_and_baseline_of_its_own_seed(rows, tmp_path):
    """The main table shows the spread, and a student's differences are taken within a seed:
    with a teacher that is much better on one seed, the student "beats" it on the means'
    order of rows but not on every seed, and the table shows that."""
    preds = {  # macro F1 per seed follows from these; the test recomputes them, never hard-codes
        "teacher": (Y_TRUE, Y_PRED, [0, 0, 0, 0, 1, 1, 1, 2, 2, 1]),
        "baseline-5x": ([0, 1, 1, 2, 1, 1, 0, 2, 0, 1], Y_PRED, Y_PRED),
        "distill-5x": (Y_PRED, Y_TRUE, Y_TRUE),
        "distill-aux-5x": (Y_TRUE, Y_PRED, [0, 1, 2, 2, 1, 0, 0, 1, 2, 1]),
    }
    template = {row["name"]: row for row in rows}
    template["distill-aux-5x"] = {**template["distill-5x"], "method": "Distillation (labeled + unlabeled)"}
    seeded = []
    for name, by_seed in preds.items():
        t = template[name]
        for seed, pred in enumerate(by_seed):
            row = _row(name, t["phase"], t["method"], t["magnification"], t["mpp"], t["input_px"], t["gflops"],
                       pred=pred)
            seeded.append({**row, "seed": seed})
    f1 = {(r["name"], r["seed"]): 100 * r["metrics"]["macro_f1"]["value"] for r in seeded}

    markdown = render_markdown(seeded)

    main = _table_cells(markdown.split("Per-class")[0])
    assert main[0][-1] == "F1 over seeds"
    teacher_f1 = [f1[("teacher", s)] for s in range(3)]
    import numpy as np
    assert main[1][-1] == f"{np.mean(teacher_f1):.1f} ± {np.std(teacher_f1, ddof=1):.1f} (3)"
    differences = _table_cells(markdown.split("Differences within each seed")[1])
    assert differences[0] == ["Magnification", "Method", "− teacher", "− baseline", "− labeled only"]
    by_method = {r[1]: r for r in differences[1:]}
    student = by_method["Distillation (labeled)"]
    minus_teacher = [f1[("distill-5x", s)] - f1[("teacher", s)] for s in range(3)]
    minus_baseline = [f1[("distill-5x", s)] - f1[("baseline-5x", s)] for s in range(3)]
    assert student[2] == f"{np.mean(minus_teacher):+.1f} (" + ", ".join(f"{d:+.1f}" for d in minus_teacher) + ")"
    assert student[3] == f"{np.mean(minus_baseline):+.1f} (" + ", ".join(f"{d:+.1f}" for d in minus_baseline) + ")"
    assert min(minus_teacher) < 0 < max(minus_teacher)  # the case the table exists for: seeds disagree
    assert by_method["Baseline (from scratch)"][3] == "–"  # a baseline is not compared with itself
    # What the unlabeled images add: the labeled + unlabeled student minus the labeled-only one, per seed.
    gain = [f1[("distill-aux-5x", s)] - f1[("distill-5x", s)] for s in range(3)]
    assert by_method["Distillation (labeled + unlabeled)"][4] == (
        f"{np.mean(gain):+.1f} (" + ", ".join(f"{d:+.1f}" for d in gain) + ")")
    assert student[4] == "–" and by_method["Baseline (from scratch)"][4] == "–"
    data = json.loads(write_report(seeded, tmp_path / "r", {"title": "t"})["json"].read_text())
    assert {e["name"] for e in data["seed_differences"]} == {"baseline-5x", "distill-5x", "distill-aux-5x"}
    aux = next(e for e in data["seed_differences"] if e["name"] == "distill-aux-5x")
    assert aux["minus_labeled"]["seeds"] == 3


def test_a_one_seed_report_keeps_its_shape(rows):
    markdown = render_markdown(rows)
    assert "F1 over seeds" not in markdown and "Differences within each seed" not in markdown

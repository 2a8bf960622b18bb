"""`segnext tune`'s reports (`tune.report`): the results table and the picture of val mIoU
and the confusing classes' IoU against each searched value."""

from __future__ import annotations

from pathlib import Path

from test_run import SEARCH_YAML

from pipelines.tracking.search import COMPLETED, FAILED, STOPPED, TrialOutcome
from tune.report import params_figure, results_csv, results_markdown
from tune.space import load_search_config


def test_picture_plots_the_confusing_classes_against_each_weight(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        SEARCH_YAML.format(shards="/x", store=tmp_path)
        + "    loss.weights.variance: {loguniform: [0.01, 1.0]}\n"
    )
    _, settings = load_search_config(path)
    outcomes = [
        TrialOutcome(
            f"t{i}",
            f"s-t{i}",
            COMPLETED,
            {"optim.lr": 2e-3, "loss.weights.variance": weight},
            best_val_miou=miou,
            iteration=10,
            class_iou={"car": car, "truck": truck},
        )
        for i, (weight, miou, car, truck) in enumerate(
            [(0.01, 0.5, 0.4, 0.2), (0.5, 0.6, 0.5, 0.45)]
        )
    ]
    figure = params_figure(outcomes, settings)
    assert len(figure.axes) == 3 * 2  # rows: mIoU, IoU car, IoU truck; columns: the two keys
    labels = [ax.get_ylabel() for ax in figure.axes]
    assert labels == ["best val mIoU"] * 2 + ["IoU car"] * 2 + ["IoU truck"] * 2
    assert figure.axes[5].get_xscale() == "log"
    truck = figure.axes[5].collections[0].get_offsets()
    assert sorted(map(tuple, truck.tolist())) == [(0.01, 0.2), (0.5, 0.45)]
    table = results_markdown(outcomes, settings).splitlines()
    assert table[0].endswith("| best val mIoU | IoU car | IoU truck | iteration | error |")
    assert table[2].startswith("| t1 |") and "| 0.5000 | 0.4500 |" in table[2]


def test_reports_rank_trials_and_draw_one_panel_per_key(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        SEARCH_YAML.format(shards="/x", store=tmp_path)
        + "    optim.weight_decay: {choice: [0.0, 0.01]}\n"
    )
    _, settings = load_search_config(path)
    outcomes = [
        TrialOutcome(
            "t0",
            "s-t0",
            STOPPED,
            {"optim.lr": 1e-7, "optim.weight_decay": 0.0},
            best_val_miou=0.03,
            iteration=5,
        ),
        TrialOutcome(
            "t1",
            "s-t1",
            FAILED,
            {"optim.lr": 1e4, "optim.weight_decay": 0.01},
            error="FloatingPointError: loss is nan | inf",
        ),
        TrialOutcome(
            "t2",
            "s-t2",
            COMPLETED,
            {"optim.lr": 2e-3, "optim.weight_decay": 0.0},
            best_val_miou=0.41,
            iteration=10,
            checkpoint="/c",
        ),
    ]
    table = results_markdown(outcomes, settings).splitlines()
    assert table[0] == (
        "| trial | status | optim.lr | optim.weight_decay | best val mIoU | iteration | error |"
    )
    assert [row.split(" | ")[0] for row in table[2:]] == ["| t2", "| t0", "| t1"]
    assert "loss is nan / inf" in table[4]  # a '|' would break the table
    csv_rows = results_csv(outcomes, settings).splitlines()
    assert csv_rows[1].startswith("t2,completed,0.002,0.0,0.410000,10,/c,")
    figure = params_figure(outcomes, settings)
    assert len(figure.axes) == 2
    assert figure.axes[0].get_xscale() == "linear"  # grid values plot as they are
    figure.savefig(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0

import io
import json
import math

import pytest
import yaml
from typer.testing import CliRunner

from krpo_cli.cli import app
from krpo_cli.compare import (
    CompareError,
    Smoothing,
    aggregate,
    compare,
    ema,
    load_run,
    moving_average,
    parse_smoothing,
    series,
    summarize_run,
)
from krpo_cli.multi_seed import parse_seeds, seed_overrides
from krpo_cli.config import RecipeError
from conftest import read_jsonl, tiny_recipe, write_recipe

runner = CliRunner()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_run(directory, name, advantage, rewards, correct, kls, eval_accuracy=None, seed=1):
    """A run directory as training leaves it: recipe.yaml and metrics.jsonl (eval_accuracy: {step: value})."""
    directory.mkdir(parents=True)
    recipe = {"run": {"name": name, "seed": seed}, "algorithm": {"advantage": advantage}}
    (directory / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    lines = []
    for step, (reward, frac, kl) in enumerate(zip(rewards, correct, kls), start=1):
        record = {"step": step, "reward_mean": reward, "correct_frac": frac, "kl": kl, "loss": 0.1}
        if eval_accuracy and step in eval_accuracy:
            record["eval/accuracy"] = eval_accuracy[step]
        lines.append(json.dumps(record))
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def test_ema_by_hand():
    # s0 = 1; s1 = .5·1 + .5·0 = .5; s2 = .5·.5 = .25; s3 = .5·.25 + .5·1 = .625
    assert ema([1.0, 0.0, 0.0, 1.0], 0.5) == pytest.approx([1.0, 0.5, 0.25, 0.625])
    # weight .8: s1 = .8·2 + .2·7 = 3.0
    assert ema([2.0, 7.0], 0.8) == pytest.approx([2.0, 3.0])
    assert ema([], 0.8) == []


def test_moving_average_by_hand():
    # trailing window of 3, shorter at the start: 1, (1+2)/2, (1+2+3)/3, (2+3+4)/3, (3+4+5)/3
    assert moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 3) == pytest.approx([1.0, 1.5, 2.0, 3.0, 4.0])
    assert moving_average([4.0, 0.0], 1) == [4.0, 0.0]


def test_parse_smoothing():
    assert parse_smoothing("0.8") == Smoothing("ema", 0.8)
    assert parse_smoothing("10") == Smoothing("window", 10)
    assert parse_smoothing("0").kind == "none" and parse_smoothing("1").kind == "none"
    for bad in ("abc", "-0.5", "2.5", "nan"):
        with pytest.raises(CompareError, match="--smooth"):
            parse_smoothing(bad)
    # The message says what the parser accepts: a window of 1 is no smoothing, so windows start at 2.
    with pytest.raises(CompareError) as refused:
        parse_smoothing("-1")
    assert "window ≥ 2" in str(refused.value) and "0 or 1 for none" in str(refused.value)


def test_series_skips_missing_and_non_finite_values():
    records = [{"step": 1, "kl": 0.5}, {"step": 2}, {"step": 3, "kl": float("nan")}, {"step": 4, "kl": 0.25}]
    assert series(records, "kl") == ([1, 4], [0.5, 0.25])


def test_summary_final_and_best_from_a_hand_written_metrics_file(tmp_path):
    run = tmp_path / "a"
    run.mkdir()
    (run / "recipe.yaml").write_text("run: {name: alpha, seed: 3}\nalgorithm: {advantage: grpo}\n", encoding="utf-8")
    (run / "metrics.jsonl").write_text(
        '{"step": 1, "reward_mean": 0.2, "correct_frac": 0.1, "kl": 0.0}\n'
        '{"step": 2, "reward_mean": 0.6, "correct_frac": 0.5, "kl": 0.01, "eval/accuracy": 0.3}\n'
        '{"step": 3, "reward_mean": 0.5, "correct_frac": 0.25, "kl": 0.02}\n'
        '\n'
        '{"step": 4, "reward_mean": 0.4, "correct_frac": 0.3, "kl": 0.015, "eval/accuracy": 0.2}\n',
        encoding="utf-8",
    )
    loaded = load_run(run)
    assert loaded.label == "alpha (grpo)" and loaded.seed == 3

    summary = summarize_run(loaded)  # the run logged eval/accuracy, so that is its accuracy
    assert summary["steps"] == 4
    assert summary["reward_final"] == 0.4 and summary["reward_best"] == 0.6
    assert summary["accuracy_metric"] == "eval/accuracy"
    assert summary["accuracy_final"] == 0.2 and summary["accuracy_best"] == 0.3
    assert summary["kl_final"] == 0.015

    rollout = summarize_run(loaded, "correct_frac")
    assert rollout["accuracy_final"] == 0.3 and rollout["accuracy_best"] == 0.5


def test_aggregate_mean_and_sample_std_by_hand():
    summaries = [
        {"reward_final": 0.2, "reward_best": 0.5, "accuracy_final": 0.1, "accuracy_best": None, "kl_final": 0.01},
        {"reward_final": 0.4, "reward_best": 0.5, "accuracy_final": None, "accuracy_best": None, "kl_final": 0.03},
        {"reward_final": 0.9, "reward_best": 0.5, "accuracy_final": None, "accuracy_best": None, "kl_final": 0.02},
    ]
    result = aggregate(summaries)
    # mean 0.5; deviations -.3, -.1, .4; sample variance (.09 + .01 + .16) / 2 = .13
    assert result["reward_final"]["mean"] == pytest.approx(0.5)
    assert result["reward_final"]["std"] == pytest.approx(math.sqrt(0.13))
    assert result["reward_best"] == {"mean": 0.5, "std": 0.0}
    assert result["kl_final"]["mean"] == pytest.approx(0.02) and result["kl_final"]["std"] == pytest.approx(0.01)
    assert result["accuracy_final"] == {"mean": 0.1, "std": None}  # one value: no spread to report
    assert result["accuracy_best"] == {"mean": None, "std": None}


def test_compare_writes_a_png_and_the_table_as_json(tmp_path):
    import matplotlib.image

    from rich.console import Console

    a = fake_run(tmp_path / "a", "alpha", "krpo", [0.1, 0.3, 0.2], [0.0, 0.5, 0.25], [0.0, 0.01, 0.02], eval_accuracy={3: 0.4})
    b = fake_run(tmp_path / "b", "beta", "grpo", [0.2, 0.1, 0.5], [0.25, 0.0, 0.75], [0.0, 0.03, 0.01])
    console = Console(record=True, width=200)
    out = tmp_path / "plots" / "cmp.png"
    result = compare([a, b], out, Smoothing("ema", 0.6), console)

    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert matplotlib.image.imread(out).shape[:2] == (450, 1500)  # FIGURE_SIZE × DPI, height first
    written = json.loads((tmp_path / "plots" / "cmp.json").read_text())
    assert written == json.loads(json.dumps(result))
    # Only one run logged eval/accuracy, so both are compared on the rollouts' correct_frac.
    assert written["accuracy_metric"] == "correct_frac"
    assert [(r["label"], r["reward_final"], r["reward_best"], r["accuracy_best"]) for r in written["runs"]] == [
        ("alpha (krpo)", 0.2, 0.3, 0.5),
        ("beta (grpo)", 0.5, 0.5, 0.75),
    ]
    text = console.export_text()
    assert "alpha (krpo)" in text and "beta (grpo)" in text and "accuracy: correct_frac" in text


def test_same_labels_are_told_apart_by_path(tmp_path):
    from rich.console import Console

    a = fake_run(tmp_path / "x" / "run", "run", "krpo", [0.1], [0.0], [0.0])
    b = fake_run(tmp_path / "y" / "run", "run", "krpo", [0.2], [0.0], [0.0])
    result = compare([a, b], tmp_path / "c.png", Smoothing("none"), Console(file=io.StringIO()))
    assert [r["label"] for r in result["runs"]] == [str(a), str(b)]


def test_compare_replaces_only_its_own_figure_and_table(tmp_path):
    from rich.console import Console

    a = fake_run(tmp_path / "a", "alpha", "krpo", [0.1, 0.3], [0.0, 0.5], [0.0, 0.01])
    quiet = Console(file=io.StringIO())
    out = tmp_path / "cmp.png"
    compare([a], out, Smoothing("none"), quiet)
    compare([a], out, Smoothing("none"), quiet)  # its own outputs: replaced
    for name in ("user.png", "user.json"):  # a user's image or notes where the figure or table would go
        (tmp_path / name).write_bytes(b"the user's own file")
        with pytest.raises(CompareError, match=f"'{tmp_path / name}' exists and is not a krpo compare output"):
            compare([a], tmp_path / "user.png", Smoothing("none"), quiet)
        assert (tmp_path / name).read_bytes() == b"the user's own file"
        (tmp_path / name).unlink()
    old_table = {"accuracy_metric": "correct_frac", "smoothing": "none", "runs": []}  # an earlier krpo's table
    (tmp_path / "old.json").write_text(json.dumps(old_table))
    compare([a], tmp_path / "old.png", Smoothing("none"), quiet)
    assert json.loads((tmp_path / "old.json").read_text())["made_by"] == "krpo compare"


def test_not_a_run_and_empty_run_are_clear_errors(tmp_path):
    with pytest.raises(CompareError, match="not a run directory"):
        load_run(tmp_path)
    with pytest.raises(CompareError, match="not a directory"):
        load_run(tmp_path / "missing")
    (tmp_path / "metrics.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(CompareError, match="empty"):
        load_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "reward\n', encoding="utf-8")
    with pytest.raises(CompareError, match="line 2 is not JSON"):
        load_run(tmp_path)


def test_cli_compare(tmp_path):
    a = fake_run(tmp_path / "a", "alpha", "krpo", [0.1, 0.3], [0.0, 0.5], [0.0, 0.01])
    b = fake_run(tmp_path / "b", "beta", "rloo", [0.2, 0.1], [0.25, 0.0], [0.0, 0.03])
    out = tmp_path / "cmp.png"
    result = runner.invoke(app, ["compare", str(a), str(b), "--out", str(out), "--smooth", "2"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert "beta (rloo)" in result.output
    assert json.loads((tmp_path / "cmp.json").read_text())["smoothing"] == "moving average over 2 points"

    bad = runner.invoke(app, ["compare", str(a), str(tmp_path)])
    assert bad.exit_code == 2
    assert "is not a run directory (no metrics.jsonl)" in bad.output and "Traceback" not in bad.output
    assert runner.invoke(app, ["compare", str(a), "--smooth", "x"]).exit_code == 2


def test_parse_seeds_and_overrides():
    assert parse_seeds("1,2, 3") == [1, 2, 3]
    for bad in ("1,,2", "1,a", "2,2"):
        with pytest.raises(RecipeError):
            parse_seeds(bad)
    # A JSON string keeps a name that YAML would read as a number a string.
    assert seed_overrides(["train.steps=1"], "007", 5) == ["train.steps=1", 'run.name="007-seed5"', "run.seed=5"]


def test_seeds_refuse_a_used_run_dir_before_training_any(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "runs"))
    used = tmp_path / "runs" / "tiny-seed2"
    used.mkdir(parents=True)
    (used / "metrics.jsonl").write_text("{}\n", encoding="utf-8")
    result = runner.invoke(app, ["train", str(recipe), "--seeds", "1,2"])
    assert result.exit_code == 2 and "tiny-seed2" in result.output
    assert not (tmp_path / "runs" / "tiny-seed1").exists()
    assert runner.invoke(app, ["train", str(recipe), "--seeds", "1,x"]).exit_code == 2
    assert runner.invoke(app, ["train", str(recipe), "run.seed=3", "--seeds", "1,2"]).exit_code == 2
    used.rename(tmp_path / "elsewhere")
    (tmp_path / "runs" / "tiny-seeds.json").write_text("the user's notes")  # where the summary would go
    result = runner.invoke(app, ["train", str(recipe), "--seeds", "1,2"])
    assert result.exit_code == 2 and "tiny-seeds.json' exists and is not a krpo compare output" in result.output
    assert not (tmp_path / "runs" / "tiny-seed1").exists()
    assert (tmp_path / "runs" / "tiny-seeds.json").read_text() == "the user's notes"


def test_train_over_two_seeds(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "runs"))
    result = runner.invoke(app, ["train", str(recipe), "train.steps=2", "--seeds", "1,2"])
    assert result.exit_code == 0, result.output

    runs = tmp_path / "runs"
    seeds = [yaml.safe_load((runs / f"tiny-seed{s}" / "recipe.yaml").read_text())["run"]["seed"] for s in (1, 2)]
    assert seeds == [1, 2]
    finals = [read_jsonl(runs / f"tiny-seed{s}" / "metrics.jsonl")[-1] for s in (1, 2)]
    assert [m["step"] for m in finals] == [2, 2]
    samples = [[(x["question"], x["completion"]) for x in read_jsonl(runs / f"tiny-seed{s}" / "samples.jsonl")] for s in (1, 2)]
    assert samples[0] != samples[1], "different seeds, different prompts and samples"

    summary = json.loads((runs / "tiny-seeds.json").read_text())
    assert [r["seed"] for r in summary["runs"]] == [1, 2]
    kl = summary["aggregate"]["kl_final"]
    assert kl["mean"] == pytest.approx((finals[0]["kl"] + finals[1]["kl"]) / 2)
    assert kl["std"] == pytest.approx(abs(finals[0]["kl"] - finals[1]["kl"]) / math.sqrt(2))  # n−1 std of two values
    reward = summary["aggregate"]["reward_final"]
    assert reward["mean"] == pytest.approx((finals[0]["reward_mean"] + finals[1]["reward_mean"]) / 2)
    assert (runs / "tiny-seeds.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "across 2 seeds" in result.output and "± std" in result.output


def test_summary_table_fits_80_columns_with_long_labels(tmp_path):
    from rich.console import Console

    from krpo_cli.compare import summary_table

    runs = [
        fake_run(tmp_path / "a", "arithmetic-normal-qwen-seed3", "dr_grpo", [0.65, 0.81], [0.5, 0.64], [0.0, 0.0012]),
        fake_run(tmp_path / "b", "arithmetic-normal-qwen-seed4", "krpo", [0.25, 0.5], [0.125, 0.72], [0.0, 0.25]),
    ]
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(summary_table([summarize_run(load_run(run)) for run in runs]))
    text = console.export_text()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    header = " ".join(text.splitlines()[:2])
    assert header.count("accuracy") == 2 and header.count("reward") == 2 and header.count("final") == 3
    for figure in ("0.810", "0.640", "0.001", "0.500", "0.720", "0.250"):
        assert figure in text, figure
    assert "dr_grpo" in text.replace("\n", "")  # a long label folds onto a second line, it is not cut


def test_plot_step_ticks_are_whole_numbers(tmp_path):
    from krpo_cli.compare import comparison_figure

    run = load_run(fake_run(tmp_path / "a", "alpha", "krpo", [0.1, 0.3, 0.2], [0.0, 0.5, 0.25], [0.0, 0.01, 0.02]))
    figure = comparison_figure([run], ["alpha"], "correct_frac", Smoothing("none"))
    for ax in figure.axes:
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert len(ticks) >= 2 and all(t == int(t) for t in ticks), ticks

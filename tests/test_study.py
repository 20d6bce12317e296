"""The estimator study (studies/): its statistics on hand-computed numbers, its grid, the skip and
resume logic with a fake trainer, the report, and one end-to-end run with a tiny random model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from krpo_cli.compare import Run, Smoothing, seed_band
from studies import estimators
from studies.estimators import GRID, SIZES, operand_problems, plan_runs, run_state
from studies.stats import mean_std, paired_difference, t_cdf, t_quantile

QUIET = Console(quiet=True)


# ---------------------------------------------------------------------------------------
# Statistics

def test_t_quantile_matches_the_closed_forms_and_the_tables():
    # df = 1 is the Cauchy distribution: t = tan(π (p − 1/2)).
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), abs=1e-9)  # 12.7062
    # df = 2: t = (2p − 1) / sqrt(2 p (1 − p)).
    assert t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), abs=1e-9)  # 4.3027
    # Printed t tables, 97.5 % quantile.
    for df, expected in [(3, 3.182), (4, 2.776), (7, 2.365), (10, 2.228), (30, 2.042)]:
        assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)
    assert t_quantile(0.025, 7) == pytest.approx(-t_quantile(0.975, 7))
    assert t_cdf(0.0, 5) == 0.5 and t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/π
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError):
        t_cdf(1.0, 0)


def test_mean_std_by_hand():
    assert mean_std([0.5, 0.7, 0.6]) == pytest.approx({"n": 3, "mean": 0.6, "std": 0.1})
    assert mean_std([0.4]) == {"n": 1, "mean": 0.4, "std": None}
    assert mean_std([]) == {"n": 0, "mean": None, "std": None}


def test_paired_difference_uses_the_seeds_both_arms_have():
    krpo = {1: 0.5, 2: 0.7, 3: 0.6, 4: 0.9}
    grpo = {1: 0.4, 2: 0.5, 3: 0.6, 5: 0.1}
    result = paired_difference(krpo, grpo)
    assert result["seeds"] == [1, 2, 3]
    assert result["differences"] == pytest.approx({1: 0.1, 2: 0.2, 3: 0.0})
    assert result["mean"] == pytest.approx(0.1) and result["std"] == pytest.approx(0.1)
    half = 4.302653 * 0.1 / math.sqrt(3)  # t(0.975, 2) · std / √n = 0.248414
    assert result["interval"] == pytest.approx([0.1 - half, 0.1 + half], abs=1e-6)
    assert paired_difference({1: 0.5}, {1: 0.2})["interval"] is None  # one pair: no interval


def test_seed_band_averages_smoothed_values_at_the_common_steps():
    runs = [
        Run(Path("a"), "a", "krpo", 1, [{"step": 1, "reward_mean": 0.0}, {"step": 2, "reward_mean": 1.0, "eval/accuracy": 0.2}]),
        Run(Path("b"), "b", "krpo", 2, [{"step": 1, "reward_mean": 0.4}, {"step": 2, "reward_mean": 0.4, "eval/accuracy": 0.6},
                                        {"step": 3, "reward_mean": 0.9}]),
    ]
    steps, means, stds = seed_band(runs, "reward_mean", Smoothing("ema", 0.5))
    # EMA 0.5: run a → 0.0, 0.5; run b → 0.4, 0.4 (0.9 at step 3 is run b's alone: left out).
    assert steps == [1, 2] and means == pytest.approx([0.2, 0.45])
    assert stds == pytest.approx([math.sqrt(0.08), math.sqrt(0.005)])
    steps, means, stds = seed_band(runs, "eval/accuracy", Smoothing("ema", 0.5))  # never smoothed
    assert steps == [2] and means == pytest.approx([0.4]) and stds == pytest.approx([math.sqrt(0.08)])
    assert seed_band(runs[:1], "reward_mean", Smoothing("none"))[2] == [0.0, 0.0]  # one seed: no spread


# ---------------------------------------------------------------------------------------
# Tasks and the grid

def test_operand_problems_are_every_sum_and_difference():
    rows = operand_problems(range(10, 100), range(10, 100))
    assert len(rows) == 2 * 90 * 90
    assert {row["question"] for row in rows} >= {"10 + 10", "99 - 10", "10 - 99"}
    for row in rows[:50]:
        a, op, b = row["question"].split()
        assert int(row["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    assert rows == operand_problems(range(10, 100), range(10, 100))  # seeded: the same every time


def test_plan_takes_the_first_seeds_per_arm_and_a_generated_task_reads_its_file(tmp_path):
    harder = estimators.HARDER_TASK
    planned = plan_runs(tmp_path, SIZES["smoke"], [5, 6, 7, 8, 9, 10, 11, 12, 13], ["one_digit", harder],
                        ["krpo", "grpo", "rloo"], ["lora.r=4"])
    pairs = {(run.task, run.arm) for run in planned}
    assert [run.seed for run in planned if (run.task, run.arm) == ("one_digit", "krpo")] == [5, 6, 7, 8, 9, 10, 11, 12]
    assert [run.seed for run in planned if (run.task, run.arm) == (harder, "rloo")] == [5, 6, 7]
    assert ("one_digit", "dr_grpo") not in pairs  # not among the arms asked for
    run = next(run for run in planned if run.task == harder and run.arm == "rloo" and run.seed == 6)
    assert run.run_dir == tmp_path / harder / "rloo-seed6"
    assert "algorithm.advantage=rloo" in run.overrides and "lora.r=4" in run.overrides
    assert run.overrides[-2:] == ('run.name="rloo-seed6"', "run.seed=6")
    assert "data.source=file" in run.overrides and (tmp_path / "data" / f"{harder}.jsonl").is_file()

    from krpo_cli.recipe_loading import load_recipe

    recipe, _ = load_recipe(estimators.BASE_RECIPE, list(run.overrides))
    assert (recipe.run.seed, recipe.train.steps, recipe.eval.size) == (6, SIZES["smoke"].steps, SIZES["smoke"].eval_questions)
    assert Path(recipe.run.output_dir) / recipe.run.name == run.run_dir


def test_budget_arithmetic_by_hand():
    size = estimators.Size(steps=12, prompts_per_step=4, group_size=6, eval_questions=200, eval_every=5, save_every=3)
    # load 10 s + 288 completions × 11/32 s + 3 evaluations (steps 5, 10, 12) × 200 questions × 0.05 s
    assert estimators.estimated_seconds(size, 2) == pytest.approx(2 * (10 + 99 + 30))


def test_unknown_task_or_arm_is_one_line_and_exit_2(tmp_path, capsys):
    assert estimators.main(["--tasks", "one_digit,nope", "--out", str(tmp_path), "--plan"]) == 2
    assert "unknown 'nope'" in capsys.readouterr().out
    assert estimators.main(["--arms", "ppo", "--out", str(tmp_path), "--plan"]) == 2


# ---------------------------------------------------------------------------------------
# Skipping, resuming and the report, with a fake trainer

ACCURACY = {("krpo", 1): 0.5, ("krpo", 2): 0.7, ("krpo", 3): 0.6, ("grpo", 1): 0.4, ("grpo", 2): 0.5, ("grpo", 3): 0.6}


def planned_run(out: Path, task: str, arm: str, seed: int) -> estimators.PlannedRun:
    return estimators.plan_run(out, SIZES["smoke"], task, arm, seed, [])


def finish_fake_run(planned: estimators.PlannedRun, last: int | None = None) -> None:
    """What a run leaves: recipe.yaml, metrics.jsonl (held-out accuracy at the last step), adapter/."""
    run_dir, arm, seed, steps = planned.run_dir, planned.arm, planned.seed, planned.steps
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(planned.recipe, sort_keys=False))
    records = [{"step": step, "reward_mean": 0.1 * step} for step in range(1, (last or steps) + 1)]
    if last is None:
        records[-1]["eval/accuracy"] = ACCURACY.get((arm, seed), 0.3)
        (run_dir / "adapter").mkdir(exist_ok=True)
        (run_dir / "adapter" / "adapter_config.json").write_text("{}")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def fake_study(monkeypatch, tmp_path):
    """The study with train_run and evaluate_start replaced; returns (run it, the calls made)."""
    calls = []

    def fake_train(planned, state, console):
        calls.append((planned.arm, planned.seed, state))
        finish_fake_run(planned)

    monkeypatch.setattr(estimators, "train_run", fake_train)
    monkeypatch.setattr(estimators, "evaluate_start", lambda *args: None)
    base = ["--size", "smoke", "--tasks", "one_digit", "--arms", "krpo,grpo", "--seeds", "1,2,3", "--out", str(tmp_path)]
    return (lambda *more: estimators.main([*base, *more])), calls


def test_a_finished_run_is_skipped_on_a_rerun(fake_study, tmp_path):
    study, calls = fake_study
    assert study() == 0
    assert sorted(calls) == sorted((arm, seed, "new") for arm, seed in ACCURACY)
    calls.clear()
    assert study() == 0
    assert calls == []  # every run done: nothing trained again
    assert run_state(tmp_path / "one_digit" / "krpo-seed1", SIZES["smoke"].steps) == "done"


def test_an_interrupted_run_needs_resume_and_only_it_is_trained(fake_study, tmp_path):
    study, calls = fake_study
    steps = SIZES["smoke"].steps
    for arm, seed in ACCURACY:
        finish_fake_run(planned_run(tmp_path, "one_digit", arm, seed))
    interrupted = planned_run(tmp_path, "one_digit", "grpo", 2)
    finish_fake_run(interrupted, last=steps - 1)  # killed before its last step
    assert run_state(interrupted.run_dir, steps) == "started"
    assert study() == 2 and calls == []  # refused before training anything
    assert study("--resume") == 0
    assert calls == [("grpo", 2, "started")]


def test_a_run_trained_with_another_recipe_is_refused_not_counted(fake_study, tmp_path, capsys):
    study, calls = fake_study
    assert study() == 0
    changed = tmp_path / "one_digit" / "krpo-seed2" / "recipe.yaml"
    recipe = yaml.safe_load(changed.read_text())
    recipe["algorithm"]["kalman"]["adaptive"] = True  # e.g. an arm redefined since the run was trained
    changed.write_text(yaml.safe_dump(recipe))
    calls.clear()
    assert study("--report-only") == 2 and study() == 2 and calls == []
    out = capsys.readouterr().out
    assert "krpo-seed2' was trained with another recipe" in out and "algorithm.kalman.adaptive" in out


def test_a_warm_started_task_starts_from_the_warm_start_run_trained_first(fake_study, tmp_path, capsys):
    study, calls = fake_study
    task, arm, seed = estimators.WARM_START
    assert estimators.TASKS[estimators.HARDER_TASK].warm_start and not estimators.TASKS[task].warm_start
    adapter = (tmp_path / task / f"{arm}-seed{seed}" / "adapter").resolve()
    harder = planned_run(tmp_path, estimators.HARDER_TASK, "krpo", 3)
    assert harder.recipe["lora"]["init_from"] == str(adapter)
    assert planned_run(tmp_path, task, "krpo", 3).recipe["lora"]["init_from"] is None

    assert study("--tasks", estimators.HARDER_TASK, "--arms", "krpo", "--seeds", "3") == 0
    assert calls == [(arm, seed, "new"), ("krpo", 3, "new")]  # the warm start first, then the task's run
    printed = " ".join(capsys.readouterr().out.split())
    assert f"2 runs (one of them the warm start {task} · {arm} · seed {seed}), 0 done, 2 to train" in printed
    report = json.loads((tmp_path / "results.json").read_text())
    assert list(report["tasks"]) == [estimators.HARDER_TASK]  # the warm start is trained, not reported
    calls.clear()
    assert study("--tasks", task, "--arms", arm, "--seeds", str(seed)) == 0
    assert calls == []  # the warm start is that task's own run, already done
    both = plan_runs(tmp_path, SIZES["smoke"], [seed], [task, estimators.HARDER_TASK], [arm], [])
    assert estimators.warm_start_needed(tmp_path, SIZES["smoke"], both, []) == []  # planned anyway: not twice


def test_a_moved_study_folder_and_a_recipe_key_added_since_still_match(fake_study, tmp_path):
    study, calls = fake_study
    harder = estimators.HARDER_TASK
    assert study("--tasks", harder, "--arms", "krpo", "--seeds", "1") == 0
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    tmp_path.rename(moved)  # data.path and lora.init_from point into the old folder
    saved = moved / "one_digit" / "grpo-seed1" / "recipe.yaml"
    recipe = yaml.safe_load(saved.read_text())
    del recipe["algorithm"]["kalman"]["eps_placement"]  # as a recipe.yaml written before that key existed
    saved.write_text(yaml.safe_dump(recipe))
    calls.clear()
    argv = ["--size", "smoke", "--tasks", harder, "--arms", "krpo", "--seeds", "1", "--out", str(moved)]
    assert estimators.main(argv) == 0 and calls == []  # both runs still done, nothing refused or retrained


def test_the_warm_start_trains_first_whatever_the_order_of_tasks(fake_study, monkeypatch):
    study, _ = fake_study
    task, arm, seed = estimators.WARM_START
    trained = []

    def fake_train(planned, state, console):
        trained.append(planned.task)
        finish_fake_run(planned)

    monkeypatch.setattr(estimators, "train_run", fake_train)
    assert study("--tasks", f"{estimators.HARDER_TASK},{task}", "--arms", arm, "--seeds", str(seed)) == 0
    assert trained == [task, estimators.HARDER_TASK]  # the adapter it starts from exists before the harder task


def test_train_run_resumes_from_a_checkpoint_or_starts_over_without_one(monkeypatch, tmp_path):
    import krpo_cli.train

    seen = []
    monkeypatch.setattr(krpo_cli.train, "train", lambda recipe, text, **kw: seen.append(kw))
    planned = plan_runs(tmp_path, SIZES["smoke"], [1], ["one_digit"], ["krpo"], [])[0]
    planned.run_dir.mkdir(parents=True)
    estimators.train_run(planned, "started", QUIET)  # no checkpoint: start over in its own folder
    (planned.run_dir / "checkpoints" / "step_000001").mkdir(parents=True)
    estimators.train_run(planned, "started", QUIET)
    estimators.train_run(planned, "new", QUIET)
    assert [(kw.get("resume", False), kw.get("overwrite", False)) for kw in seen] == [(False, True), (True, False), (False, False)]


def test_report_has_each_seed_mean_std_and_the_paired_interval(fake_study, tmp_path):
    study, _ = fake_study
    assert study() == 0
    report = json.loads((tmp_path / "results.json").read_text())
    task = report["tasks"]["one_digit"]
    assert task["arms"]["krpo"]["accuracy_by_seed"] == {"1": 0.5, "2": 0.7, "3": 0.6}
    assert task["arms"]["krpo"]["accuracy"] == pytest.approx({"n": 3, "mean": 0.6, "std": 0.1})
    (krpo_grpo,) = task["comparisons"]
    assert (krpo_grpo["arm"], krpo_grpo["reference"], krpo_grpo["n"]) == ("krpo", "grpo", 3)
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert krpo_grpo["interval"] == pytest.approx([0.1 - half, 0.1 + half], abs=1e-6)
    table = (tmp_path / "results.md").read_text()
    assert "| krpo | 3 | 1: 0.500, 2: 0.700, 3: 0.600 | 0.600 ± 0.100 |" in table
    assert "| krpo − grpo | 3 | 0.100 | [-0.148, 0.348] |" in table
    assert (tmp_path / "curves-one_digit.png").stat().st_size > 0
    assert report["missing"] == []


def test_grid_names_known_tasks_and_arms():
    assert set(GRID) <= set(estimators.TASKS)
    assert all(set(arms) <= set(estimators.ARMS) for arms in GRID.values())
    assert GRID["one_digit"]["krpo"] >= 8 and GRID["one_digit"]["grpo"] >= 8
    assert GRID[estimators.HARDER_TASK]["krpo"] >= 8 and GRID[estimators.HARDER_TASK]["grpo"] >= 8


def test_smoke_study_end_to_end_with_a_tiny_model(tmp_path, tiny_model_dir, monkeypatch):
    args = ["--size", "smoke", "--tasks", "one_digit", "--arms", "krpo,grpo", "--seeds", "1", "--out", str(tmp_path),
            "--set", f"model.name_or_path={tiny_model_dir}", "--set", "lora.r=4", "--set", "lora.alpha=8",
            "--set", "train.steps=1", "--set", "generation.max_new_tokens=4"]
    assert estimators.main(args) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    arms = report["tasks"]["one_digit"]["arms"]
    assert set(arms) == {"krpo", "grpo"} and all(arm["accuracy"]["n"] == 1 for arm in arms.values())
    assert report["tasks"]["one_digit"]["base"]["questions"] == SIZES["smoke"].eval_questions
    assert (tmp_path / "curves-one_digit.png").is_file()

    import krpo_cli.train

    monkeypatch.setattr(krpo_cli.train, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert estimators.main(args) == 0

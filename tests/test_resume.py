"""Checkpoints and resumption: exact continuation, interruptions, kills mid-write."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from krpo_cli import train as train_module
from krpo_cli.run_dir import list_checkpoints
from krpo_cli.cli import app
from krpo_cli.config import Recipe
from krpo_cli.rewards import Grade
from conftest import read_jsonl, tiny_recipe, write_recipe

runner = CliRunner()
TIMING_KEYS = {"tokens_per_s", "rollout_seconds", "update_seconds", "step_seconds"}


def varied_grader(completion: str, reference: str) -> Grade:
    reward = (sum(map(ord, completion)) % 5) / 4 if completion else 0.0
    return Grade(reward, reward == 1.0, True, None)


def untimed(lines):
    return [{k: v for k, v in line.items() if k not in TIMING_KEYS} for line in lines]


def adapter_weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


class KilledAfterCheckpoint(Exception):
    pass


def stop_after_step_2(monkeypatch) -> None:
    """The run dies right after writing its step-2 checkpoint."""
    real_save = train_module.save_step

    def save_then_die(run, step):
        saved = real_save(run, step)
        if step == 2:
            raise KilledAfterCheckpoint
        return saved

    monkeypatch.setattr(train_module, "save_step", save_then_die)


@pytest.mark.parametrize(
    "optimizer, schedule",
    [("adamw", {}), ("paged_adamw_8bit", {}), ("adamw", {"lr_scheduler": "cosine", "warmup_steps": 1})],
)
def test_two_plus_two_steps_equal_four_bit_for_bit(tmp_path, tiny_model_dir, monkeypatch, optimizer, schedule):
    if optimizer != "adamw":
        pytest.importorskip("bitsandbytes")  # not installed on macOS
    monkeypatch.setattr(train_module, "get_grader", lambda name: varied_grader)

    def recipe(run: str, steps: int) -> Recipe:
        train = {"steps": steps, "optimizer": optimizer, **schedule}
        return Recipe.model_validate(tiny_recipe(tiny_model_dir, tmp_path / run, train=train, output={"save_every": 2}))

    full = train_module.train(recipe("a", 4))
    if schedule:  # a cosine schedule spans train.steps: the first half is a 4-step run killed after step 2
        stop_after_step_2(monkeypatch)
        with pytest.raises(KilledAfterCheckpoint):
            train_module.train(recipe("b", 4))
        monkeypatch.undo()
        monkeypatch.setattr(train_module, "get_grader", lambda name: varied_grader)
        resumed_dir = tmp_path / "b" / "tiny"
    else:  # train.steps raised on resume, as a user extends a run
        resumed_dir = train_module.train(recipe("b", 2))
    second_half = recipe("b", 4)
    assert train_module.train(second_half, resume=True) == resumed_dir

    a, b = adapter_weights(full), adapter_weights(resumed_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)
    assert untimed(read_jsonl(full / "metrics.jsonl")) == untimed(read_jsonl(resumed_dir / "metrics.jsonl"))
    assert read_jsonl(full / "samples.jsonl") == read_jsonl(resumed_dir / "samples.jsonl")
    assert [p.name for p in list_checkpoints(resumed_dir)] == ["step_000002", "step_000004"]


def test_non_empty_run_dir_names_both_options_and_bad_resumes_exit_2(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "runs", train={"steps": 1}))
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    again = runner.invoke(app, ["train", str(recipe)])
    assert again.exit_code == 2 and "--resume" in again.output and "--overwrite" in again.output
    changed = runner.invoke(app, ["train", str(recipe), "--resume", "train.learning_rate=0.5"])
    assert changed.exit_code == 2 and "train.learning_rate" in changed.output and "different recipe" in changed.output
    nothing = runner.invoke(app, ["train", str(recipe), "--resume-from", str(tmp_path)])
    assert nothing.exit_code == 2 and "not a krpo checkpoint" in nothing.output
    missing = runner.invoke(app, ["train", str(recipe), "--resume-from", str(tmp_path / "step_000009")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    more = runner.invoke(app, ["train", str(recipe), "--resume", "train.steps=2"])
    assert more.exit_code == 0, more.output
    assert "resumed from" in more.output and "done: 2 steps" in more.output
    run_dir = tmp_path / "runs" / "tiny"
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["train"]["steps"] == 2  # the resolved recipe is current
    fewer = runner.invoke(app, ["train", str(recipe), "--resume", "train.steps=1"])
    assert fewer.exit_code == 2 and "is at step 2, past train.steps=1" in fewer.output
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]


def test_another_runs_checkpoint_is_refused_with_the_command_that_continues_it(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "runs", train={"steps": 1}))
    assert runner.invoke(app, ["train", str(recipe), "run.name=first"]).exit_code == 0
    (checkpoint,) = list_checkpoints(tmp_path / "runs" / "first")
    # The other run's recipe differs (its data): resuming it under this recipe would mix the two runs.
    other = runner.invoke(app, ["train", str(recipe), "run.name=second", "data.source=arithmetic", "--resume-from", str(checkpoint)])
    assert other.exit_code == 2, other.output
    assert "is not a checkpoint of the run" in other.output
    assert f"krpo train {tmp_path / 'runs' / 'first' / 'recipe.yaml'} --resume-from" in " ".join(other.output.split())
    assert not (tmp_path / "runs" / "second").exists()


def test_an_abort_says_whether_a_checkpoint_can_resume(tmp_path, tiny_model_dir, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "runs", train={"steps": 1}))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # a second Ctrl+C, or one while the model loads

    monkeypatch.setattr(train_module, "train", interrupted)
    first = runner.invoke(app, ["train", str(recipe)])
    assert first.exit_code == 130 and "aborted; no checkpoint was written" in first.output
    monkeypatch.undo()
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    monkeypatch.setattr(train_module, "train", interrupted)
    later = runner.invoke(app, ["train", str(recipe), "--resume", "train.steps=3"])
    assert later.exit_code == 130
    assert f"the last checkpoint resumes with: krpo train {recipe} train.steps=3 --resume" in " ".join(later.output.split())


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "runs", train={"steps": 1}))
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    (checkpoint,) = list_checkpoints(tmp_path / "runs" / "tiny")
    (checkpoint / "adapter" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    result = runner.invoke(app, ["train", str(recipe), "--resume", "train.steps=2"])
    assert result.exit_code == 2 and "cannot be read" in result.output and "Traceback" not in result.output


def start_training(recipe: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "krpo_cli", "train", str(recipe)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def wait_for_checkpoint(run_dir: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list_checkpoints(run_dir):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


@pytest.mark.parametrize("delay", [0.0, 0.03, 0.11, 0.37])
def test_sigkill_at_any_point_leaves_a_resumable_run(tmp_path, tiny_model_dir, delay):
    """save_every=1, so a kill lands in a step or in a checkpoint write depending on the delay."""
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "runs", train={"steps": 40}, output={"save_every": 1})
    )
    run_dir = tmp_path / "runs" / "tiny"
    process = start_training(recipe)
    wait_for_checkpoint(run_dir, process)
    time.sleep(delay)
    process.kill()
    process.wait()
    result = runner.invoke(app, ["train", str(recipe), "--resume"])
    assert result.exit_code == 0, result.output
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 41))
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "partial checkpoints are cleaned up"


def test_sigkill_leftover_partial_checkpoint_is_ignored(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "runs", train={"steps": 2}, output={"save_every": 1}))
    assert runner.invoke(app, ["train", str(recipe), "train.steps=1"]).exit_code == 0
    partial = tmp_path / "runs" / "tiny" / "checkpoints" / ".tmp-step_000002-999"
    (partial / "adapter").mkdir(parents=True)  # what a kill during a write leaves behind
    (partial / "trainer_state.pt").write_bytes(b"half")
    result = runner.invoke(app, ["train", str(recipe), "--resume"])
    assert result.exit_code == 0, result.output
    assert "step 1 done" in result.output and not partial.exists()


def test_sigint_checkpoints_exits_130_and_resumes(tmp_path, tiny_model_dir):
    recipe = write_recipe(
        tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "runs", train={"steps": 400}, output={"save_every": 100})
    )
    run_dir = tmp_path / "runs" / "tiny"
    process = start_training(recipe)
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "--resume" in output and "Traceback" not in output
    (checkpoint,) = list_checkpoints(run_dir)
    stopped_at = int(checkpoint.name.split("_")[1])
    assert 1 <= stopped_at < 400
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, stopped_at + 1))
    resumed = runner.invoke(app, ["train", str(recipe), "--resume", "train.steps=" + str(stopped_at + 2)])
    assert resumed.exit_code == 0, resumed.output
    assert read_jsonl(run_dir / "metrics.jsonl")[-1]["step"] == stopped_at + 2


def test_a_key_added_to_krpo_after_the_run_started_does_not_block_resume(tmp_path, tiny_model_dir):
    """Runs saved before a recipe key existed resume if the key is at its default, and only then."""
    import yaml

    from krpo_cli.recipe_loading import recipe_to_yaml
    from krpo_cli.run_dir import CheckpointError, check_resumable

    recipe = Recipe.model_validate(tiny_recipe(tiny_model_dir, tmp_path))
    saved = yaml.safe_load(recipe_to_yaml(recipe))
    del saved["generation"]["engine"], saved["algorithm"]["kalman"]["scope"]  # as written by an older krpo
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(saved), encoding="utf-8")
    check_resumable(tmp_path, recipe)
    changed = Recipe.model_validate(tiny_recipe(tiny_model_dir, tmp_path, generation={"engine": "transformers"}))
    with pytest.raises(CheckpointError, match="generation.engine"):
        check_resumable(tmp_path, changed)


def test_resume_without_a_checkpoint_says_what_to_do(tmp_path):
    from krpo_cli.run_dir import CheckpointError, find_resume_checkpoint

    run_dir = tmp_path / "runs" / "new"
    with pytest.raises(CheckpointError, match="no run to resume.*run without --resume"):
        find_resume_checkpoint(run_dir, True)  # nothing there yet: just start it
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("")
    with pytest.raises(CheckpointError, match="no checkpoint to resume.*--overwrite"):
        find_resume_checkpoint(run_dir, True)  # a run that never saved one


def test_a_resume_on_changed_data_is_refused(tmp_path, tiny_model_dir):
    # The checkpoint's prompt order indexes the rows it was made on; other rows would silently be other prompts.
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(f'{{"question": "{i} + 1", "answer": "{i + 1}"}}\n' for i in range(8)), encoding="utf-8")
    settings = {"source": "file", "path": str(data), "test_size": 0}
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "runs", train={"steps": 1}, data=settings))
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    same = runner.invoke(app, ["train", str(recipe), "--resume", "train.steps=2"])
    assert same.exit_code == 0, same.output
    with data.open("a", encoding="utf-8") as f:
        f.write('{"question": "9 + 1", "answer": "10"}\n')
    changed = runner.invoke(app, ["train", str(recipe), "--resume", "train.steps=3"])
    assert changed.exit_code == 2 and "the training data differs from the data of the checkpoint" in changed.output


class StopAfterFirstStep(train_module.StopRequest):
    """As if Ctrl+C came during the first step of the run."""

    def __enter__(self):
        super().__enter__()
        self.signal = signal.SIGINT
        return self


def test_resume_from_an_earlier_checkpoint_sets_the_later_timeline_aside(tmp_path, tiny_model_dir, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(
        tiny_model_dir, tmp_path / "runs", train={"steps": 4}, output={"save_every": 2, "save_every_minutes": 0}))
    run_dir = tmp_path / "runs" / "tiny"
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    first_timeline = read_jsonl(run_dir / "metrics.jsonl")
    monkeypatch.setattr(train_module, "StopRequest", StopAfterFirstStep)
    earlier = runner.invoke(app, ["train", str(recipe), "--resume-from", str(run_dir / "checkpoints" / "step_000002")])
    assert earlier.exit_code == 130, earlier.output
    (aside,) = (run_dir / "checkpoints").glob("abandoned-*")
    assert str(aside) in " ".join(earlier.output.split())
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_000002", "step_000003"]
    assert (aside / "step_000004" / "trainer_state.pt").is_file() and (aside / "adapter").is_dir()
    assert not (run_dir / "adapter").exists()
    assert [m["step"] for m in read_jsonl(aside / "metrics.jsonl")] == [3, 4]  # the abandoned rows, kept
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert [s["step"] for s in read_jsonl(aside / "samples.jsonl")] == [3, 3, 4, 4]
    monkeypatch.undo()
    again = runner.invoke(app, ["train", str(recipe), "--resume"])
    assert again.exit_code == 0, again.output
    assert "step 3 done" in again.output  # the new timeline's checkpoint, not the abandoned step 4
    assert untimed(read_jsonl(run_dir / "metrics.jsonl")) == untimed(first_timeline)  # the same seed: the same steps


def test_an_incomplete_last_log_line_is_dropped_with_a_note(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "runs", train={"steps": 1}))
    run_dir = tmp_path / "runs" / "tiny"
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"step": 2, "reward_mean": 0.')  # a kill in the middle of writing step 2
    resumed = runner.invoke(app, ["train", str(recipe), "--resume", "train.steps=2"])
    assert resumed.exit_code == 0, resumed.output
    assert "metrics.jsonl: dropped an incomplete last line" in resumed.output
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]


def test_a_damaged_log_line_before_the_last_is_one_line_naming_it(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "runs", train={"steps": 2}))
    run_dir = tmp_path / "runs" / "tiny"
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text(lines[0][:20] + "\n" + lines[1] + "\n")
    result = runner.invoke(app, ["train", str(recipe), "--resume", "train.steps=3"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"'{run_dir / 'metrics.jsonl'}' line 1 is not a logged step" in " ".join(result.output.split())


@pytest.mark.parametrize("how", ["its recipe.yaml", "run.name and run.output_dir"])
def test_a_moved_and_renamed_run_resumes(tmp_path, tiny_model_dir, how):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "runs", train={"steps": 1}))
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    (tmp_path / "elsewhere").mkdir()
    moved = (tmp_path / "runs" / "tiny").rename(tmp_path / "elsewhere" / "renamed")
    if how == "its recipe.yaml":
        args = ["train", str(moved / "recipe.yaml"), "--resume", "train.steps=2"]
    else:
        args = ["train", str(recipe), "--resume", "train.steps=2", "run.name=renamed", f"run.output_dir={tmp_path / 'elsewhere'}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"resumed from {moved / 'checkpoints' / 'step_000001'}" in " ".join(result.output.split())
    assert [m["step"] for m in read_jsonl(moved / "metrics.jsonl")] == [1, 2]
    saved = yaml.safe_load((moved / "recipe.yaml").read_text())["run"]
    assert (saved["name"], saved["output_dir"]) == ("renamed", str(tmp_path / "elsewhere"))
    assert not (tmp_path / "runs" / "tiny").exists()


def test_a_changed_recipe_is_refused_with_the_command_that_continues_the_run(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "runs", train={"steps": 1}))
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    result = runner.invoke(app, ["train", str(recipe), "--resume", "train.learning_rate=0.5"])
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "--overwrite" not in message
    assert f"krpo train {tmp_path / 'runs' / 'tiny' / 'recipe.yaml'} --resume" in message


def file_hashes(folder: Path) -> dict:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_a_refused_resume_leaves_the_run_directory_byte_identical(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "runs", train={"steps": 1}))
    run_dir = tmp_path / "runs" / "tiny"
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    (checkpoint,) = list_checkpoints(run_dir)
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    del state["sampler"]
    torch.save(state, checkpoint / "trainer_state.pt")
    (run_dir / "checkpoints" / ".tmp-step_000002-999").mkdir()  # a kill's leftover stays too
    before = file_hashes(run_dir)
    result = runner.invoke(app, ["train", str(recipe), "--resume", "train.steps=2"])  # would rewrite recipe.yaml
    assert result.exit_code == 2 and "has no 'sampler' entry" in result.output, result.output
    assert file_hashes(run_dir) == before
    assert (run_dir / "checkpoints" / ".tmp-step_000002-999").is_dir()


def test_checkpoint_due_by_steps_or_by_rank_0s_clock():
    from types import SimpleNamespace

    from krpo_cli.distributed import DistributedContext

    def run(minutes: float, dist=None):
        recipe = Recipe.model_validate({"train": {"steps": 10}, "output": {"save_every": 4, "save_every_minutes": minutes}})
        return SimpleNamespace(recipe=recipe, dist=dist or DistributedContext.from_env())

    now = time.monotonic()
    assert train_module.checkpoint_due(run(10), 4, now) and train_module.checkpoint_due(run(10), 10, now)
    assert not train_module.checkpoint_due(run(10), 3, now)
    assert train_module.checkpoint_due(run(10), 3, now - 601)  # 10 minutes since the last checkpoint
    assert not train_module.checkpoint_due(run(0), 3, now - 10**6)  # 0: by steps only
    asked = []
    other_rank = SimpleNamespace(is_main=False, any=lambda flag: asked.append(flag) or False)
    assert not train_module.checkpoint_due(run(10, other_rank), 3, now - 601)  # its own clock does not decide
    assert asked == [False]  # every rank takes part in the collective, with rank 0's answer


def test_only_a_runs_own_recipe_yaml_follows_the_run(tmp_path, tiny_model_dir):
    from krpo_cli.run_dir import follow_moved_run

    recipe = Recipe.model_validate(tiny_recipe(tiny_model_dir, tmp_path / "runs"))
    folder = tmp_path / "project"
    (folder / "checkpoints" / "step_000001").mkdir(parents=True)
    (folder / "recipe.yaml").write_text("")
    assert follow_moved_run(str(folder / "recipe.yaml"), recipe, []) is recipe  # no run_info.json: a user's folder
    (folder / "run_info.json").write_text("{}")
    moved = follow_moved_run(str(folder / "recipe.yaml"), recipe, [])
    assert (moved.run.output_dir, moved.run.name) == (str(tmp_path), "project")
    assert follow_moved_run(str(folder / "recipe.yaml"), recipe, ["run.name=other"]) is recipe  # the user's choice wins

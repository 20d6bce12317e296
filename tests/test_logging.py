"""output.log_to: TensorBoard and W&B receive the numbers metrics.jsonl holds; missing packages fail early."""

import io
import sys
import types

import pytest
from typer.testing import CliRunner

from krpo_cli import train as train_module
from krpo_cli.cli import app
from krpo_cli.config import Recipe
from krpo_cli.run_log import LoggingBackendError, check_logging_backends, numeric_scalars
from krpo_cli.rewards import Grade
from conftest import read_jsonl, tiny_recipe, write_recipe

runner = CliRunner()


def varied_grader(completion: str, reference: str) -> Grade:
    reward = (sum(map(ord, completion)) % 5) / 4 if completion else 0.0
    return Grade(reward, reward == 1.0, True, None)


@pytest.fixture(autouse=True)
def graded(monkeypatch):
    monkeypatch.setattr(train_module, "get_grader", lambda name: varied_grader)


def tensorboard_scalars(log_dir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_numeric_scalars_keep_numbers_only():
    metrics = {"step": 3, "loss": 0.5, "skipped_updates": 1, "flag": True, "note": "x", "eval/accuracy": 0.25}
    assert numeric_scalars(metrics) == {"loss": 0.5, "skipped_updates": 1.0, "eval/accuracy": 0.25}


def test_tensorboard_scalars_equal_metrics_jsonl_and_resume_replaces_lost_steps(tmp_path, tiny_model_dir):
    recipe = Recipe.model_validate(
        tiny_recipe(tiny_model_dir, tmp_path, output={"log_to": ["tensorboard"], "save_every": 1})
    )
    run_dir = train_module.train(recipe)
    # As if the run had crashed after logging step 2 but before its checkpoint: go on from step 1.
    train_module.train(recipe, resume=str(run_dir / "checkpoints" / "step_000001"))

    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2, "the resumed run appends a file"
    for key in ("reward_mean", "loss", "step_seconds"):
        logged = tensorboard_scalars(run_dir / "tensorboard", key)
        # step_seconds differs between the two runs of step 2: only the resumed run's value may remain.
        assert [step for step, _ in logged] == [1, 2], key
        assert [value for _, value in logged] == pytest.approx([m[key] for m in metrics], rel=1e-6), key


class FakeWandb:
    """Records what krpo asks of the wandb package."""

    def __init__(self):
        self.inits, self.logged, self.finished = [], [], 0
        self.module = types.ModuleType("wandb")
        self.module.init = self.init

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            id = kwargs.get("id") or "run42"

            def log(self, data, step=None):
                fake.logged.append((step, dict(data)))

            def finish(self):
                fake.finished += 1

        return Run()


def test_wandb_gets_each_steps_numbers_and_resume_continues_its_run(tmp_path, tiny_model_dir, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake.module)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    sections = {"output": {"log_to": ["wandb"], "wandb_project": "arith"}}
    run_dir = train_module.train(Recipe.model_validate(tiny_recipe(tiny_model_dir, tmp_path, **sections)))

    (init,) = fake.inits
    assert (init["project"], init["name"], init["dir"], init["id"]) == ("arith", "tiny", str(run_dir), None)
    assert init["config"]["algorithm"]["advantage"] == "krpo"
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert fake.logged == [(m["step"], numeric_scalars(m)) for m in metrics]
    assert fake.finished == 1
    assert (run_dir / "wandb_run_id.txt").read_text().strip() == "run42"

    more = tiny_recipe(tiny_model_dir, tmp_path, train={"steps": 3}, **sections)
    train_module.train(Recipe.model_validate(more), resume=True)
    assert (fake.inits[1]["id"], fake.inits[1]["resume"]) == ("run42", "allow")
    assert [step for step, _ in fake.logged] == [1, 2, 3] and fake.finished == 2


def test_wandb_project_defaults_to_the_environment_then_krpo(tmp_path, tiny_model_dir, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake.module)
    monkeypatch.setenv("WANDB_PROJECT", "from-env")
    recipe = tiny_recipe(tiny_model_dir, tmp_path, train={"steps": 1}, output={"log_to": ["wandb"]})
    train_module.train(Recipe.model_validate(recipe))
    assert fake.inits[0]["project"] == "from-env"


def test_wandb_that_cannot_start_is_a_clear_error(tmp_path, tiny_model_dir, monkeypatch):
    module = types.ModuleType("wandb")

    def refuse(**kwargs):
        raise RuntimeError("api_key not configured (no-tty)")

    module.init = refuse
    monkeypatch.setitem(sys.modules, "wandb", module)
    recipe = tiny_recipe(tiny_model_dir, tmp_path, train={"steps": 1}, output={"log_to": ["wandb"]})
    with pytest.raises(LoggingBackendError, match="WANDB_MODE=offline"):
        train_module.train(Recipe.model_validate(recipe))


@pytest.mark.parametrize(
    "backend, hidden", [("wandb", ["wandb"]), ("tensorboard", ["tensorboard", "torch.utils.tensorboard"])]
)
def test_missing_backend_fails_before_loading_with_the_install_command(
    tmp_path, tiny_model_dir, monkeypatch, backend, hidden
):
    for name in hidden:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, backend, None)  # `import backend` now raises ImportError
    with pytest.raises(LoggingBackendError, match=f"pip install {backend}"):
        check_logging_backends([backend])

    recipe_dict = tiny_recipe(tiny_model_dir, tmp_path / "runs", output={"log_to": [backend]})
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict)
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2 and f"pip install {backend}" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists(), "nothing is written before the check"


def test_log_to_recipe_mistakes_are_recipe_errors():
    from pydantic import ValidationError

    for output in ({"log_to": ["tensorbord"]}, {"log_to": ["wandb", "wandb"]}, {"wandb_project": "p"}):
        with pytest.raises(ValidationError):
            Recipe.model_validate({"output": output})
    assert Recipe.model_validate({}).output.log_to == []


def test_counts_are_printed_with_their_noun_in_the_right_number():
    from krpo_cli.run_log import counted

    assert [counted(n, "step") for n in (0, 1, 2)] == ["0 steps", "1 step", "2 steps"]
    assert counted(1, "training row") == "1 training row" and counted(1500, "training row") == "1,500 training rows"


def test_the_eta_is_the_median_finished_step_times_the_steps_left():
    from krpo_cli.progress import eta_seconds, format_duration

    assert eta_seconds([], 10) is None  # nothing finished yet: no estimate
    assert eta_seconds([90.0, 30.0, 40.0], 5) == 200.0  # median 40 s × 5 (the slow first step does not count double)
    assert eta_seconds([30.0, 40.0], 3) == 105.0
    assert [format_duration(s) for s in (None, 0, 42, 725, 3723)] == ["…", "0:00", "0:42", "12:05", "1:02:03"]


def step_metrics_of(step: int) -> dict:
    return {"step": step, "reward_mean": 0.5123, "correct_frac": 0.4, "kl": 0.01234, "step_seconds": 33.9,
            "eval/accuracy": 0.25}


def show_three_slow_steps(console, total: int = 50) -> str:
    """Three steps of 34 s each (a clock that the test moves), as StepProgress prints them."""
    from krpo_cli.progress import StepProgress

    now = [1000.0]
    with StepProgress(console, total, clock=lambda: now[0]) as progress:
        for step in (1, 2, 3):
            now[0] += 34.0
            progress.update(step_metrics_of(step))
    return console.export_text()


@pytest.mark.parametrize("width", [80, 40])
def test_slow_steps_show_elapsed_and_eta_within_the_terminal_width(width):
    from rich.cells import cell_len
    from rich.console import Console

    rendered = show_three_slow_steps(Console(width=width, force_terminal=True, record=True))
    # the display is redrawn in place; its last frame is what stays on the screen
    frame = "train 3/50" + rendered.rsplit("train 3/50", 1)[1]
    lines = frame.rstrip("\n").split("\n")
    assert all(cell_len(line) <= width for line in lines), lines
    assert "1:42 elapsed" in lines[0] and "eta 26:38" in lines[0]  # 47 steps left × 34 s
    assert "reward 0.512" in frame and "correct 0.400" in frame
    if width == 80:
        assert len(lines) == 2 and "kl 0.012" in lines[1] and "eval acc 0.250" in lines[1]
        assert "━" * 10 in lines[0]  # a bar that still shows something


def test_a_log_that_is_not_a_terminal_gets_one_unwrapped_line_per_step():
    from rich.console import Console

    rendered = show_three_slow_steps(Console(width=40, force_terminal=False, record=True, file=io.StringIO()))
    assert rendered.splitlines() == [
        f"step {step}/50 · {elapsed} elapsed · eta {eta} · 33.9s/step · reward 0.512 · correct 0.400 · kl 0.012 · "
        "eval acc 0.250"
        for step, elapsed, eta in ((1, "0:34", "27:46"), (2, "1:08", "27:12"), (3, "1:42", "26:38"))
    ]


def test_training_log_lines_are_not_wrapped_on_a_narrow_console(tmp_path, tiny_model_dir, monkeypatch):
    from rich.console import Console

    from krpo_cli import cli

    monkeypatch.setattr(cli, "console", Console(width=40))  # not a terminal: a log, as in CI or a pipe
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "a-rather-long-folder-name"))
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "a-rather-long-folder-name" / "tiny"
    lines = result.output.splitlines()
    assert not any(line.startswith("loading model ") for line in lines)  # shown on a terminal only, while it loads
    assert any(line.startswith("krpo train") and line.endswith(f"run dir {run_dir}") for line in lines)
    assert [line.split(" · ")[0] for line in lines if line.startswith("step ")] == ["step 1/2", "step 2/2"]
    assert lines[-1].startswith("done: ") and lines[-1].endswith(f"adapter saved to {run_dir / 'adapter'}")

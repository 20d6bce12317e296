"""A full disk or a folder made read-only mid-run: one line that says what failed and what is safe
(the last good checkpoint), exit code 2, and nothing half-written left as if it were complete."""

import errno
import os

import pytest
import torch
from typer.testing import CliRunner

from krpo_cli import checkpoint as checkpoint_module
from krpo_cli import train as train_module
from krpo_cli.cli import app
from krpo_cli.run_dir import list_checkpoints
from krpo_cli.run_log import JsonlWriter
from conftest import make_adapter, read_jsonl, tiny_recipe, write_recipe

runner = CliRunner()


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.output
    return lines[-1]


@pytest.fixture
def two_step_recipe(tmp_path, tiny_model_dir):
    return write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "runs", output={"save_every": 1}))


def test_disk_full_during_a_checkpoint(two_step_recipe, tmp_path, monkeypatch):
    real_save = torch.save

    def full_at_step_2(obj, path, *args, **kwargs):
        if "step_000002" in str(path):
            disk_full()
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", full_at_step_2)
    run_dir = tmp_path / "runs" / "tiny"
    line = one_error_line(runner.invoke(app, ["train", str(two_step_recipe)]))
    assert "cannot write the checkpoint of step 2: No space left on device" in line
    assert f"the last good checkpoint is {run_dir / 'checkpoints' / 'step_000001'}" in line
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_000001"]
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "no half-written checkpoint stays behind"
    monkeypatch.undo()
    resumed = runner.invoke(app, ["train", str(two_step_recipe), "--resume"])
    assert resumed.exit_code == 0 and "step 1 done" in resumed.output, resumed.output


def test_disk_full_while_logging_a_step(two_step_recipe, tmp_path, monkeypatch):
    real_write = JsonlWriter.write

    def full_at_step_2(self, record):
        if record["step"] == 2:
            disk_full()
        real_write(self, record)

    monkeypatch.setattr(JsonlWriter, "write", full_at_step_2)
    line = one_error_line(runner.invoke(app, ["train", str(two_step_recipe)]))
    assert "cannot write the logs of step 2" in line and "No space left on device" in line
    assert "the last good checkpoint is" in line and line.endswith("step_000001; free space or fix the folder, then resume with --resume")


def test_disk_full_while_saving_the_adapter(two_step_recipe, tmp_path, monkeypatch):
    real_save = train_module.save_adapter

    def half_then_full(model, directory):
        real_save(model, directory)  # the files are there, but not all of them whole
        disk_full()

    monkeypatch.setattr(train_module, "save_adapter", half_then_full)
    run_dir = tmp_path / "runs" / "tiny"
    line = one_error_line(runner.invoke(app, ["train", str(two_step_recipe)]))
    assert f"cannot write the adapter '{run_dir / 'adapter'}': No space left on device" in line
    assert "step_000002" in line
    assert not (run_dir / "adapter").exists() and not list(run_dir.glob(".tmp-*")), "no adapter that looks complete"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_checkpoints_folder_made_read_only(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "runs", train={"steps": 1}))
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    checkpoints = tmp_path / "runs" / "tiny" / "checkpoints"
    checkpoints.chmod(0o555)
    try:
        line = one_error_line(runner.invoke(app, ["train", str(recipe), "--resume", "train.steps=2"]))
    finally:
        checkpoints.chmod(0o755)
    assert "cannot write the checkpoint of step 2: Permission denied" in line
    assert f"the last good checkpoint is {checkpoints / 'step_000001'}" in line
    assert [m["step"] for m in read_jsonl(tmp_path / "runs" / "tiny" / "metrics.jsonl")] == [1, 2]


def test_disk_full_while_writing_a_merged_model(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import PreTrainedModel

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    out = tmp_path / "merged"
    line = one_error_line(runner.invoke(app, ["merge", str(adapter), "--out", str(out)]))
    assert f"cannot write the merged model beside '{out}': No space left on device" in line
    assert "nothing was replaced" in line
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["adapter"], "no half-written model folder"


def test_disk_full_while_eval_writes_its_results(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(JsonlWriter, "write", disk_full)
    out = tmp_path / "eval-out"
    line = one_error_line(runner.invoke(app, ["eval", str(tiny_model_dir), "--limit", "2", "--max-new-tokens", "2",
                                              "--output", str(out)]))
    assert line.startswith(f"error: cannot write the results in '{out}': No space left on device")

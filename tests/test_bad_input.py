"""Every mistake a user can make ends in exit code 2 and one line that names it: no traceback,
and nothing half-written that gets in the way of the next run."""

import shutil

import pytest
from typer.testing import CliRunner

from krpo_cli.cli import app
from conftest import build_tiny_model, make_adapter, tiny_recipe, write_recipe

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir):
    """Files the cases point at: a trained run, a corrupt model, data files of all kinds."""
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.jsonl").write_text("")
    (root / "noanswer.jsonl").write_text('{"question": "1 + 1"}\n')
    (root / "latin1.jsonl").write_bytes('{"question": "caf\xe9", "answer": "1"}\n'.encode("latin-1"))
    (root / "a_file").write_text("x")
    corrupt = root / "corrupt-model"
    shutil.copytree(tiny_model_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    (root / "no-config").mkdir()
    other = build_tiny_model(root / "other-base", hidden_size=48)
    make_adapter(tiny_model_dir, root / "adapter")
    run = write_recipe(root / "run.yaml", tiny_recipe(tiny_model_dir, root / "runs", train={"steps": 1}))
    assert runner.invoke(app, ["train", str(run)]).exit_code == 0
    return {"root": root, "model": tiny_model_dir, "other": other, "run_recipe": run, "run_dir": root / "runs" / "tiny"}


def recipe_file(world, name, **sections):
    return str(write_recipe(world["root"] / f"{name}.yaml", tiny_recipe(world["model"], world["root"] / "fresh", **sections)))


def text_file(world, name, text):
    path = world["root"] / name
    path.write_text(text)
    return str(path)


CASES = {
    "malformed yaml": lambda w: (["validate", text_file(w, "m.yaml", "train: [1, 2\n")],
                                 "not valid YAML: line 2, column 1: expected ',' or ']', but got '<stream end>' "
                                 "(while parsing a flow sequence that starts at line 1, column 8)"),
    "recipe is a list": lambda w: (["validate", text_file(w, "l.yaml", "- a\n- b\n")], "must be a mapping"),
    "unknown key": lambda w: (["validate", recipe_file(w, "u", train={"warp": 9})], "train.warp: unknown key"),
    "misspelled key": lambda w: (["validate", recipe_file(w, "s", train={"learning_rat": 1})], "did you mean 'train.learning_rate'"),
    "wrong type": lambda w: (["validate", recipe_file(w, "t", train={"learning_rate": "fast"})], "train.learning_rate"),
    "group size 1": lambda w: (["validate", recipe_file(w, "g", algorithm={"group_size": 1})], "algorithm.group_size"),
    "zero prompts per step": lambda w: (["validate", recipe_file(w, "z", train={"prompts_per_step": 0})], "train.prompts_per_step"),
    "negative noise": lambda w: (["validate", recipe_file(w, "n", algorithm={"kalman": {"measurement_noise": -1}})], "algorithm.kalman.measurement_noise"),
    "minibatch larger than rollout": lambda w: (["validate", recipe_file(w, "mb", train={"minibatch_size": 99})], "larger than a rollout batch"),
    "recipe file missing": lambda w: (["train", str(w["root"] / "nope.yaml")], "no recipe file"),
    "malformed override": lambda w: (["validate", "quickstart", "train.steps"], "key.path=value"),
    "unknown override": lambda w: (["validate", "quickstart", "train.stepz=3"], "did you mean 'train.steps'"),
    "bad override value": lambda w: (["validate", "quickstart", "train.learning_rate=-1"], "set on the command line by 'train.learning_rate=-1'"),
    "bad value of a key overridden twice": lambda w: (["validate", "quickstart", "train.learning_rate=1", "train.learning_rate=-1"],
                                                      "set on the command line by 'train.learning_rate=-1'"),
    "misspelled section in an override": lambda w: (["validate", "quickstart", "trian.steps=3"],
                                                    "trian: unknown key (did you mean 'train'?), set on the command line by 'trian.steps=3'"),
    "misspelled recipe name": lambda w: (["validate", "quickstrat"], "did you mean 'quickstart'"),
    "brackets in what is quoted": lambda w: (["validate", "[bold]nope"], "no recipe file '[bold]nope'"),
    "unknown grader": lambda w: (["validate", "quickstart", "reward.grader=exactly"], "reward.grader"),
    "file source without path": lambda w: (["validate", "quickstart", "data.source=file"], "data.path is required"),
    "dataset file missing": lambda w: (["train", recipe_file(w, "d", data={"source": "file", "path": str(w["root"] / "none.jsonl")})], "does not exist"),
    "empty dataset": lambda w: (["train", recipe_file(w, "e", data={"source": "file", "path": str(w["root"] / "empty.jsonl")})], "is empty"),
    "rows without answer": lambda w: (["train", recipe_file(w, "r", data={"source": "file", "path": str(w["root"] / "noanswer.jsonl")})], "no field 'answer'"),
    "non-UTF-8 data": lambda w: (["train", recipe_file(w, "x", data={"source": "file", "path": str(w["root"] / "latin1.jsonl")})], "not UTF-8"),
    "hub id while offline": lambda w: (["train", recipe_file(w, "h", data={"source": "hub", "path": "openai/gsm8k"})], "data.source=file"),
    "model path missing": lambda w: (["train", recipe_file(w, "mp", model={"name_or_path": str(w["root"] / "no-model")})], "does not exist"),
    "model dir without config": lambda w: (["train", recipe_file(w, "mc", model={"name_or_path": str(w["root"] / "no-config")})], "no config.json"),
    "corrupt safetensors": lambda w: (["train", recipe_file(w, "cs", model={"name_or_path": str(w["root"] / "corrupt-model")})], "cannot load model"),
    "unwritable output dir": lambda w: (["train", recipe_file(w, "o", run={"output_dir": str(w["root"] / "a_file" / "runs")})], "cannot write the run directory"),
    "missing user grader": lambda w: (["train", recipe_file(w, "ug", reward={"grader": "nowhere_pkg.mod:grade"})], "nowhere_pkg.mod"),
    "run dir not empty": lambda w: (["train", str(w["run_recipe"])], "--overwrite"),
    "resume and overwrite": lambda w: (["train", str(w["run_recipe"]), "--resume", "--overwrite"], "contradict"),
    "nothing to resume": lambda w: (["train", recipe_file(w, "nr"), "--resume"], "no run to resume"),
    "incompatible checkpoint": lambda w: (["train", str(w["run_recipe"]), "--resume", "lora.r=8"], "different recipe"),
    "adapter for another base": lambda w: (["eval", str(w["other"]), "--adapter", str(w["root"] / "adapter"), "--limit", "1"], "does not fit"),
    "eval bad split": lambda w: (["eval", str(w["run_dir"]), "--data", "digits", "--split", "dev"], "unknown split"),
    "eval missing data": lambda w: (["eval", str(w["run_dir"]), "--data", str(w["root"] / "none.jsonl")], "does not exist"),
    "eval missing model": lambda w: (["eval", str(w["root"] / "no-such-model")], "does not exist"),
    "eval an adapter directory": lambda w: (["eval", str(w["root"] / "adapter")], "is a LoRA adapter, not a model"),
    "eval output under a file": lambda w: (["eval", str(w["run_dir"]), "--output", str(w["root"] / "a_file" / "out")],
                                           "cannot write the output directory"),
    "merge a plain directory": lambda w: (["merge", str(w["root"] / "no-config")], "neither a run directory"),
    "merge bad dtype": lambda w: (["merge", str(w["run_dir"]), "--dtype", "int8"], "--dtype"),
    "merge over its input": lambda w: (["merge", str(w["run_dir"]), "--out", str(w["run_dir"]), "--overwrite"], "would overwrite"),
    "arithmetic bad split": lambda w: (["data", "arithmetic", "--split", "dev"], "split"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_line(world, case):
    args, expected = CASES[case](world)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, f"{case}: exit {result.exit_code}\n{result.output}"
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, f"{case}: expected one line, got:\n{result.output}"
    assert expected in lines[0], f"{case}: {lines[0]!r} does not mention {expected!r}"
    assert not (world["root"] / "fresh" / "tiny").exists(), "a refused run leaves no run directory behind"


def test_corpus_is_large_enough():
    assert len(CASES) >= 25


def test_failed_eval_leaves_no_output_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a model given by name writes under ./runs/eval/
    (tmp_path / "runs").mkdir()
    result = runner.invoke(app, ["eval", "runs/quickstrat"])  # a mistyped run: a path, not a hub id
    assert result.exit_code == 2 and "model path 'runs/quickstrat' does not exist" in result.output, result.output
    assert list((tmp_path / "runs").iterdir()) == []

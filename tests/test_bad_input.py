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
    (root / "deep.jsonl").write_text('{"question": ' + "[" * 100_000 + "]" * 100_000 + ', "answer": "1"}\n')
    (root / "objects.jsonl").write_text('{"question": {"text": "1 + 1"}, "answer": "2"}\n' * 2 + '{"question": "1 + 1", "answer": [2]}\n')
    (root / "huge.jsonl").write_text(('{"question": "' + "1 + " * 25_000 + '1", "answer": "25001"}\n') * 3)
    corrupt = root / "corrupt-model"
    shutil.copytree(tiny_model_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    (root / "no-config").mkdir()
    other = build_tiny_model(root / "other-base", hidden_size=48)
    make_adapter(tiny_model_dir, root / "adapter")
    run = write_recipe(root / "run.yaml", tiny_recipe(tiny_model_dir, root / "runs", train={"steps": 1}))
    assert runner.invoke(app, ["train", str(run)]).exit_code == 0
    tampered = root / "tampered" / "tiny"  # a run whose saved recipe.yaml someone replaced
    shutil.copytree(root / "runs" / "tiny", tampered)
    (tampered / "recipe.yaml").write_text("run: " + "[" * 20000 + "]" * 20000 + "\n")
    return {"root": root, "model": tiny_model_dir, "other": other, "run_recipe": run, "run_dir": root / "runs" / "tiny",
            "tampered": tampered}


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
    # Folders krpo did not make are never replaced or written into, with or without --overwrite.
    "train --overwrite over a model": lambda w: (["train", recipe_file(w, "om", run={"output_dir": str(w["root"]), "name": "other-base"}),
                                                  "--overwrite"], "is not a run directory krpo made (it is a model)"),
    "merge --overwrite over a model": lambda w: (["merge", str(w["run_dir"]), "--out", str(w["other"]), "--overwrite"],
                                                 "is not a merged model krpo made (it is a model)"),
    "merge into the run's checkpoints": lambda w: (["merge", str(w["run_dir"]), "--out", str(w["run_dir"] / "checkpoints"), "--overwrite"],
                                                   "is inside the run"),
    "eval output is the run": lambda w: (["eval", str(w["run_dir"]), "--output", str(w["run_dir"])],
                                         "is not an eval folder krpo made (it is a run directory krpo made)"),
    "arithmetic bad split": lambda w: (["data", "arithmetic", "--split", "dev"], "split"),
    # Hostile YAML: each must finish, with one line and no RecursionError.
    "alias bomb": lambda w: (["validate", text_file(w, "bomb.yaml", ALIAS_BOMB)], "more than 100,000 values, counting each alias"),
    "20,000 nested brackets": lambda w: (["validate", text_file(w, "deep.yaml", "train: " + "[" * 20000 + "]" * 20000 + "\n")],
                                         "nested deeper than 32 levels"),
    "self-referencing alias": lambda w: (["validate", text_file(w, "self.yaml", "run: &a\n  name: *a\n")],
                                         "an alias refers to the value that contains it"),
    "key written twice": lambda w: (["validate", text_file(w, "twice.yaml", "train:\n  steps: 3\n  steps: 5\n")],
                                    "line 3, column 3: key 'steps' is written twice (first at line 2)"),
    "empty recipe": lambda w: (["validate", text_file(w, "empty.yaml", "")], "the recipe file is empty"),
    # Numbers: no infinity or NaN, no bool for a number, counts bounded.
    "infinite learning rate": lambda w: (["train", recipe_file(w, "inf"), "train.learning_rate=.inf"],
                                         "train.learning_rate: Input should be a finite number"),
    "NaN kalman init_mean": lambda w: (["train", recipe_file(w, "nan"), "algorithm.kalman.init_mean=.nan"],
                                       "algorithm.kalman.init_mean: Input should be a finite number"),
    "infinite kl_beta": lambda w: (["validate", "quickstart", "algorithm.kl_beta=.inf"], "algorithm.kl_beta: Input should be a finite number"),
    "infinite temperature": lambda w: (["validate", "quickstart", "generation.temperature=.inf"],
                                       "generation.temperature: Input should be a finite number"),
    "negative seed": lambda w: (["train", recipe_file(w, "ns"), "run.seed=-1"], "run.seed: Input should be greater than or equal to 0"),
    "seed 10**23": lambda w: (["train", recipe_file(w, "bs"), "run.seed=100000000000000000000000"], "run.seed: Input should be less than"),
    "negative --seeds": lambda w: (["train", recipe_file(w, "nss"), "--seeds", "-5"], "'-5' is not a seed"),
    "group size 10**23": lambda w: (["validate", "quickstart", "algorithm.group_size=100000000000000000000000"], "algorithm.group_size"),
    "LoRA rank 10**8": lambda w: (["validate", "quickstart", "lora.r=100000000"], "lora.r: Input should be less than or equal to 4096"),
    "max_new_tokens 10**9": lambda w: (["validate", "quickstart", "generation.max_new_tokens=1000000000"], "generation.max_new_tokens"),
    "prompts_per_step 10**9": lambda w: (["validate", "quickstart", "train.prompts_per_step=1000000000"], "train.prompts_per_step"),
    "steps true": lambda w: (["validate", "quickstart", "train.steps=true"], "train.steps: expected a number, not true/false"),
    # Run names and data that no file system or text encoding takes.
    "NUL in run.name": lambda w: (["train", recipe_file(w, "nul"), "run.name=a\0b"], "run.name: contains a NUL character"),
    "run.name of 300 characters": lambda w: (["train", recipe_file(w, "long"), "run.name=" + "x" * 300], "at most 100"),
    "deeply nested JSONL": lambda w: (["train", recipe_file(w, "dj", data={"source": "file", "path": str(w["root"] / "deep.jsonl")})],
                                      "line 1: JSON nested too deeply to read"),
    "questions that are objects": lambda w: (["train", recipe_file(w, "oq", data={"source": "file", "path": str(w["root"] / "objects.jsonl")})],
                                             "none of its 3 rows has both a question ('question') and an answer ('answer') as text"),
    "100 KB questions": lambda w: (["train", recipe_file(w, "kb", data={"source": "file", "path": str(w["root"] / "huge.jsonl")})],
                                   "no question of the training data fits the model's context"),
    "eval 100 KB questions": lambda w: (["eval", str(w["run_dir"]), "--data", str(w["root"] / "huge.jsonl")],
                                        "fits the model's context"),
    # Typer's own usage errors: one line too.
    "unknown option": lambda w: (["train", "quickstart", "--bogus"], "No such option: --bogus"),
    "option of the wrong type": lambda w: (["eval", str(w["run_dir"]), "--limit", "x"], "Invalid value for '--limit'"),
    # More hostile cases, beyond those reported: recipe, override, option and data inputs, and a tampered run folder.
    "recipe of comments only": lambda w: (["validate", text_file(w, "comments.yaml", "# train:\n#   steps: 3\n")], "the recipe file is empty"),
    "key twice in a flow mapping": lambda w: (["validate", text_file(w, "flow.yaml", "train: {steps: 1, steps: 2}\n")],
                                              "key 'steps' is written twice"),
    "alias bomb in an override": lambda w: (["validate", "quickstart", "data.filters=" + OVERRIDE_BOMB], "more than 100,000 values"),
    "true as a learning rate": lambda w: (["validate", "quickstart", "train.learning_rate=true"],
                                          "train.learning_rate: expected a number, not true/false"),
    "NUL in data.path": lambda w: (["validate", "quickstart", "data.source=file", "data.path=a\0b.jsonl"], "data.path: contains a NUL character"),
    "invalid UTF-8 in run.name": lambda w: (["train", recipe_file(w, "utf"), "run.name=caf\udce9"], "run.name: is not valid Unicode text"),
    "newline in run.name": lambda w: (["train", recipe_file(w, "nl"), "run.name=a\nb"], "run.name must be folder names"),
    "backslash in run.name": lambda w: (["train", recipe_file(w, "bsl"), "run.name=a\\b"], "run.name must be folder names"),
    "non-ASCII digit seed": lambda w: (["train", recipe_file(w, "ad"), "--seeds", "\u0663"], "is not a seed"),
    "seed with underscores": lambda w: (["train", recipe_file(w, "us"), "--seeds", "1_0"], "'1_0' is not a seed"),
    "option without its value": lambda w: (["data", "arithmetic", "--split"], "requires an argument"),
    "negative eval samples": lambda w: (["eval", str(w["run_dir"]), "--samples", "-1"], "Invalid value for '--samples'"),
    "compare a run with a tampered recipe.yaml": lambda w: (["compare", str(w["tampered"]), "--out", str(w["root"] / "c.png")],
                                                          "nested deeper than 32 levels"),
    "resume a run with a tampered recipe.yaml": lambda w: (["train", str(write_recipe(w["root"] / "tampered.yaml", tiny_recipe(
        w["model"], w["root"] / "tampered", train={"steps": 2}))), "--resume"], "is missing or unreadable"),
    "eval --max-new-tokens 10**9": lambda w: (["eval", str(w["run_dir"]), "--max-new-tokens", "1000000000"],
                                              "Invalid value for '--max-new-tokens'"),
    "eval --samples 10**9": lambda w: (["eval", str(w["run_dir"]), "--samples", "1000000000"], "Invalid value for '--samples'"),
    "system prompt of 200 KB": lambda w: (["train", recipe_file(w, "sp", data={"system_prompt": "Think. " * 30000})],
                                          "no question of the training data fits the model's context"),
    "huge wrong value": lambda w: (["validate", "quickstart", "train.steps=[" + ",".join(["7"] * 50000) + "]"],
                                   "…), set on the command line by 'train.steps=[7,7,7"),  # the value quoted short
}

# 444 bytes in the original report; 9 levels of 9 here (9**9 values when expanded).
ALIAS_BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]\n" for p, c in zip("abcdefgh", "bcdefghi")
)
OVERRIDE_BOMB = "{a: &a [1,1,1,1,1,1,1,1,1], " + ", ".join(
    f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]" for p, c in zip("abcdefg", "bcdefgh")
) + "}"


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


@pytest.fixture(scope="module")
def tampered_runs(tmp_path_factory, tiny_model_dir):
    """A trained run (LoRA r=4) and a rank-8 one, whose checkpoint adapter the tampered copies borrow."""
    root = tmp_path_factory.mktemp("tampered")
    for name, rank in (("r4", 4), ("r8", 8)):
        recipe = write_recipe(root / f"{name}.yaml", tiny_recipe(tiny_model_dir, root / "runs", run={"name": name},
                                                                 lora={"r": rank, "alpha": 2 * rank}, train={"steps": 1}))
        assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    return root


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def drop_state_entry(path, key):
    import torch

    state = torch.load(path, weights_only=True)
    del state[key]
    torch.save(state, path)


CHECKPOINT = "checkpoints/step_000001"
TAMPERED = {  # what is done to a copy of the r=4 run, the file the message names, what it says
    "checkpoint without trainer_state.pt": (lambda run, root: (run / CHECKPOINT / "trainer_state.pt").unlink(),
                                            f"{CHECKPOINT}/trainer_state.pt' is missing"),
    "trainer state without the sampler": (lambda run, root: drop_state_entry(run / CHECKPOINT / "trainer_state.pt", "sampler"),
                                          "has no 'sampler' entry"),
    "trainer state without the RNG": (lambda run, root: drop_state_entry(run / CHECKPOINT / "trainer_state.pt", "rng"),
                                      "has no 'rng' entry"),
    "truncated trainer state": (lambda run, root: truncate(run / CHECKPOINT / "trainer_state.pt"),
                                f"{CHECKPOINT}/trainer_state.pt' cannot be read, it is damaged"),
    "truncated checkpoint adapter": (lambda run, root: truncate(run / CHECKPOINT / "adapter/adapter_model.safetensors"),
                                     "adapter_model.safetensors' cannot be read, it is damaged"),
    "rank-8 adapter in a rank-4 checkpoint": (
        lambda run, root: shutil.copy(root / "runs/r8" / CHECKPOINT / "adapter/adapter_model.safetensors",
                                      run / CHECKPOINT / "adapter/adapter_model.safetensors"),
        "adapter_model.safetensors' does not fit this recipe's adapter"),
}


def file_hashes(folder):
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def assert_one_error_line(result, expected):
    """Exit 2 and one error line, the last (after what loaded: these are found once the model is up)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.output
    assert expected in lines[-1], result.output


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_a_tampered_checkpoint_is_one_line_and_changes_nothing(tampered_runs, case):
    tamper, expected = TAMPERED[case]
    run = tampered_runs / "cases" / case.replace(" ", "-")
    shutil.copytree(tampered_runs / "runs" / "r4", run)
    tamper(run, tampered_runs)
    before = file_hashes(run)
    result = runner.invoke(app, ["train", str(run / "recipe.yaml"), "--resume", "train.steps=2"])
    assert_one_error_line(result, expected)
    assert file_hashes(run) == before, "a refused resume leaves the run directory as it was"


@pytest.mark.parametrize("command", ["eval", "merge"])
def test_a_truncated_adapter_is_one_line_naming_the_file(tampered_runs, command, tmp_path):
    run = tmp_path / "r4"
    shutil.copytree(tampered_runs / "runs" / "r4", run)
    truncate(run / "adapter" / "adapter_model.safetensors")
    args = [command, str(run)] + (["--limit", "1"] if command == "eval" else [])
    assert_one_error_line(runner.invoke(app, args), f"the adapter file '{run / 'adapter' / 'adapter_model.safetensors'}' is damaged")

"""krpo never deletes or overwrites what it did not make: `--overwrite` of train and merge replaces
only krpo's own runs and merged models, and `krpo eval` writes only into its own folders and never
silently over the results of another evaluation. Each refusal is exit 2 with one line, and the
user's files survive it."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from krpo_cli.cli import app
from krpo_cli.config import Recipe
from krpo_cli.eval_output import key_differences, output_suffix
from krpo_cli.evaluate import resolve_target
from krpo_cli.run_dir import MARKER, RunDirError, not_own_output, prepare_run_dir, read_marker
from conftest import make_adapter, tiny_recipe, write_recipe

runner = CliRunner()


def refusal(result) -> str:
    """The one line of a refused command (exit 2, no traceback)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def plant_user_files(folder):
    """A folder with a user's files in it (and in a subfolder)."""
    (folder / "photos").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "photos" / "cat.jpg").write_bytes(b"\xff\xd8cat")
    return folder


def snapshot(folder) -> dict:
    """Every file under `folder` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A real one-step run: runs/tiny with adapter/, checkpoints/ and samples.jsonl."""
    root = tmp_path_factory.mktemp("own")
    recipe = write_recipe(root / "r.yaml", tiny_recipe(tiny_model_dir, root / "runs", train={"steps": 1}))
    result = runner.invoke(app, ["train", str(recipe)])
    assert result.exit_code == 0, result.output
    return root / "runs" / "tiny"


# ---------------------------------------------------------------------------------------
# krpo train --overwrite

def test_train_overwrite_never_deletes_a_home_folder(tmp_path, tiny_model_dir):
    home = plant_user_files(tmp_path / "home" / "alice")
    before = snapshot(home)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "home"))
    for flags in (["--overwrite"], []):
        line = refusal(runner.invoke(app, ["train", str(recipe), "run.name=alice", *flags]))
        assert "is not a run directory krpo made (it holds 'notes.txt', 'photos')" in line
        assert "choose another run.name or run.output_dir, or remove the folder yourself" in line
        assert "--overwrite" not in line  # it would not help
    assert snapshot(home) == before


def legacy_run(folder):
    """A run as krpo wrote it before markers: no .krpo, krpo's names only."""
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    (folder / "checkpoints" / "step_000001").mkdir(parents=True)
    (folder / "eval").mkdir()
    (folder / "eval" / "results.json").write_text(json.dumps({"metrics": {}, "settings": {}}))
    for name in ("recipe.yaml", "recipe.original.yaml", "metrics.jsonl", "samples.jsonl"):
        (folder / name).write_text("{}\n")
    (folder / "run_info.json").write_text(json.dumps({"quantization": "none", "dtype": "float32", "device": "cpu"}))
    return folder


def marked(folder, kind):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(json.dumps({"made_by": "krpo", "kind": kind, "version": "0.1.0"}))
    return folder


DECOYS = {
    # what the folder holds → what the refusal says
    "a krpo run with the user's notes added": (lambda f: plant_user_files(legacy_run(f)), "'notes.txt', 'photos'"),
    "a marked run with the user's notes added": (lambda f: plant_user_files(marked(f, "run")), "'notes.txt', 'photos'"),
    "run files but no run_info.json": (lambda f: (legacy_run(f) / "run_info.json").unlink() or f, "it is a run directory"),
    "the user's own recipe.yaml and run_info.json": (lambda f: user_files_named_like_a_run(f), "it is a run directory"),
    "a merged model krpo made": (lambda f: marked(f, "merged model"), "it is a merged model krpo made"),
    "an adapter": (lambda f: make_adapter_files(f), "it is a LoRA adapter"),
    "an eval folder named like the user's": (lambda f: plant_user_files(f / "eval") and f, "'eval'"),
}


def user_files_named_like_a_run(folder):
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text("title: my cake recipe\n")
    (folder / "run_info.json").write_text('{"distance_km": 10}')
    return folder


def make_adapter_files(folder):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    return folder


@pytest.mark.parametrize("case", sorted(DECOYS))
def test_train_overwrite_refuses_what_only_looks_like_a_run(tmp_path, tiny_model_dir, case):
    build, said = DECOYS[case]
    run_dir = build(tmp_path / "runs" / "tiny")
    before = snapshot(run_dir)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "runs"))
    line = refusal(runner.invoke(app, ["train", str(recipe), "--overwrite"]))
    assert f"'{run_dir}' is not a run directory krpo made" in line and said in line, line
    assert snapshot(run_dir) == before


def test_prepare_run_dir_checks_again_before_deleting(tmp_path):
    decoy = plant_user_files(tmp_path / "decoy")
    with pytest.raises(RunDirError, match="is not a run directory krpo made"):
        prepare_run_dir(decoy, Recipe(), "")
    assert (decoy / "notes.txt").read_text() == "my notes"


def test_train_overwrite_replaces_krpo_runs_old_and_new(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "runs", train={"steps": 1}))
    run_dir = legacy_run(tmp_path / "runs" / "tiny")
    (run_dir / "eval-base").mkdir()  # an eval folder a crash left empty
    result = runner.invoke(app, ["train", str(recipe), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (run_dir / "eval").exists() and read_marker(run_dir)["kind"] == "run"
    (run_dir / "eval").mkdir()  # and a run this krpo made, with an eval folder in it
    (run_dir / "eval" / MARKER).write_text(json.dumps({"made_by": "krpo", "kind": "eval"}))
    assert runner.invoke(app, ["train", str(recipe), "--overwrite"]).exit_code == 0
    assert not (run_dir / "eval").exists()


def test_train_seeds_overwrite_refuses_a_decoy_before_any_seed_trains(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path / "runs"))
    decoy = plant_user_files(tmp_path / "runs" / "tiny-seed2")
    before = snapshot(decoy)
    line = refusal(runner.invoke(app, ["train", str(recipe), "--seeds", "1,2", "--overwrite"]))
    assert "tiny-seed2' is not a run directory krpo made" in line
    assert snapshot(decoy) == before and not (tmp_path / "runs" / "tiny-seed1").exists()


def test_what_counts_as_krpo_output(tmp_path):
    assert not_own_output(legacy_run(tmp_path / "old"), "run") is None
    (tmp_path / "old" / "merged.tmp").mkdir()  # where an earlier krpo merge staged its model
    assert not_own_output(tmp_path / "old", "run") is None
    marked(tmp_path / "old" / "nested", "run")  # run.name=old/nested: another run, not replaced with this one
    assert not_own_output(tmp_path / "old", "run") == "it holds what krpo did not write there: 'nested'"
    assert not_own_output(marked(tmp_path / "new", "run"), "run") is None
    assert not_own_output(marked(tmp_path / "m", "merged model"), "run") == "it is a merged model krpo made"
    (tmp_path / "empty").mkdir()
    assert not_own_output(tmp_path / "empty", "merged model") is None
    assert not_own_output(plant_user_files(tmp_path / "user"), "eval") == "it holds 'notes.txt', 'photos'"


# ---------------------------------------------------------------------------------------
# krpo merge --out … --overwrite

def test_merge_overwrite_never_deletes_a_folder_that_is_not_a_model_it_made(tmp_path, trained):
    decoy = plant_user_files(tmp_path / "Documents")
    before = snapshot(decoy)
    line = refusal(runner.invoke(app, ["merge", str(trained), "--out", str(decoy), "--overwrite"]))
    assert f"'{decoy}' is not a merged model krpo made (it holds 'notes.txt', 'photos')" in line
    assert "choose another --out, or remove the folder yourself" in line
    assert snapshot(decoy) == before


@pytest.mark.parametrize("inside", ["checkpoints", "adapter", "new-folder", "merged/sub"])
def test_merge_out_inside_the_run_is_refused(trained, inside):
    before = snapshot(trained)
    line = refusal(runner.invoke(app, ["merge", str(trained), "--out", str(trained / inside), "--overwrite"]))
    assert "would overwrite the adapter or run" in line or f"is inside the run '{trained}'" in line, line
    assert snapshot(trained) == before


def test_merge_out_inside_another_run_is_refused(tmp_path, trained):
    other = marked(tmp_path / "runs" / "other", "run")
    for out in (other / "merged", other / "checkpoints" / "x"):
        line = refusal(runner.invoke(app, ["merge", str(trained), "--out", str(out)]))
        assert f"is inside the run '{other}', which holds only its own merged model" in line
    assert sorted(p.name for p in other.iterdir()) == [MARKER]


def test_merge_out_inside_the_adapter_is_refused(tmp_path, tiny_model_dir):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    before = snapshot(adapter)
    line = refusal(runner.invoke(app, ["merge", str(adapter), "--out", str(adapter / "merged")]))
    assert "is inside the adapter it merges" in line
    assert snapshot(adapter) == before


def test_merge_replaces_only_a_model_it_merged(tmp_path, tiny_model_dir):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    out = tmp_path / "model"
    beside = plant_user_files(tmp_path / "model.tmp")  # the name a merge once used for its staging folder
    assert runner.invoke(app, ["merge", str(adapter), "--out", str(out)]).exit_code == 0
    assert read_marker(out)["kind"] == "merged model" and "model.safetensors" in read_marker(out)["files"]
    assert "pass --overwrite to replace it" in refusal(runner.invoke(app, ["merge", str(adapter), "--out", str(out)]))
    evaluated = runner.invoke(app, ["eval", str(out), "--limit", "1", "--max-new-tokens", "2"])  # writes out/eval
    assert evaluated.exit_code == 0, evaluated.output
    assert runner.invoke(app, ["merge", str(adapter), "--out", str(out), "--overwrite"]).exit_code == 0

    (out / "notes.txt").write_text("mine")
    line = refusal(runner.invoke(app, ["merge", str(adapter), "--out", str(out), "--overwrite"]))
    assert "it holds what krpo did not write there: 'notes.txt'" in line
    assert (out / "notes.txt").read_text() == "mine"
    assert snapshot(beside) == {"notes.txt": b"my notes", "photos/cat.jpg": b"\xff\xd8cat"}
    assert not list(tmp_path.glob(".model.tmp-*")), "no staging folder is left behind"


def test_merge_overwrite_replaces_a_model_merged_before_markers(tmp_path, tiny_model_dir):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    out = tmp_path / "model"
    assert runner.invoke(app, ["merge", str(adapter), "--out", str(out)]).exit_code == 0
    (out / MARKER).unlink()
    assert runner.invoke(app, ["merge", str(adapter), "--out", str(out), "--overwrite"]).exit_code == 0
    (out / MARKER).unlink()
    (out / "merge_info.json").write_text("{}")  # not krpo's merge_info.json: not recognised
    assert "is not a merged model krpo made" in refusal(
        runner.invoke(app, ["merge", str(adapter), "--out", str(out), "--overwrite"])
    )


# ---------------------------------------------------------------------------------------
# krpo eval --output

def test_eval_output_is_never_a_run_checkpoint_adapter_or_model(tmp_path, trained, tiny_model_dir):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    checkpoint = next((trained / "checkpoints").iterdir())
    cases = {
        trained: "it is a run directory krpo made",
        checkpoint: "it is a training checkpoint",
        trained / "adapter": "it is a LoRA adapter",
        model: "it is a model",
        plant_user_files(tmp_path / "mine"): "it holds 'notes.txt', 'photos'",
    }
    for folder, said in cases.items():
        before = snapshot(folder)
        line = refusal(runner.invoke(app, ["eval", str(trained), "--output", str(folder), "--limit", "1"]))
        assert f"'{folder}' is not an eval folder krpo made ({said}), so it is not written into" in line, line
        assert snapshot(folder) == before


def test_eval_never_silently_replaces_another_evaluation(tmp_path, trained):
    out = tmp_path / "ev"
    first = ["eval", str(trained), "--output", str(out), "--limit", "2", "--max-new-tokens", "2"]
    assert runner.invoke(app, first).exit_code == 0
    assert read_marker(out)["kind"] == "eval"
    assert runner.invoke(app, first).exit_code == 0, "the same evaluation again replaces its own results"
    before = snapshot(out)
    line = refusal(runner.invoke(app, [*first[:-4], "--limit", "3", "--max-new-tokens", "2"]))
    assert f"'{out / 'results.json'}' holds the results of another evaluation (it differs in limit)" in line
    assert "pass --output DIR to keep both, or --overwrite to replace them" in line
    assert snapshot(out) == before
    assert runner.invoke(app, [*first[:-4], "--limit", "3", "--max-new-tokens", "2", "--overwrite"]).exit_code == 0
    assert json.loads((out / "results.json").read_text())["num_questions"] == 3


def test_eval_results_written_before_keys_are_compared_by_what_they_hold(tmp_path, trained):
    out = tmp_path / "old-eval"
    out.mkdir()
    earlier = {"metrics": {}, "settings": {"samples": 0, "max_new_tokens": 5, "seed": 7}, "dataset": "digits (test)"}
    (out / "results.json").write_text(json.dumps(earlier))
    line = refusal(runner.invoke(app, ["eval", str(trained), "--output", str(out), "--limit", "1", "--max-new-tokens", "2"]))
    assert "(it differs in max_new_tokens)" in line
    result = runner.invoke(app, ["eval", str(trained), "--output", str(out), "--limit", "1", "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output


def test_eval_default_folders_differ_by_data_recipe_and_split(tmp_path, trained):
    def out(**kw):
        return resolve_target(str(trained), None, kw.pop("recipe", None), False, None, **kw).output_dir

    assert out() == trained / "eval"
    assert out(data="digits") == trained / "eval-on-digits"
    assert out(data=str(tmp_path / "mine.jsonl"), split="train") == trained / "eval-on-mine-train"
    assert out(recipe="quickstart", data="arithmetic-easy") == trained / "eval-with-quickstart-on-arithmetic-easy"
    assert output_suffix(None, None, "train") == "-on-train"

    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i} + 1", "answer": str(i + 1)}) + "\n" for i in range(2)))
    assert runner.invoke(app, ["eval", str(trained), "--limit", "1", "--max-new-tokens", "2"]).exit_code == 0
    before = snapshot(trained / "eval")
    result = runner.invoke(app, ["eval", str(trained), "--data", str(data), "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads((trained / "eval-on-mine" / "results.json").read_text())["dataset"] == str(data)
    assert snapshot(trained / "eval") == before


def test_key_differences_compare_what_both_keys_hold(tmp_path):
    assert key_differences({"limit": 2, "model": "m"}, {"limit": 3, "model": "m", "samples": 0}) == ["limit"]
    (tmp_path / "a").mkdir()
    assert key_differences({"adapter": str(tmp_path / "a")}, {"adapter": str(tmp_path / "." / "a")}) == []

"""A recipe krpo reads from a folder (a run's, an adapter's run's, a merged model's) never runs code:
neither the model's own Python (model.trust_remote_code) nor a user grader's module. Only the user's
command line (--trust-remote-code, key=value overrides) or the recipe file they name may ask for it."""

import json
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from krpo_cli.cli import app
from krpo_cli.config import RecipeError
from krpo_cli.evaluate import resolve_target
from krpo_cli.trust import UntrustedSettingError
from conftest import make_adapter, tiny_recipe, write_recipe

runner = CliRunner()
GRADER = "shared_grader_mod:score"


@pytest.fixture
def grader_module(tmp_path, monkeypatch):
    """A grader module on sys.path that leaves a marker file when it is imported."""
    marker = tmp_path / "grader-imported"
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    code += "def score(completion, reference):\n    return 1.0\n\ndef raises(completion, reference):\n    raise KeyError('boom')\n"
    (tmp_path / "shared_grader_mod.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop("shared_grader_mod", None)


def shared_model(folder: Path, tiny_model_dir: Path, recipe: dict, remote_code_marker: Path | None = None) -> Path:
    """A merged model as someone might share it: weights, krpo_recipe.yaml and, with a marker, Python
    code that its config.json asks transformers to run (writing the marker when it is imported)."""
    shutil.copytree(tiny_model_dir, folder)
    write_recipe(folder / "krpo_recipe.yaml", recipe)
    if remote_code_marker is not None:
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"] = {"AutoConfig": "shipped.Config", "AutoModelForCausalLM": "shipped.Model"}
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "shipped.py").write_text(
            f"import pathlib\npathlib.Path({str(remote_code_marker)!r}).write_text('ran')\n"
            "from transformers import LlamaConfig as Config, LlamaForCausalLM as Model\n"
        )
    return folder


def fake_run_dir(directory: Path, recipe: dict) -> Path:
    (directory / "adapter").mkdir(parents=True)
    (directory / "adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
    write_recipe(directory / "recipe.yaml", recipe)
    return directory


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    return " ".join(result.output.split())


def test_eval_of_a_shared_model_does_not_run_its_code(tmp_path, tiny_model_dir):
    marker = tmp_path / "remote-code-ran"
    model = shared_model(tmp_path / "shared", tiny_model_dir, tiny_recipe(tiny_model_dir, tmp_path, model={"trust_remote_code": True}), marker)
    out = tmp_path / "out"
    result = runner.invoke(app, ["eval", str(model), "--limit", "1", "--max-new-tokens", "2", "--output", str(out)])
    message = one_line_error(result)
    assert "sets model.trust_remote_code: true" in message and "pass --trust-remote-code" in message
    assert not marker.exists() and not out.exists()


def test_eval_of_a_shared_model_does_not_import_its_grader_until_named(tmp_path, tiny_model_dir, grader_module):
    model = shared_model(tmp_path / "shared", tiny_model_dir, tiny_recipe(tiny_model_dir, tmp_path, reward={"grader": GRADER}))
    out = tmp_path / "out"
    args = ["eval", str(model), "--limit", "1", "--max-new-tokens", "2", "--output", str(out)]
    message = one_line_error(runner.invoke(app, args))
    assert f"names the user grader '{GRADER}'" in message and f"pass reward.grader={GRADER}" in message
    assert not grader_module.exists() and "shared_grader_mod" not in sys.modules and not out.exists()

    named = runner.invoke(app, [*args, f"reward.grader={GRADER}"])  # the user names it: it is used
    assert named.exit_code == 0, named.output
    assert json.loads((out / "results.json").read_text())["settings"]["grader"] == GRADER
    assert "with command-line overrides" in named.output

    raising = runner.invoke(app, [*args[:-1], str(tmp_path / "out2"), "reward.grader=shared_grader_mod:raises"])
    assert raising.exit_code == 2 and "Traceback" not in raising.output
    assert raising.output.strip().splitlines()[-1] == "error: user grader 'shared_grader_mod:raises' raised KeyError: 'boom'"


def test_every_folder_recipe_is_checked_and_the_user_may_allow(tmp_path, tiny_model_dir):
    both = tiny_recipe(tiny_model_dir, tmp_path, model={"trust_remote_code": True}, reward={"grader": GRADER})
    run = fake_run_dir(tmp_path / "run", both)
    merged = tmp_path / "merged"
    merged.mkdir()
    write_recipe(merged / "krpo_recipe.yaml", both)
    allow = [f"reward.grader={GRADER}"]
    for target, adapter in [(str(run), None), ("some-model", str(run / "adapter")), (str(merged), None)]:
        with pytest.raises(UntrustedSettingError, match="model.trust_remote_code"):
            resolve_target(target, adapter, None, False, None)
        with pytest.raises(UntrustedSettingError, match=f"user grader '{GRADER}'"):
            resolve_target(target, adapter, None, False, None, trust_remote_code=True)
        with pytest.raises(UntrustedSettingError, match="model.trust_remote_code"):
            resolve_target(target, adapter, None, False, None, allow)
        for overrides, trust in [(allow, True), ([*allow, "model.trust_remote_code=true"], False)]:
            chosen = resolve_target(target, adapter, None, False, None, overrides, trust)
            assert chosen.recipe.model.trust_remote_code and chosen.recipe.reward.grader == GRADER
        assert not resolve_target(target, adapter, None, False, None, [*allow, "model.trust_remote_code=false"]).recipe.model.trust_remote_code


def test_a_recipe_the_user_names_may_ask_for_code(tmp_path, tiny_model_dir):
    run = fake_run_dir(tmp_path / "run", tiny_recipe(tiny_model_dir, tmp_path, model={"trust_remote_code": True}))
    plain = write_recipe(tmp_path / "plain.yaml", tiny_recipe(tiny_model_dir, tmp_path, reward={"grader": GRADER}))
    trusting = write_recipe(tmp_path / "trusting.yaml", tiny_recipe(tiny_model_dir, tmp_path, model={"trust_remote_code": True}))
    # On a run, --recipe gives everything but the model: the run's trust_remote_code still needs the user's word.
    with pytest.raises(UntrustedSettingError, match="model.trust_remote_code"):
        resolve_target(str(run), None, str(plain), False, None)
    assert resolve_target(str(run), None, str(plain), False, None, trust_remote_code=True).recipe.reward.grader == GRADER
    assert resolve_target(str(run), None, str(trusting), False, None).recipe.model.trust_remote_code
    user_own = resolve_target("some-model", None, str(trusting), False, None, [f"reward.grader={GRADER}"])
    assert user_own.recipe.model.trust_remote_code and user_own.recipe.reward.grader == GRADER


def test_eval_overrides_apply_to_the_recipe_it_uses(tmp_path, tiny_model_dir):
    run = fake_run_dir(tmp_path / "run", tiny_recipe(tiny_model_dir, tmp_path))
    chosen = resolve_target(str(run), None, None, False, None, ["generation.max_new_tokens=3", "data.prompt_template=Q: {question}"])
    assert chosen.recipe.generation.max_new_tokens == 3 and chosen.recipe.data.prompt_template == "Q: {question}"
    assert chosen.recipe.reward.grader == "last_number"  # the rest is the run's
    assert chosen.recipe_source == f"{run / 'recipe.yaml'} with command-line overrides"
    assert resolve_target("m", None, None, False, None, ["reward.grader=numeric"]).recipe.reward.grader == "numeric"
    with pytest.raises(RecipeError) as raised:
        resolve_target(str(run), None, None, False, None, ["generation.max_new_tokns=3"])
    assert "set on the command line by 'generation.max_new_tokns=3'" in raised.value.problems[0]


def test_merge_does_not_run_code_a_runs_recipe_asks_for(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    make_adapter(tiny_model_dir, run / "adapter")
    write_recipe(run / "recipe.yaml", tiny_recipe(tiny_model_dir, tmp_path, model={"trust_remote_code": True}))
    message = one_line_error(runner.invoke(app, ["merge", str(run), "--dtype", "float32"]))
    assert "sets model.trust_remote_code: true" in message and "pass --trust-remote-code" in message
    assert not (run / "merged").exists()
    trusted = runner.invoke(app, ["merge", str(run), "--dtype", "float32", "--trust-remote-code"])
    assert trusted.exit_code == 0, trusted.output
    assert (run / "merged" / "krpo_recipe.yaml").is_file()


def test_a_grader_among_weighted_graders_is_checked_too(tmp_path, tiny_model_dir):
    weighted = {"graders": {"numeric": 1.0, GRADER: 0.5}}
    merged = tmp_path / "merged"
    merged.mkdir()
    write_recipe(merged / "krpo_recipe.yaml", tiny_recipe(tiny_model_dir, tmp_path, reward=weighted))
    with pytest.raises(UntrustedSettingError, match=f"user grader '{GRADER}'"):
        resolve_target(str(merged), None, None, False, None)
    for named in ([f"reward.grader={GRADER}"], [f"reward.graders={{numeric: 1.0, '{GRADER}': 0.5}}"]):
        assert GRADER in resolve_target(str(merged), None, None, False, None, named).recipe.reward.graders

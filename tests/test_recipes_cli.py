"""The shipped recipes live in the package (a wheel carries them); `krpo recipes` shows their files
and `krpo recipes --copy NAME [DEST]` writes one out to edit, never over an existing file."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

import krpo_cli
from krpo_cli.cli import app
from krpo_cli.config import RECIPES_DIR
from krpo_cli.recipe_loading import load_recipe

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def test_shipped_recipes_live_in_the_package_and_are_package_data():
    tomllib = pytest.importorskip("tomllib")
    package = Path(krpo_cli.__file__).resolve().parent
    assert RECIPES_DIR.parent == package
    shipped = sorted(RECIPES_DIR.glob("*.yaml"))
    assert {p.stem for p in shipped} >= {"quickstart", "arithmetic-normal", "gsm8k", "math", "openmath"}
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["krpo_cli"]
    for path in shipped:
        assert any(path.relative_to(package).match(p) for p in patterns), f"{path.name} is not in the wheel"


def test_recipes_shows_where_each_file_is():
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0, result.output
    assert str(RECIPES_DIR) in result.output.replace("\n", "")
    for path in RECIPES_DIR.glob("*.yaml"):
        assert path.name in result.output
    assert "--copy" in result.output


def test_copy_writes_the_shipped_recipe_to_edit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["recipes", "--copy", "quickstart"])
    assert result.exit_code == 0, result.output
    written = tmp_path / "quickstart.yaml"
    assert written.read_bytes() == (RECIPES_DIR / "quickstart.yaml").read_bytes()
    assert "krpo train quickstart.yaml" in result.output
    assert load_recipe(str(written))[0].run.name == "quickstart"

    assert runner.invoke(app, ["recipes", "--copy", "gsm8k.yaml", "mine.yaml"]).exit_code == 0
    assert (tmp_path / "mine.yaml").read_bytes() == (RECIPES_DIR / "gsm8k.yaml").read_bytes()
    (tmp_path / "sub").mkdir()
    assert runner.invoke(app, ["recipes", "--copy", "math", "sub"]).exit_code == 0
    assert (tmp_path / "sub" / "math.yaml").is_file()


def test_copy_never_overwrites(tmp_path):
    target = tmp_path / "mine.yaml"
    target.write_text("run: {name: mine}\n")
    result = runner.invoke(app, ["recipes", "--copy", "quickstart", str(target)])
    assert result.exit_code == 2
    assert target.read_text() == "run: {name: mine}\n"
    assert "exists" in result.output and "Traceback" not in result.output
    (tmp_path / "dangling.yaml").symlink_to(tmp_path / "nowhere")
    assert runner.invoke(app, ["recipes", "--copy", "quickstart", str(tmp_path / "dangling.yaml")]).exit_code == 2
    assert not (tmp_path / "nowhere").exists(), "a link is not followed to write a file"


@pytest.mark.parametrize(
    "args, says",
    [
        (["--copy", "quikstart"], "did you mean 'quickstart'"),
        (["--copy", "../README"], "no shipped recipe"),
        (["--copy", "gsm8k", "no/such/folder/x.yaml"], "cannot write"),
        (["--copy", "gsm8k", "no-such-folder/"], "no such folder"),
        (["mine.yaml"], "needs --copy"),
        (["--keys", "--copy", "gsm8k"], "use one"),
    ],
)
def test_copy_mistakes_exit_2_with_one_line(tmp_path, monkeypatch, args, says):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["recipes", *args])
    assert result.exit_code == 2
    assert says in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []

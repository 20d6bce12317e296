"""lora.init_from: training starts from a saved PEFT adapter's exact weights, or refuses one that does not fit."""

import pytest
import torch
from safetensors.torch import load_file

from krpo_cli import train as train_module
from krpo_cli.config import LoraSettings, ModelSettings, Recipe
from krpo_cli.models import ModelError, load_policy
from conftest import build_tiny_model, make_adapter, tiny_recipe


def lora_weights(model) -> dict:
    """The adapter's weights by their saved names (PEFT drops the adapter name '.default')."""
    return {name.replace(".default", ""): param.detach().clone() for name, param in model.named_parameters() if "lora_" in name}


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("sft") / "adapter")  # r 4, alpha 8, all-linear


def policy(model_dir, **lora):
    return load_policy(ModelSettings(name_or_path=str(model_dir)), LoraSettings(**{"r": 4, "alpha": 8, **lora}), seed=0)


def test_the_policy_starts_from_the_adapter_weights_trainable(tiny_model_dir, adapter):
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    model = policy(tiny_model_dir, init_from=str(adapter)).model
    loaded = lora_weights(model)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert any(saved[k].abs().max() > 0 for k in saved if "lora_B" in k)  # not the fresh adapter's zeros
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    fresh = lora_weights(policy(tiny_model_dir).model)
    assert all(fresh[k].abs().max() == 0 for k in fresh if "lora_B" in k)  # without it: a fresh adapter


def test_training_starts_from_the_adapter(tmp_path, tiny_model_dir, adapter, monkeypatch):
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    first = {}
    real_collect = train_module.collect_rollout

    def collect_and_look(run):
        first.setdefault("weights", lora_weights(run.model))  # before the first update
        return real_collect(run)

    monkeypatch.setattr(train_module, "collect_rollout", collect_and_look)
    recipe = tiny_recipe(tiny_model_dir, tmp_path, train={"steps": 1}, lora={"r": 4, "alpha": 8, "init_from": str(adapter)})
    train_module.train(Recipe.model_validate(recipe))
    assert all(torch.equal(saved[k], first["weights"][k]) for k in saved)


@pytest.mark.parametrize(
    "lora, named",
    [
        ({"r": 8, "alpha": 16}, "lora.r: adapter 4, recipe 8"),
        ({"alpha": 4}, "lora.alpha: adapter 8"),
        ({"target_modules": ["q_proj", "v_proj"]}, "lora.target_modules"),
    ],
)
def test_an_adapter_that_does_not_fit_the_lora_section_is_refused(tiny_model_dir, adapter, lora, named):
    with pytest.raises(ModelError, match="does not fit the recipe's lora section") as info:
        policy(tiny_model_dir, init_from=str(adapter), **lora)
    assert named in str(info.value) and "\n" not in str(info.value)


def test_an_adapter_for_another_base_or_no_adapter_is_refused(tiny_model_dir, adapter, tmp_path):
    wider = build_tiny_model(tmp_path / "wider", hidden_size=48)
    with pytest.raises(ModelError, match="does not fit the base model"):
        policy(wider, init_from=str(adapter))
    with pytest.raises(ModelError, match="not a readable PEFT adapter directory"):
        policy(tiny_model_dir, init_from=str(tmp_path))


def test_init_from_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert LoraSettings(init_from="sft/adapter").init_from == str(tmp_path / "sft" / "adapter")
    assert LoraSettings().init_from is None

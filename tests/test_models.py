import pytest
import torch

from krpo_cli import models
from krpo_cli.config import LoraSettings, ModelSettings
from krpo_cli.models import ModelError, load_policy, resolve_dtype, resolve_model_path, resolve_quantization

CPU = torch.device("cpu")


def test_quantization_on_cpu():
    assert resolve_quantization("auto", CPU) == "none"
    assert resolve_quantization("none", CPU) == "none"
    # bitsandbytes on CPU silently corrupts LoRA gradients: refused, never silently wrong.
    with pytest.raises(ModelError, match="nf4 needs a CUDA GPU"):
        resolve_quantization("nf4", CPU)
    assert resolve_quantization("auto", torch.device("cuda")) == "nf4"


def test_dtype_auto_on_cpu_follows_native_bf16(monkeypatch):
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: False)
    assert resolve_dtype("auto", CPU) == torch.float32
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: True)
    assert resolve_dtype("auto", CPU) == torch.bfloat16
    assert resolve_dtype("float16", CPU) == torch.float16


def test_model_path_resolution(tmp_path):
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_a_name_that_cannot_be_a_hub_id_is_a_missing_path(tmp_path, monkeypatch):
    # A hub id is "name" or "namespace/name"; anything else is a local path that is not there,
    # and is refused at once instead of being looked up on the hub.
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("runs/quickstart") == "runs/quickstart"  # no ./runs: may be a hub id
    (tmp_path / "runs").mkdir()
    for name in ("runs/quickstrat", "a/b/c", "./model"):
        with pytest.raises(ModelError, match=f"model path '{name.removeprefix('./')}' does not exist"):
            resolve_model_path(name)
    (tmp_path / "runs" / "adapter").mkdir()
    (tmp_path / "runs" / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="is a LoRA adapter, not a model"):
        resolve_model_path("runs/adapter")


def test_lora_policy_trains_only_adapters_and_reference_is_the_base(tiny_model_dir):
    loaded = load_policy(ModelSettings(name_or_path=str(tiny_model_dir)), LoraSettings(r=4, alpha=8), seed=0, device=CPU)
    model = loaded.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # every linear layer but the output head is adapted
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n in trainable if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)  # move the adapter away from its zero initialisation
        with_adapter = model(ids).logits
        with model.disable_adapter():
            reference = model(ids).logits
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=loaded.dtype)
    with torch.no_grad():
        assert torch.allclose(reference, base(ids).logits, atol=1e-6)
    assert not torch.allclose(with_adapter, reference, atol=1e-3)


def test_quiet_libraries_silences_the_bitsandbytes_cpu_kernel_notice():
    # On AVX512-BF16 CPUs importing peft (hence bitsandbytes) logs a warning about an optional
    # kernel package; krpo's output should not start with it.
    import logging

    notice = logging.getLogger("bitsandbytes.backends.cpu.ops")
    notice.setLevel(logging.NOTSET)
    models.quiet_libraries()
    assert not notice.isEnabledFor(logging.WARNING)
    assert logging.getLogger("bitsandbytes.optim").isEnabledFor(logging.WARNING)  # other notices stay

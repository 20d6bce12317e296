"""`krpo merge`: write a standalone model — the adapter merged into a full-precision base.

The merge is done in float32 and only then cast to the output dtype: merging in bf16 moves
logits by ~2 on SmolLM2, merging in fp32 is exact to ~1e-5. The result is verified by
default: logits of the merged model against base + adapter on a few prompts; a difference
above the tolerance is an error. The output loads with plain
`transformers.AutoModelForCausalLM.from_pretrained`.

NF4 round trip: an adapter trained on an NF4 base learned corrections relative to the
*quantized* weights. With the round trip, each quantized base weight is quantized to NF4 and
dequantized again before the LoRA delta is added, so the merged model computes what training
saw (but inherits the quantization error); without it the delta is added to the original
weights (closer to the unquantized base, but not the function that was trained).
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from krpo_cli.config import Recipe
from krpo_cli.recipe_loading import load_recipe
from krpo_cli.data import build_prompt, load_rows
from krpo_cli.evaluate import load_adapter
from krpo_cli.log_probs import position_ids_from_mask
from krpo_cli.models import ModelError, load_base, quiet_libraries, short
from krpo_cli.run_dir import MERGED, RECIPE, RECIPE_IN_MODEL_DIR, find_adapter, read_run_info, stopped_run_note
from krpo_cli.run_dir import MARKER, MERGED_KIND, check_own_output, enclosing_run, remove_own_output, write_marker
from krpo_cli.trust import Consent, refuse_remote_code

VERIFY_PROMPTS = 4


class MergeError(ModelError):
    """The merge cannot be done or did not verify."""


NOT_A_MODEL_HINT = "choose another --out, or remove the folder yourself"


def check_output_dir(out: Path, adapter_dir: Path, run_dir: Path | None, overwrite: bool) -> Path:
    """Refuse outputs that would destroy the inputs, lie inside the adapter or inside a run (a run's
    merged model goes to RUN/merged only), or hold anything but a model krpo merged (replaced only
    with `overwrite`)."""
    out = out.resolve()
    adapter = adapter_dir.resolve()
    for protected in filter(None, (adapter, run_dir.resolve() if run_dir else None)):
        if out == protected or protected.is_relative_to(out):
            raise MergeError(f"--out '{out}' would overwrite the adapter or run it merges; choose another directory")
    if out.is_relative_to(adapter):
        raise MergeError(f"--out '{out}' is inside the adapter it merges; choose a folder outside it")
    holder = enclosing_run(out)
    if holder is not None and not (run_dir is not None and holder == run_dir.resolve() and out == holder / MERGED):
        raise MergeError(
            f"--out '{out}' is inside the run '{holder}', which holds only its own merged model, in "
            f"'{holder / MERGED}'; choose a folder outside the run"
        )
    check_own_output(out, MERGED_KIND, NOT_A_MODEL_HINT)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MergeError(f"output directory '{out}' holds a model krpo merged; pass --overwrite to replace it")
    return out


def staging_dir(out: Path) -> Path:
    """A new folder beside `out` that the model is written into, then renamed to `out`; marked as
    krpo's at once (a merge that is killed leaves a folder that --overwrite of its run may remove)."""
    staging = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()  # a new name: never a folder someone else made
        write_marker(staging, MERGED_KIND)
    except OSError as err:
        raise MergeError(f"cannot write the output directory '{out}': {err.strerror or err}") from None
    return staging


def replace_output(staging: Path, out: Path) -> None:
    """Lists what the merge wrote in the marker, then puts the staging folder in place of `out`
    (a model krpo merged, checked again just before it is deleted)."""
    write_marker(staging, MERGED_KIND, files=[path.name for path in staging.iterdir() if path.name != MARKER])
    remove_own_output(out, MERGED_KIND, NOT_A_MODEL_HINT)
    staging.rename(out)


def nf4_round_trip(model, compute_dtype: torch.dtype) -> int:
    """Replace every linear weight that NF4 training quantizes (all but the output head) with
    dequantize(quantize(W)) as bitsandbytes does it (blocksize 64, double quantization)."""
    import bitsandbytes.functional as bnbf

    output_head = model.get_output_embeddings()
    count = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not output_head:
                weight = module.weight.data.to(compute_dtype)
                packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
                module.weight.data = bnbf.dequantize_4bit(packed, state).to(module.weight.dtype)
                count += 1
    return count


def verification_inputs(tokenizer, recipe: Recipe | None) -> dict:
    if recipe is not None:
        questions = [row["question"] for row in load_rows(recipe.data, "test")[:VERIFY_PROMPTS]]
        texts = [build_prompt(tokenizer, recipe.data, q) for q in questions]
    else:
        texts = ["What is 12 + 30?", "Solve 7 * 6", "The capital of France is", "def fibonacci(n):"]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def logits_of(model, inputs: dict) -> torch.Tensor:
    mask = inputs["attention_mask"]
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], attention_mask=mask, position_ids=position_ids_from_mask(mask))
    return out.logits.float() * mask.unsqueeze(-1)  # padding positions carry no meaning


def base_dtype(path: str, trust_remote_code: bool = False) -> torch.dtype:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise MergeError(f"cannot read the config of the base '{path}': {short(err)}") from None
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def share_like_new_files(folder: Path, like: Path) -> None:
    """Gives every file in `folder` the permissions of `like`, a file written the ordinary way.

    safetensors writes model.safetensors through a private temporary file (0600); an exported
    model is meant to be copied, served and loaded by other users and tools.
    """
    mode = like.stat().st_mode & 0o777
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(mode)


def check_merged(merged, inputs: dict, reference: torch.Tensor, tolerance: float) -> float:
    """Max |Δlogit| of the float32 merge against base + adapter; above `tolerance` it is an error."""
    diff = float((logits_of(merged, inputs) - reference).abs().max())
    if not diff <= tolerance:
        raise MergeError(
            f"merged model differs from base + adapter by {diff:.3g} in logits (tolerance {tolerance:g}); nothing was written"
        )
    return diff


def check_saved(
    staging: Path, out_dtype: torch.dtype, inputs: dict, reference: torch.Tensor, tolerance: float, trust_remote_code: bool
) -> float:
    """Max |Δlogit| of the saved model, reloaded, against base + adapter (an error in float32 only)."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=out_dtype, trust_remote_code=trust_remote_code).eval()
    diff = float((logits_of(reloaded, inputs) - reference).abs().max())
    if out_dtype == torch.float32 and not diff <= tolerance:
        shutil.rmtree(staging, ignore_errors=True)
        raise MergeError(f"the saved model differs from base + adapter by {diff:.3g} after reloading")
    return diff


def write_staging(merged, tokenizer, run_dir: Path | None, out: Path, adapter_dir: Path) -> Path:
    """Save the merged model, its tokenizer and (from a run) the run's recipe into a new hidden folder
    beside `out`; a failed write removes that folder and replaces nothing."""
    staging = staging_dir(out)
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if run_dir is not None:
            (staging / RECIPE_IN_MODEL_DIR).write_text((run_dir / RECIPE).read_text(), encoding="utf-8")
    except OSError as err:  # a full disk, a folder made read-only: the half-written copy goes, nothing was replaced
        shutil.rmtree(staging, ignore_errors=True)
        raise MergeError(f"cannot write the merged model beside '{out}': {err.strerror or err}; "
                         f"nothing was replaced, and the adapter '{adapter_dir}' is unchanged") from None
    return staging


def merge(
    source: Path,
    out: Path | None = None,
    dtype: str = "auto",
    nf4: str = "auto",
    verify: bool = True,
    tolerance: float = 1e-3,
    overwrite: bool = False,
    console: Console | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Merge, save, verify; returns the merge_info record.

    The base's own code runs only with `trust_remote_code` (--trust-remote-code): the run's recipe
    asking for it is refused without (krpo_cli/trust.py).
    """
    quiet_libraries()
    from peft import PeftConfig

    console = console or Console()
    started = time.perf_counter()
    adapter_dir, run_dir = find_adapter(source)
    recipe = load_recipe(str(run_dir / RECIPE))[0] if run_dir else None
    if recipe is not None:
        refuse_remote_code(recipe, str(run_dir / RECIPE), Consent(remote_code=trust_remote_code))
    run_info = read_run_info(run_dir)
    base_name = recipe.model.name_or_path if recipe else PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    out = out or ((run_dir / MERGED) if run_dir else adapter_dir.parent / f"{adapter_dir.name}-merged")
    out = check_output_dir(out, adapter_dir, run_dir, overwrite)
    trained_quantization = run_info.get("quantization", "unknown")
    round_trip = trained_quantization == "nf4" if nf4 == "auto" else nf4 == "on"

    note = stopped_run_note(adapter_dir)
    if note:
        console.print(note, highlight=False, markup=False, soft_wrap=True)
    loaded = load_base(base_name, "none", torch.float32, torch.device("cpu"), trust_remote_code, console=console)
    path, tokenizer, base = loaded.path, loaded.tokenizer, loaded.model
    out_dtype = base_dtype(path, trust_remote_code) if dtype == "auto" else getattr(torch, dtype)
    console.print(f"[bold]krpo merge[/] {escape(str(adapter_dir))} into {escape(base_name)} (float32, then {str(out_dtype)[6:]})",
                  highlight=False, soft_wrap=True)
    if round_trip:
        compute = getattr(torch, run_info.get("dtype", "bfloat16"))
        count = nf4_round_trip(base, compute)
        console.print(f"NF4 round trip applied to {count} linear weights (what NF4 training saw)", highlight=False)
    model = load_adapter(base, adapter_dir, base_name).eval()

    inputs = verification_inputs(tokenizer, recipe)
    reference = logits_of(model, inputs) if verify else None
    merged = model.merge_and_unload().eval()
    diff_fp32 = check_merged(merged, inputs, reference, tolerance) if verify else None
    merged = merged.to(out_dtype)

    staging = write_staging(merged, tokenizer, run_dir if recipe is not None else None, out, adapter_dir)
    diff_saved = check_saved(staging, out_dtype, inputs, reference, tolerance, trust_remote_code) if verify else None
    info = {
        "base": base_name,
        "base_path": path,
        "adapter": str(adapter_dir),
        "merge_dtype": "float32",
        "output_dtype": str(out_dtype).removeprefix("torch."),
        "trained_quantization": trained_quantization,
        "nf4_round_trip": round_trip,
        "verification": {
            "prompts": int(inputs["input_ids"].shape[0]),
            "max_abs_logit_diff_merged_fp32": diff_fp32,
            "max_abs_logit_diff_saved": diff_saved,
            "tolerance": tolerance,
        } if verify else None,
        "seconds": round(time.perf_counter() - started, 2),
    }
    (staging / "merge_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    share_like_new_files(staging, like=staging / "merge_info.json")
    replace_output(staging, out)
    if verify:
        console.print(
            f"verified: max |Δlogit| merged (fp32) vs base + adapter = {diff_fp32:.2e}; "
            f"saved {info['output_dtype']} model = {diff_saved:.2e}",
            highlight=False,
        )
    console.print(f"wrote {out} (loads with transformers.AutoModelForCausalLM.from_pretrained)", highlight=False, markup=False,
                  soft_wrap=True)
    return info

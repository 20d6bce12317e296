"""Recipes: the typed, strict schema of a training recipe (loading and overrides: recipe_loading).

Unknown keys, wrong types and impossible values are errors that name the key path; all
errors in a recipe are reported together (RecipeError carries the list).
"""

from __future__ import annotations

import difflib
import os
import re
import types
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from krpo_cli.errors import KrpoError
from krpo_cli.rewards import GRADERS, USER_GRADER_SPEC

# The system prompt of the KRPO paper's released code (its train.py and eval.py), word for word and
# line for line, with its two line breaks and its final one: the DeepSeek-R1-Zero prompt as that code wrote it.
PAPER_SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it.\n"
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think>\n"
    "<answer> answer here </answer>\n"
)

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"  # shipped inside the package, so a wheel carries them


class RecipeError(KrpoError):
    """A recipe a user wrote is wrong; `problems` lists one line per mistake."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: " + "; ".join(problems))


# Upper bounds of counts that no real run reaches, but that stop a typo (1e9 for 1e3) from
# crashing or hanging a run: the limits are documented in docs/recipes.md.
MAX_SEED = 2**32 - 1  # numpy and torch both take seeds in 0 .. 2**32 - 1
MAX_STEPS = 10_000_000
MAX_NEW_TOKENS = 32_768
MAX_GROUP_SIZE = 1024
MAX_PROMPTS_PER_STEP = 8192
MAX_LORA_RANK = 4096
MAX_COUNT = 1_000_000_000  # any other count (a batch size, an interval, a number of rows)
MAX_RUN_NAME = 100


class _Strict(BaseModel):
    # allow_inf_nan=False: .inf and .nan are refused for every float key, naming it.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _plain_values(cls, value: Any, info: ValidationInfo) -> Any:
        # A bool is a number to Python (train.steps: true would be 1 step): number keys refuse it.
        if isinstance(value, bool) and _is_number_key(cls.model_fields[info.field_name].annotation):
            raise PydanticCustomError("number_not_bool", "expected a number, not true/false")
        # Text that cannot be written to a file (a lone surrogate) or to a path (NUL).
        if isinstance(value, str) and "\0" in value:
            raise PydanticCustomError("text_nul", "contains a NUL character")
        if isinstance(value, str) and _SURROGATE.search(value):
            raise PydanticCustomError("text_surrogate", "is not valid Unicode text (a lone surrogate)")
        return value


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _is_number_key(annotation: Any) -> bool:
    options = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    return any(option in (int, float) for option in options)


class RunSettings(_Strict):
    name: str = Field("run", description="Run name; the run directory is output_dir/name.")
    output_dir: str = Field("runs", description="Parent directory of run directories.")
    seed: int = Field(42, ge=0, le=MAX_SEED, description="Seed for data order, sampling and LoRA initialisation.")

    @field_validator("name")
    @classmethod
    def _inside_output_dir(cls, name: str) -> str:
        # The run directory is output_dir/name, which --overwrite deletes: a name must not lead out
        # of output_dir (a nested name such as ablations/lr-1e-5 stays inside it).
        parts = Path(name).parts
        if not name.strip() or Path(name).is_absolute() or ".." in parts or not [p for p in parts if p != "."]:
            raise ValueError(f"run.name must be a folder inside run.output_dir, without '..' (found {name!r})")
        if len(name) > MAX_RUN_NAME:
            raise ValueError(f"run.name is {len(name)} characters long; at most {MAX_RUN_NAME} (found {name[:40]!r}…)")
        if "\\" in name or "//" in name or name.endswith("/") or any(not c.isprintable() for c in name):
            raise ValueError(
                f"run.name must be folder names joined by single '/', without '\\', a trailing '/' "
                f"or control characters (found {name!r})"
            )
        return name

    @field_validator("output_dir")
    @classmethod
    def _home(cls, value: str) -> str:
        return os.path.expanduser(value)  # ~/runs is the home folder's runs, not a folder named '~'


class ModelSettings(_Strict):
    name_or_path: str = Field(
        "smollm2-135m-instruct",
        description="HF hub id, local directory, .gguf file, or the embedded 'smollm2-135m-instruct'.",
    )
    quantization: Literal["auto", "nf4", "none"] = Field(
        "auto", description="auto: NF4 on CUDA, none on CPU (where nf4 is slower and saves little memory)."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Compute dtype of the base weights; auto: bfloat16 on CUDA and on CPUs with native bf16, else float32."
    )
    trust_remote_code: bool = Field(
        False,
        description="Run the model repository's own Python code (only if you trust it). Obeyed from your recipe file "
        "or an override, never from a recipe krpo reads in a folder (a run's, a merged model's): there pass "
        "--trust-remote-code (docs/security.md).",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")


class LoraSettings(_Strict):
    r: int = Field(16, ge=1, le=MAX_LORA_RANK, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt (a list, or comma-separated: q_proj,v_proj), or 'all-linear' (every linear layer but the output head).",
    )
    init_from: str | None = Field(
        None,
        description="Start from a saved PEFT adapter (a folder, e.g. an SFT run's) instead of a fresh one: its weights "
        "are loaded trainable onto the base. Its rank, alpha and target modules must be this section's.",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _names(cls, value):
        # `lora.target_modules=q_proj,v_proj` on the command line arrives as one string; and PEFT
        # would take [all-linear] or ALL-LINEAR as a module's name, and find no such module.
        if isinstance(value, str):
            value = [name.strip() for name in value.split(",")]
        if isinstance(value, list) and [str(name).strip().lower() for name in value] == ["all-linear"]:
            return "all-linear"
        if isinstance(value, list) and (not value or not all(isinstance(n, str) and n.strip() for n in value)):
            raise ValueError(f"lora.target_modules must name at least one module, or be 'all-linear' (found {value!r})")
        return value

    @field_validator("init_from")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        # Absolute, so that the run's saved recipe.yaml finds the adapter from any directory.
        return None if value is None else str(Path(value).expanduser().resolve())


# apply_chat_template's own arguments, which krpo sets: data.chat_template_kwargs may not pass them.
CHAT_TEMPLATE_OWN_ARGUMENTS = {"conversation", "tools", "documents", "chat_template", "add_generation_prompt",
                               "continue_final_message", "tokenize", "padding", "truncation", "max_length",
                               "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"}


class DataSettings(_Strict):
    source: Literal["arithmetic", "digits", "file", "hub"] = Field(
        "arithmetic",
        description="arithmetic: the paper's generated set; digits: one-digit + and - (quickstart); "
        "file: a local JSONL/JSON/Parquet/CSV file; hub: a Hugging Face hub dataset id.",
    )
    difficulty: Literal["easy", "normal", "hard"] = Field("normal", description="Arithmetic preset (terms/digits).")
    path: str | None = Field(None, description="The file (source: file) or hub dataset id (source: hub).")
    config: str | None = Field(None, description="Hub dataset configuration, e.g. 'main' for openai/gsm8k.")
    train_split: str = Field("train", description="Split to train on (slicing like 'train[:10000]' works on the hub).")
    test_split: str | None = Field(
        "test", description="Split to evaluate on; when the source has none, test_size rows are held out."
    )
    test_size: float = Field(0.1, ge=0, description="Held-out rows when there is no test split: a fraction (<1) or a count.")
    split_seed: int = Field(42, ge=0, le=MAX_SEED, description="Seed of the held-out split.")
    question_field: str = Field("question", description="Field holding the question.")
    answer_field: str = Field("answer", description="Field holding the reference answer (or a solution to extract it from).")
    answer_format: Literal["auto", "raw", "gsm8k", "boxed"] = Field(
        "auto",
        description="How to read the reference: gsm8k ('#### 72'), boxed (last \\boxed{}), raw, or auto (either, else raw).",
    )
    filters: dict[str, list[str | int]] = Field(
        default_factory=dict, description="Keep rows whose field has one of these values, e.g. {type: [Algebra]}."
    )
    max_question_chars: int | None = Field(None, ge=1, le=MAX_COUNT, description="Drop questions longer than this many characters.")
    system_prompt: str = Field(PAPER_SYSTEM_PROMPT, description="System message of every prompt ('' for none).")
    prompt_template: str = Field("{question}", description="User message; {question} is replaced.")
    messages_field: str | None = Field(
        None,
        description="A conversational dataset's field holding a list of {role, content} turns (TRL's conversational "
        "format): the last user turn is the question (through prompt_template), the turns before it lead the prompt, "
        "turns after it are dropped; the answer is still answer_field. Replaces question_field when set.",
    )
    chat_template_kwargs: dict[str, bool | int | float | str] = Field(
        default_factory=dict,
        description="Extra arguments to the tokenizer's chat template (as TRL's chat_template_kwargs), "
        "e.g. {enable_thinking: false} for Qwen3.",
    )
    max_samples: int | None = Field(None, ge=1, le=MAX_COUNT, description="Use at most this many training rows.")

    # Local file suffixes and the `datasets` builder that reads each: the one table that both
    # validation here and the loader in data.py use (data.py imports this module, not the reverse).
    FILE_FORMATS: ClassVar[dict[str, str]] = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

    @field_validator("test_size")
    @classmethod
    def _whole_count_or_fraction(cls, value: float) -> float:
        if value >= 1 and not value.is_integer():
            raise ValueError(
                f"data.test_size: {value:g} is neither a fraction below 1 (e.g. 0.1) nor a whole number of rows (e.g. 500)"
            )
        return value

    @field_validator("path")
    @classmethod
    def _file_path(cls, value: str | None, info) -> str | None:
        if value is None or info.data.get("source") != "file":
            return value
        suffix = Path(value).suffix.lower()
        if suffix not in cls.FILE_FORMATS:
            raise ValueError(
                f"data.path: '{value}' has an unsupported format ({suffix or 'no suffix'}); "
                f"use one of {', '.join(cls.FILE_FORMATS)}"
            )
        # Absolute, so that the run's saved recipe.yaml finds the file from any directory
        # (krpo eval RUN, krpo merge) and not only from the one training started in.
        return str(Path(value).expanduser().resolve())

    @model_validator(mode="after")
    def _check(self) -> "DataSettings":
        if self.source in ("file", "hub") and not self.path:
            raise ValueError(f"data.path is required when data.source is '{self.source}'")
        if "{question}" not in self.prompt_template:
            raise ValueError("data.prompt_template must contain {question}")
        taken = sorted(set(self.chat_template_kwargs) & CHAT_TEMPLATE_OWN_ARGUMENTS)
        if taken:
            raise ValueError(f"data.chat_template_kwargs: {', '.join(taken)} is set by krpo itself, not by the recipe")
        return self


class RewardSettings(_Strict):
    grader: str = Field(
        "answer_tags",
        description="answer_tags: the paper's <answer> reward (1 / 0.5 / 0.01 / 0); last_number: 1 if the last "
        "integer is right; numeric: numeric equality of the tagged/boxed/last number; math_verify: mathematical "
        "equivalence (competition math); think_format: 1 if the completion is <think>…</think> then the rest "
        "(a format reward, never correct); or your own package.module:function, called as function(completion, "
        "reference) and imported from the current folder, else PYTHONPATH or the installed packages (the same for "
        "krpo and python -m krpo_cli); a recipe krpo reads in a folder may not name one (docs/security.md).",
    )
    graders: dict[str, float] = Field(
        default_factory=dict,
        description="Several graders and their weights, e.g. {numeric: 1.0, think_format: 0.2}: the reward is the "
        "weighted sum (TRL's reward_funcs and reward_weights); the first is the correctness grader (eval accuracy, "
        "correct_frac); each is logged as rewards/<grader>/mean and /std. Replaces reward.grader when set.",
    )
    overlong_buffer: int = Field(
        0, ge=0, le=MAX_NEW_TOKENS,
        description="Length penalty added to the reward (0: off): DAPO's soft overlong punishment, TRL's "
        "get_soft_overlong_punishment with generation.max_new_tokens as the longest completion and this many tokens "
        "of buffer (0 until max - buffer tokens, then down to -1 at max); logged as rewards/soft_overlong/mean and /std.",
    )

    @field_validator("grader")
    @classmethod
    def _known_grader(cls, value: str) -> str:
        return _grader_spec("reward.grader", value)

    @field_validator("graders")
    @classmethod
    def _known_graders(cls, value: dict[str, float]) -> dict[str, float]:
        for spec in value:
            _grader_spec("reward.graders", spec)
        return value


def _grader_spec(key: str, value: str) -> str:
    """A built-in grader's name or a user grader's package.module:function, else a ValueError naming `key`."""
    if value in GRADERS or USER_GRADER_SPEC.fullmatch(value):
        return value
    hint = difflib.get_close_matches(value, list(GRADERS), n=1)
    suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
    raise ValueError(
        f"{key}: unknown grader '{value}'{suggestion}; expected one of {', '.join(GRADERS)} "
        "or package.module:function"
    )


class KalmanSettings(_Strict):
    process_noise: float = Field(1e-5, ge=0, description="Q: variance added to the baseline before each reward.")
    measurement_noise: float = Field(1e-2, gt=0, description="R: variance of one reward around the baseline.")
    init_mean: float = Field(0.0, description="Initial baseline estimate x̂₀.")
    init_var: float = Field(1.0, gt=0, description="Initial baseline variance P₀.")
    eps: float = Field(1e-8, gt=0, description="ε of the advantage's divisor (see eps_placement).")
    eps_placement: Literal["variance", "std"] = Field(
        "variance",
        description="variance: A = (r − x̂)/sqrt(P + ε); std: (r − x̂)/(sqrt(P) + ε), as the paper's released code "
        "(the two differ by less than 1e-5 relative with ε = 1e-8).",
    )
    order: Literal["sampled", "shuffled", "sorted"] = Field(
        "sampled", description="Order in which a group's rewards enter the filter (the paper: sampled)."
    )
    adaptive: bool = Field(
        False, description="Estimate R from the spread of the rewards read so far (floored at measurement_noise)."
    )
    scope: Literal["group", "prompt"] = Field(
        "group",
        description="group: a fresh filter per group each step (the paper); prompt: one filter per prompt whose "
        "(x̂, P) carries over to the prompt's next visit. krpo only.",
    )


class AlgorithmSettings(_Strict):
    advantage: Literal["krpo", "grpo", "dr_grpo", "rloo"] = Field(
        "krpo", description="Advantage estimator: krpo (the paper), grpo, dr_grpo (mean-centred, no std), rloo (leave-one-out)."
    )
    group_size: int = Field(12, ge=2, le=MAX_GROUP_SIZE, description="Completions sampled per prompt (G).")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO clip range ε (both sides unless clip_eps_low/high are set).")
    clip_eps_low: float | None = Field(
        None, gt=0, lt=1, description="Lower clip ε_low: ρ is clipped at 1 − ε_low (TRL's epsilon); default: clip_eps."
    )
    clip_eps_high: float | None = Field(
        None, gt=0, le=10, description="Upper clip ε_high: ρ is clipped at 1 + ε_high (DAPO's clip-higher, e.g. 0.28; "
        "TRL's epsilon_high); default: clip_eps.",
    )
    importance_ratio: Literal["token", "sequence"] = Field(
        "token",
        description="token: ρ per token (PPO/GRPO); sequence: GSPO's exp(mean over the completion of log π − log π_old), "
        "one ratio per completion (TRL's importance_sampling_level).",
    )
    loss_aggregation: Literal["auto", "sequence", "token", "constant"] = Field(
        "auto",
        description="sequence: mean over each completion's tokens, then over completions (the GRPO and KRPO papers); "
        "token: sum over the minibatch's tokens / their number (DAPO; TRL's dapo/bnpo); constant: sum / "
        "(completions × generation.max_new_tokens) (Dr. GRPO; TRL's dr_grpo); auto: constant for "
        "advantage: dr_grpo, else sequence.",
    )
    kl_beta: float = Field(0.01, ge=0, description="Weight β of the KL penalty to the reference (adapter off).")
    mask_eos: bool = Field(
        False, description="Leave each completion's end-of-sequence token out of the loss (the paper's code does); "
        "default: it is trained on, so the policy learns when to stop.",
    )
    skip_equal_reward_groups: bool = Field(
        False, description="Leave the groups whose rewards are all equal out of the update (their advantages are zero "
        "under GRPO; KRPO gives them non-zero ones, so this changes KRPO).",
    )
    grpo_eps: float = Field(1e-8, gt=0, description="GRPO's ε: A = (r − mean)/(std + ε). advantage: grpo only.")
    kalman: KalmanSettings = Field(default_factory=KalmanSettings)

    @property
    def clip_range(self) -> tuple[float, float]:
        """(ε_low, ε_high) of the clipped surrogate."""
        low = self.clip_eps if self.clip_eps_low is None else self.clip_eps_low
        return low, (self.clip_eps if self.clip_eps_high is None else self.clip_eps_high)

    @property
    def aggregation(self) -> str:
        """The loss aggregation in effect (`auto` resolved)."""
        if self.loss_aggregation != "auto":
            return self.loss_aggregation
        return "constant" if self.advantage == "dr_grpo" else "sequence"

    @model_validator(mode="after")
    def _check(self) -> "AlgorithmSettings":
        if self.kalman.scope != "group" and self.advantage != "krpo":
            raise ValueError(
                f"algorithm.kalman.scope: {self.kalman.scope} needs algorithm.advantage: krpo "
                f"({self.advantage} has no filter state to carry over)"
            )
        return self


class GenerationSettings(_Strict):
    max_new_tokens: int = Field(1024, ge=1, le=MAX_NEW_TOKENS, description="Longest completion.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold (1.0: off).")
    top_k: int = Field(0, ge=0, le=MAX_COUNT, description="Top-k sampling (0: off).")
    batch_size: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="Most sequences per generate call (memory knob); default: all at once."
    )
    min_new_tokens: int | None = Field(
        None, ge=1, le=MAX_NEW_TOKENS, description="Force completions to at least this length (for benchmarks: equal work per step)."
    )
    engine: Literal["auto", "krpo", "transformers"] = Field(
        "auto",
        description="Decoder: krpo's own (fused projections, static KV cache; Llama/Mistral/Qwen2/Qwen3), HF generate, "
        "or auto (krpo's on CPU where supported, else generate).",
    )

    @model_validator(mode="after")
    def _lengths(self) -> "GenerationSettings":
        if self.min_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"generation.min_new_tokens ({self.min_new_tokens}) is larger than generation.max_new_tokens "
                f"({self.max_new_tokens})"
            )
        return self


class TrainSettings(_Strict):
    steps: int = Field(100, ge=1, le=MAX_STEPS, description="Rollout/update steps.")
    prompts_per_step: int = Field(32, ge=1, le=MAX_PROMPTS_PER_STEP, description="Prompts per rollout batch.")
    minibatch_size: int = Field(16, ge=1, le=MAX_COUNT, description="Completions per optimizer step.")
    micro_batch_size: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="Completions per forward/backward (gradient accumulation); default: ~640 tokens' worth on a CPU (twice that for the gradient-free reference pass), the whole minibatch elsewhere."
    )
    epochs_per_batch: int = Field(1, ge=1, le=MAX_COUNT, description="Passes over each rollout batch.")
    learning_rate: float = Field(1e-5, gt=0, description="AdamW learning rate.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "adamw",
        description="AdamW with float32 state (torch), or bitsandbytes' AdamW with 8-bit block-wise state "
        "(adamw_8bit), paged out to CPU memory when the GPU runs short (paged_adamw_8bit).",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "constant",
        description="Learning-rate schedule over the run's optimizer steps, transformers' get_scheduler (as TRL's "
        "lr_scheduler_type): constant, constant_with_warmup, linear or cosine decay to 0 after the warm-up. "
        "constant with a warm-up is constant_with_warmup.",
    )
    warmup_steps: int = Field(
        0, ge=0, le=MAX_STEPS,
        description="Linear learning-rate warm-up from 0, in optimizer steps (transformers': update k of the warm-up "
        "uses k/warmup_steps of the rate, the first update 0).",
    )
    warmup_ratio: float = Field(
        0.0, ge=0, lt=1, description="Warm-up as a fraction of all optimizer steps, rounded up (instead of warmup_steps)."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_consecutive_skips: int = Field(
        5, ge=1, le=MAX_COUNT, description="Stop after this many consecutive updates skipped for a non-finite loss or gradient."
    )

    @model_validator(mode="after")
    def _check(self) -> "TrainSettings":
        if self.micro_batch_size is not None and self.micro_batch_size > self.minibatch_size:
            raise ValueError(
                f"train.micro_batch_size ({self.micro_batch_size}) must not exceed train.minibatch_size ({self.minibatch_size})"
            )
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("train.warmup_steps and train.warmup_ratio are both set; give the warm-up one way")
        return self


class EvalSettings(_Strict):
    every: int = Field(0, ge=0, le=MAX_STEPS, description="Evaluate on held-out questions every N steps and at the end (0: never).")
    size: int = Field(200, ge=1, le=MAX_COUNT, description="Held-out questions per evaluation: the first N of the test split.")
    batch_size: int = Field(32, ge=1, le=MAX_COUNT, description="Questions per generate call during evaluation.")


class OutputSettings(_Strict):
    samples_per_step: int = Field(
        4, ge=0, le=MAX_COUNT, description="Prompts per step whose first completion is written to samples.jsonl (rank 0's prompts)."
    )
    save_every: int = Field(50, ge=1, le=MAX_STEPS, description="Write a resumable checkpoint every N steps (and after the last step).")
    save_every_minutes: float = Field(
        10.0, ge=0, le=10_000,
        description="Also write a checkpoint when this many minutes have passed since the last one (0: steps only), "
        "so a kill loses at most about this much work however slow a step is. A checkpoint of the quickstart "
        "model (LoRA r=16 adapter, optimizer and sampler state: 59 MB) took 0.3-0.4 s on a shared 2-core CPU.",
    )
    keep_checkpoints: int = Field(2, ge=1, le=MAX_COUNT, description="How many of the latest checkpoints to keep.")
    log_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list,
        description="Also log the metrics to TensorBoard (RUN/tensorboard/) and/or Weights & Biases; "
        "metrics.jsonl is always written.",
    )
    wandb_project: str | None = Field(
        None, description="W&B project (default: $WANDB_PROJECT, else krpo). WANDB_MODE=offline logs locally."
    )

    @field_validator("log_to", mode="before")
    @classmethod
    def _backends(cls, value):
        # `output.log_to=tensorboard,wandb` on the command line (or in a recipe) is one string: a comma list.
        if isinstance(value, str):
            return [name.strip() for name in value.split(",")] if value.strip() else []
        return value

    @model_validator(mode="after")
    def _check(self) -> "OutputSettings":
        if len(set(self.log_to)) != len(self.log_to):
            raise ValueError(f"output.log_to names a backend twice: {self.log_to}")
        if self.wandb_project is not None and "wandb" not in self.log_to:
            raise ValueError("output.wandb_project is set but output.log_to does not include wandb")
        return self


def minibatch_problem(train: TrainSettings, algorithm: AlgorithmSettings) -> str | None:
    """The check across sections: an optimizer step cannot take more completions than a rollout makes."""
    rollout = train.prompts_per_step * algorithm.group_size
    if train.minibatch_size > rollout:
        return (
            f"train.minibatch_size ({train.minibatch_size}) is larger than a rollout batch "
            f"(train.prompts_per_step × algorithm.group_size = {rollout})"
        )
    return None


class Recipe(_Strict):
    run: RunSettings = Field(default_factory=RunSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    reward: RewardSettings = Field(default_factory=RewardSettings)
    algorithm: AlgorithmSettings = Field(default_factory=AlgorithmSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)

    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        problem = minibatch_problem(self.train, self.algorithm)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def rollout_size(self) -> int:
        return self.train.prompts_per_step * self.algorithm.group_size

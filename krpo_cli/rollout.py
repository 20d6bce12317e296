"""Rollouts: batched sampling of G completions per prompt (their log-probs: krpo_cli.log_probs).

Layout of a rollout's sequences: every prompt is left-padded to the same length P, and
every completion right-padded to the same length C, so token t of completion i sits at
column P + t of row i. A completion ends at (and includes) its first end-of-sequence
token; `completion_mask` marks those tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from krpo_cli.decode import engine_supports, generate_tokens
from krpo_cli.models import ModelError


@dataclass
class Rollout:
    sequences: torch.Tensor  # (N, P + C) prompt then completion token ids
    attention_mask: torch.Tensor  # (N, P + C) 1 on real prompt and completion tokens
    completion_mask: torch.Tensor  # (N, C) 1 on completion tokens up to the first EOS
    prompt_length: int  # P
    completions: list[str]  # decoded completions, N of them
    seconds: float  # wall time of generation
    ends_with_eos: torch.Tensor | None = None  # (N,) bool: the completion ended with EOS (else it was cut off)

    @property
    def completion_tokens(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]

    @property
    def num_generated_tokens(self) -> int:
        return int(self.completion_mask.sum())


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    ids = eos if isinstance(eos, list) else [eos]
    ids = [i for i in ids if i is not None]
    return ids or [tokenizer.eos_token_id]


def completion_mask_from_tokens(completions: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 on each completion's tokens up to and including its first EOS, 0 after."""
    is_eos = torch.isin(completions, torch.tensor(eos_ids, device=completions.device)).int()
    eos_before = is_eos.cumsum(dim=1) - is_eos  # EOS tokens strictly before each position
    return (eos_before == 0).long()


def pick_engine(model, engine: str) -> str:
    """The decoder to use: "auto" means krpo's own where it supports the model and runs on a CPU.

    On CUDA "auto" keeps HF `generate` until krpo's decoder has been measured there;
    `generation.engine: krpo` asks for it explicitly.
    """
    if engine == "transformers":
        return engine
    supported = engine_supports(model)
    if engine == "krpo":
        if not supported:
            raise ModelError(
                "generation.engine 'krpo' does not support this model or adapter (it takes Llama, Mistral, "
                "Qwen2 and Qwen3 with plain LoRA: no DoRA, LoRA bias or other LoRA variant, no adapter on the "
                "embeddings, no sliding window); use 'auto' or 'transformers'"
            )
        return engine
    on_cpu = next(model.parameters()).device.type == "cpu"
    return "krpo" if supported and on_cpu else "transformers"


@torch.no_grad()
def generate_rollout(
    model,
    tokenizer,
    prompts: list[str],
    group_size: int,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int | None = None,
    min_new_tokens: int | None = None,
    greedy: bool = False,
    engine: str = "auto",
) -> Rollout:
    """Sample `group_size` completions for each prompt; rows are prompt-major (i·G + j).

    One batched decoding per `batch_size` sequences (all at once by default).
    `greedy=True` decodes greedily instead of sampling (evaluation's pass@1). `engine`:
    "krpo" (krpo_cli.decode), "transformers" (HF `generate`), or "auto" (see `pick_engine`).
    """
    device = next(model.parameters()).device
    started = time.perf_counter()
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    input_ids = encoded["input_ids"].repeat_interleave(group_size, dim=0).to(device)
    prompt_mask = encoded["attention_mask"].repeat_interleave(group_size, dim=0).to(device)
    prompt_length = input_ids.shape[1]
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id

    was_training = model.training
    model.eval()
    use_krpo = pick_engine(model, engine) == "krpo"
    chunks = []
    step = batch_size or input_ids.shape[0]
    for start in range(0, input_ids.shape[0], step):
        rows = slice(start, start + step)
        if use_krpo:
            chunks.append(
                generate_tokens(
                    model, input_ids[rows], prompt_mask[rows], max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
                    temperature=temperature, top_k=top_k, top_p=top_p, min_new_tokens=min_new_tokens, greedy=greedy,
                    group_size=group_size,
                )
            )
            continue
        sampling = {} if greedy else dict(temperature=temperature, top_p=top_p, top_k=top_k)
        out = model.generate(
            input_ids=input_ids[rows],
            attention_mask=prompt_mask[rows],
            do_sample=not greedy,
            **sampling,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            repetition_penalty=1.0,  # a model's own generation config may set one; samples must follow the policy
            pad_token_id=pad_id,
            eos_token_id=eos_ids,
        )
        chunks.append(out[:, prompt_length:])
    model.train(was_training)

    width = max(c.shape[1] for c in chunks)
    completions = torch.cat(
        [torch.nn.functional.pad(c, (0, width - c.shape[1]), value=pad_id) for c in chunks], dim=0
    )
    completion_mask = completion_mask_from_tokens(completions, eos_ids)
    # Drop columns past the longest completion (only padding lives there).
    longest = int(completion_mask.sum(dim=1).max())
    completions, completion_mask = completions[:, :longest], completion_mask[:, :longest]
    ends_with_eos = (torch.isin(completions, torch.tensor(eos_ids, device=completions.device)) & completion_mask.bool()).any(dim=1)
    texts = tokenizer.batch_decode(completions * completion_mask + pad_id * (1 - completion_mask), skip_special_tokens=True)
    return Rollout(
        sequences=torch.cat([input_ids, completions], dim=1),
        attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
        completion_mask=completion_mask,
        prompt_length=prompt_length,
        completions=texts,
        seconds=time.perf_counter() - started,
        ends_with_eos=ends_with_eos,
    )

"""Rollouts: batched sampling of G completions per prompt, and completion log-probs.

Layout of a rollout's sequences: every prompt is left-padded to the same length P, and
every completion right-padded to the same length C, so token t of completion i sits at
column P + t of row i. A completion ends at (and includes) its first end-of-sequence
token; `completion_mask` marks those tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from krpo_cli.losses import token_log_probs


@dataclass
class Rollout:
    sequences: torch.Tensor  # (N, P + C) prompt then completion token ids
    attention_mask: torch.Tensor  # (N, P + C) 1 on real prompt and completion tokens
    completion_mask: torch.Tensor  # (N, C) 1 on completion tokens up to the first EOS
    prompt_length: int  # P
    completions: list[str]  # decoded completions, N of them
    seconds: float  # wall time of generation

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


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as generation assigns them (padding gets 0)."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def completion_mask_from_tokens(completions: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 on each completion's tokens up to and including its first EOS, 0 after."""
    is_eos = torch.isin(completions, torch.tensor(eos_ids, device=completions.device)).int()
    eos_before = is_eos.cumsum(dim=1) - is_eos  # EOS tokens strictly before each position
    return (eos_before == 0).long()


@torch.no_grad()
def generate_rollout(
    model,
    tokenizer,
    prompts: list[str],
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int | None = None,
    min_new_tokens: int | None = None,
    greedy: bool = False,
) -> Rollout:
    """Sample `group_size` completions for each prompt; rows are prompt-major (i·G + j).

    One batched `generate` call per `batch_size` sequences (all at once by default).
    `greedy=True` decodes greedily instead of sampling (evaluation's pass@1).
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
    sampling = {} if greedy else dict(temperature=temperature, top_p=top_p, top_k=top_k)
    chunks = []
    step = batch_size or input_ids.shape[0]
    for start in range(0, input_ids.shape[0], step):
        out = model.generate(
            input_ids=input_ids[start : start + step],
            attention_mask=prompt_mask[start : start + step],
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
    texts = tokenizer.batch_decode(completions * completion_mask + pad_id * (1 - completion_mask), skip_special_tokens=True)
    return Rollout(
        sequences=torch.cat([input_ids, completions], dim=1),
        attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
        completion_mask=completion_mask,
        prompt_length=prompt_length,
        completions=texts,
        seconds=time.perf_counter() - started,
    )


def completion_log_probs(
    model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probs (float32) of the completion tokens of `sequences` under `model`: (B, C).

    Trims the columns that are padding in every row of this batch; positions that are not
    completion tokens hold 0, passes explicit position ids (so left padding is handled as in
    generation) and asks the model for logits at completion positions only. Logits are
    divided by the sampling `temperature`, so the log-probs are those of the distribution
    the completions were drawn from (top-p/top-k truncation is not modelled).
    """
    full_width = sequences.shape[1] - prompt_length
    columns_used = attention_mask.any(dim=0).nonzero().squeeze(-1)
    first = min(int(columns_used[0]), prompt_length - 1)
    last = max(int(columns_used[-1]) + 1, prompt_length + 1)
    sequences, attention_mask = sequences[:, first:last], attention_mask[:, first:last]
    completion = sequences[:, prompt_length - first :]
    position_ids = position_ids_from_mask(attention_mask)
    logits = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=completion.shape[1] + 1,
        use_cache=False,
    ).logits[:, :-1]
    if temperature != 1.0:
        logits = logits / temperature
    log_probs = token_log_probs(logits, completion) * attention_mask[:, prompt_length - first :]
    return torch.nn.functional.pad(log_probs, (0, full_width - log_probs.shape[1]))

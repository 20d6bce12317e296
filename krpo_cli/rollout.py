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

from krpo_cli.decode import (
    DecoderWeights,
    architecture_supported,
    engine_supports,
    generate_tokens,
    masked_attention,
    prompt_attention_mask,
    rms_norm,
    transformer_hidden,
    unwrap,
)
from krpo_cli.losses import linear_token_log_probs, token_log_probs
from krpo_cli.models import ModelError


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
                generate_tokens(model, input_ids[rows], prompt_mask[rows], max_new_tokens, eos_ids, pad_id,
                                temperature, top_k, top_p, min_new_tokens, greedy, group_size)
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
    texts = tokenizer.batch_decode(completions * completion_mask + pad_id * (1 - completion_mask), skip_special_tokens=True)
    return Rollout(
        sequences=torch.cat([input_ids, completions], dim=1),
        attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
        completion_mask=completion_mask,
        prompt_length=prompt_length,
        completions=texts,
        seconds=time.perf_counter() - started,
    )


# Architectures whose logits are exactly lm_head(final hidden state): no soft-capping or scaling.
PLAIN_OUTPUT_LAYER = {"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo2"}


def split_output_layer(model):
    """(backbone, output weight) when the logits are a plain linear map of the backbone's output, else None.

    Works through a PEFT wrapper; None when the output layer carries an adapter or a bias.
    """
    base = unwrap(model)
    head = base.get_output_embeddings()
    if base.config.model_type not in PLAIN_OUTPUT_LAYER or type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    return getattr(base, base.base_model_prefix), head.weight


def completion_log_probs(
    model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probs (float32) of the completion tokens of `sequences` under `model`: (B, C).

    Trims the columns that are padding in every row of this batch; positions that are not
    completion tokens hold 0, passes explicit position ids (so left padding is handled as in
    generation) and computes the output layer at completion positions only. Logits are
    divided by the sampling `temperature`, so the log-probs are those of the distribution
    the completions were drawn from (top-p/top-k truncation is not modelled). Where the
    architecture allows, the output layer and log-softmax run fused and chunked
    (`linear_token_log_probs`), so no (batch × length × vocab) logits tensor is ever built,
    and rows that share a prompt read it once (`shared_prompt_log_probs`).
    """
    split = split_output_layer(model)
    if split is not None and shares_prompts(model):
        return shared_prompt_log_probs(model, split[1], sequences, attention_mask, prompt_length, temperature)
    full_width = sequences.shape[1] - prompt_length
    columns_used = attention_mask.any(dim=0).nonzero().squeeze(-1)
    first = min(int(columns_used[0]), prompt_length - 1)
    last = max(int(columns_used[-1]) + 1, prompt_length + 1)
    sequences, attention_mask = sequences[:, first:last], attention_mask[:, first:last]
    completion = sequences[:, prompt_length - first :]
    inputs = dict(input_ids=sequences, attention_mask=attention_mask,
                  position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    if split is not None:
        backbone, weight = split
        hidden = backbone(**inputs).last_hidden_state[:, -completion.shape[1] - 1 : -1]
        log_probs = linear_token_log_probs(hidden, weight, completion, temperature)
    else:
        logits = model(**inputs, logits_to_keep=completion.shape[1] + 1).logits[:, :-1]
        log_probs = token_log_probs(logits / temperature if temperature != 1.0 else logits, completion)
    log_probs = log_probs * attention_mask[:, prompt_length - first :]
    return torch.nn.functional.pad(log_probs, (0, full_width - log_probs.shape[1]))


def shares_prompts(model) -> bool:
    """True when `shared_prompt_log_probs` computes exactly what the model's own forward would.

    It re-implements the Llama-family layer stack around the model's own modules, so it needs
    a supported architecture, no attention dropout while training, and no gradient
    checkpointing while gradients are recorded (the model's own forward does those).
    """
    if not architecture_supported(model):
        return False
    base = unwrap(model)
    if base.training and getattr(base.config, "attention_dropout", 0.0):
        return False
    # transformers 5 renamed the flag; 4.x only has the old name.
    checkpointing = getattr(base, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(base, "is_gradient_checkpointing", False)
    return not (torch.is_grad_enabled() and checkpointing)


def shared_prompt_log_probs(
    model, output_weight: torch.Tensor, sequences: torch.Tensor, attention_mask: torch.Tensor,
    prompt_length: int, temperature: float = 1.0,
) -> torch.Tensor:
    """`completion_log_probs` reading each distinct prompt once: (B, C), float32.

    A rollout holds G copies of every prompt. Here the distinct prompts and the rows'
    completions go through every matrix product together, as one batch of tokens; only
    attention is split: the prompts attend among themselves, and each completion attends to
    its prompt's keys and values, then to its own. So a prompt is read once and its gradient
    gathers all G rows'. Equal to running every row in full, up to float rounding (tests
    check values and gradients).
    """
    rows, full_width = sequences.shape[0], sequences.shape[1] - prompt_length
    prompt_mask = attention_mask[:, :prompt_length].bool()
    width = max(1, int(attention_mask[:, prompt_length:].sum(dim=1).max()))  # past it: padding in every row
    completion, completion_mask = sequences[:, prompt_length:][:, :width], attention_mask[:, prompt_length:][:, :width].bool()
    first = min(int(prompt_mask.any(dim=0).nonzero()[0]), prompt_length - 1)  # left padding in every row
    prompts, prompt_mask = sequences[:, first:prompt_length], prompt_mask[:, first:]
    length = prompts.shape[1]
    distinct, row_prompt = torch.unique(torch.cat([prompts, prompt_mask.long()], dim=1), dim=0, return_inverse=True)
    distinct_ids, distinct_mask = distinct[:, :length], distinct[:, length:].bool()
    count, device = distinct.shape[0], sequences.device
    split = count * length  # the first `split` tokens are the prompts'

    prompt_positions = position_ids_from_mask(distinct_mask.long())
    completion_positions = prompt_positions[row_prompt, -1:] + 1 + torch.arange(width, device=device)
    tokens = torch.cat([distinct_ids.flatten(), completion.flatten()])[None]
    positions = torch.cat([prompt_positions.flatten(), completion_positions.flatten()])[None]
    prompt_attend = prompt_attention_mask(distinct_mask)
    # Completions: their prompt's real tokens, then their own tokens so far.
    own = torch.ones(width, width, dtype=torch.bool, device=device).tril().expand(rows, width, width)
    completion_attend = torch.cat([distinct_mask[row_prompt][:, None, :].expand(rows, width, length), own], dim=2)

    def split_attention(layer, q, k, v, scale):
        def batch_of(t, start, end, size, span):  # (1, h, tokens, d) → (size, h, span, d)
            return t[0, :, start:end].unflatten(1, (size, span)).transpose(0, 1)

        heads, total = q.shape[1], q.shape[2]
        qp, kp, vp = (batch_of(t, 0, split, count, length) for t in (q, k, v))
        qc, kc, vc = (batch_of(t, split, total, rows, width) for t in (q, k, v))
        prompt_out = masked_attention(qp, kp, vp, prompt_attend[:, None], scale)
        keys, values = torch.cat([kp[row_prompt], kc], dim=2), torch.cat([vp[row_prompt], vc], dim=2)
        completion_out = masked_attention(qc, keys, values, completion_attend[:, None], scale)
        flat = [o.transpose(0, 1).reshape(heads, -1, o.shape[-1]) for o in (prompt_out, completion_out)]
        return torch.cat(flat, dim=1)[None]

    weights = DecoderWeights(model, fused=False)
    hidden = transformer_hidden(weights, tokens, positions, split_attention)[0]
    # Token t of a row is predicted by the output before it: its prompt's last for t = 0.
    before = split + torch.arange(rows, device=device)[:, None] * width + torch.arange(-1, width - 1, device=device)
    before[:, 0] = row_prompt * length + length - 1
    predicting = rms_norm(weights.base.model.norm, hidden[before[completion_mask]])
    flat = linear_token_log_probs(predicting, output_weight, completion[completion_mask], temperature)
    out = torch.zeros(rows, full_width, dtype=flat.dtype, device=device)
    return out.masked_scatter(torch.nn.functional.pad(completion_mask, (0, full_width - width)), flat)

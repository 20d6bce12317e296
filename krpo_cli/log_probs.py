"""Log-probabilities of completion tokens: everything krpo computes them with, in one place.

`completion_log_probs` gives the (B, C) float32 log-probs of a rollout's completion tokens
under a model, at the sampling temperature; the update calls it with gradients, and
`batched_log_probs` without, for the reference (adapter off) and old policies. Under it:

- `token_log_probs`: log-softmax of full logits, gathered at the tokens, a few rows at a time;
- `linear_token_log_probs`: the output layer and the log-softmax fused and chunked, so that no
  (batch × length × vocabulary) logits tensor is ever built, in forward or backward;
- `shared_prompt_log_probs`: a rollout's G copies of a prompt read once, for Llama-family models.

Positions follow `position_ids_from_mask`, as generation assigns them under left padding.
With `with_entropy=True` each of them also returns the entropy of the policy's distribution at
every position (logged as `entropy`), computed without gradient from the same chunks.
"""

from __future__ import annotations

import torch

from krpo_cli.decode import (
    DecoderWeights,
    architecture_supported,
    masked_attention,
    prompt_attention_mask,
    rms_norm,
    transformer_hidden,
    unwrap,
)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as generation assigns them (padding gets 0)."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def softmax_entropy(exps: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of softmax(logits), from exps = exp(logits − c) (any row constant c) and
    their row sums `total`: with p = e / S, H = −Σ p log p = log S − Σ e log e / S (0 log 0 = 0)."""
    return total.log() - torch.special.xlogy(exps, exps).sum(dim=-1) / total


def shifted_softmax_entropy(shifted: torch.Tensor, exps: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of softmax(logits), from finite shifted = logits − c (any row constant c),
    exps = exp(shifted) and their row sums `total`: H = log S − Σ e·z / S, with no logarithm per
    entry (as `softmax_entropy` takes). Overwrites `shifted`."""
    return total.log() - shifted.mul_(exps).sum(dim=-1) / total


def token_log_probs(
    logits: torch.Tensor, tokens: torch.Tensor, chunk_size: int = 8, with_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each token under `logits`, in float32.

    logits: (B, T, V) predicting tokens (B, T). Rows are processed `chunk_size` at a time so
    that only one chunk's full-vocabulary float32 log-softmax exists at once. With
    `with_entropy`, also the (B, T) entropy of softmax(logits), without gradient.
    """
    out, entropies = [], []
    for start in range(0, logits.shape[0], chunk_size):
        chunk = logits[start : start + chunk_size].float()
        logp = torch.log_softmax(chunk, dim=-1)
        out.append(logp.gather(-1, tokens[start : start + chunk_size].unsqueeze(-1)).squeeze(-1))
        if with_entropy:
            with torch.no_grad():
                probs = logp.exp()
                entropies.append(softmax_entropy(probs, probs.sum(dim=-1)))
    if with_entropy:
        return torch.cat(out, dim=0), torch.cat(entropies, dim=0)
    return torch.cat(out, dim=0)


class _LinearTokenLogProbs(torch.autograd.Function):
    """log softmax(h·Wᵀ / T)[token] row by row, chunked.

    Each chunk's logits are turned in place into exp(logit − row max): their row sum gives
    the log-normaliser and, divided by it, they are the softmax that backward needs. They are
    kept for backward when `keep` (faster) and recomputed from h otherwise, so that no
    (rows × vocab) tensor outlives its chunk. The second output is each row's entropy when
    `with_entropy` (the exponentials then go to a second buffer of the chunk's size, and the
    entropy is read from them and the shifted logits), else empty; it has no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature, chunk_rows, keep, with_entropy):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        log_norm = torch.empty_like(out)
        entropy = torch.empty(hidden.shape[0] if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        ctx.kept = []
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = _chunk_logits(hidden[rows], weight, temperature)
            token_logits = logits.gather(-1, tokens[rows].unsqueeze(-1)).squeeze(-1)
            peak = logits.amax(dim=-1, keepdim=True)
            shifted = logits.sub_(peak)
            # In place: a second vocabulary-wide tensor would cost as much again. The entropy needs both.
            exps = shifted.exp() if with_entropy else shifted.exp_()
            total = exps.sum(dim=-1)
            log_norm[rows] = peak.squeeze(-1) + total.log()
            out[rows] = token_logits - log_norm[rows]
            if with_entropy:
                entropy[rows] = shifted_softmax_entropy(shifted, exps, total)
            if keep:
                ctx.kept.append((exps, total))
        ctx.save_for_backward(hidden, weight, tokens, log_norm)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_entropy):
        hidden, weight, tokens, log_norm = ctx.saved_tensors
        temperature, chunk_rows, kept = ctx.temperature, ctx.chunk_rows, ctx.kept
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for index, start in enumerate(range(0, hidden.shape[0], chunk_rows)):
            rows = slice(start, start + chunk_rows)
            # d logp[token] / d logits = onehot(token) − softmax(logits), then the 1/T of the division.
            if kept:
                exps, total = kept[index]
                grad_logits = exps.mul_((-grad_out[rows] / total).unsqueeze(-1))
            else:
                logits = _chunk_logits(hidden[rows], weight, temperature)
                grad_logits = logits.sub_(log_norm[rows].unsqueeze(-1)).exp_().mul_(-grad_out[rows].unsqueeze(-1))
            grad_logits.scatter_add_(-1, tokens[rows].unsqueeze(-1), grad_out[rows].unsqueeze(-1).float())
            if temperature != 1.0:
                grad_logits.div_(temperature)
            grad_logits = grad_logits.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ hidden[rows]).float()
        ctx.kept = []
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """float32 logits h·Wᵀ / T of one chunk of rows (a fresh tensor: callers work on it in place).

    On a CPU in float32 the product is taken as (W·hᵀ)ᵀ, a column-major result: the same dot
    products, and MKL computes them ~25 % faster that way for a vocabulary-wide W (256 × 576 ×
    49,152: 123 against 172 ms on an AVX2 CPU). Elsewhere, and in bf16, h·Wᵀ as written.
    """
    if weight.device.type == "cpu" and weight.dtype == torch.float32 and hidden.dtype == torch.float32:
        logits = torch.mm(weight, hidden.T).T
    else:
        logits = (hidden @ weight.T).float()
    return logits.div_(temperature) if temperature != 1.0 else logits


def linear_token_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    chunk_rows: int = 256,
    keep_bytes: int = 256 * 2**20,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability (float32) of `tokens` under softmax(hidden · weightᵀ / temperature), fused.

    hidden: (..., H) states before the output layer, weight: (V, H), tokens: (...). Equal to
    `token_log_probs(hidden @ weight.T / temperature, tokens)`, but computed `chunk_rows`
    positions at a time, with no log-softmax tensor and no full-vocabulary gradient kept
    around. For backward, the chunks' float32 exponentials are kept when all of them take at
    most `keep_bytes` (measured ~12 % faster than recomputing the logits on the quickstart
    model) and the logits are recomputed chunk by chunk otherwise, so memory stays flat for
    long completions and large vocabularies. With `with_entropy`, also the entropy of that
    softmax at each position (same shape as `tokens`, float32, without gradient).
    """
    shape = tokens.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    keep = needs_grad and flat_hidden.shape[0] * weight.shape[0] * 4 <= keep_bytes
    flat, entropy = _LinearTokenLogProbs.apply(
        flat_hidden, weight, tokens.reshape(-1), float(temperature), chunk_rows, keep, with_entropy
    )
    return (flat.view(shape), entropy.view(shape)) if with_entropy else flat.view(shape)


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
    model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int, temperature: float = 1.0,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (float32) of the completion tokens of `sequences` under `model`: (B, C).

    Trims the columns that are padding in every row of this batch; positions that are not
    completion tokens hold 0, passes explicit position ids (so left padding is handled as in
    generation) and computes the output layer at completion positions only. Logits are
    divided by the sampling `temperature`, so the log-probs are those of the distribution
    the completions were drawn from (top-p/top-k truncation is not modelled). Where the
    architecture allows, the output layer and log-softmax run fused and chunked
    (`linear_token_log_probs`), so no (batch × length × vocab) logits tensor is ever built,
    and rows that share a prompt read it once (`shared_prompt_log_probs`). With `with_entropy`,
    also the (B, C) entropy of that distribution at each completion token (0 elsewhere), without
    gradient: a by-product of the same chunks.
    """
    split = split_output_layer(model)
    if split is not None and shares_prompts(model):
        return shared_prompt_log_probs(
            model, split[1], sequences, attention_mask, prompt_length, temperature, with_entropy
        )
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
        outputs = linear_token_log_probs(hidden, weight, completion, temperature, with_entropy=with_entropy)
    else:
        logits = model(**inputs, logits_to_keep=completion.shape[1] + 1).logits[:, :-1]
        scaled = logits / temperature if temperature != 1.0 else logits
        outputs = token_log_probs(scaled, completion, with_entropy=with_entropy)
    completion_mask = attention_mask[:, prompt_length - first :]
    padded = [
        torch.nn.functional.pad(x * completion_mask, (0, full_width - x.shape[1]))
        for x in (outputs if with_entropy else (outputs,))
    ]
    return tuple(padded) if with_entropy else padded[0]


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
    prompt_length: int, temperature: float = 1.0, with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
    outputs = linear_token_log_probs(
        predicting, output_weight, completion[completion_mask], temperature, with_entropy=with_entropy
    )
    full_mask = torch.nn.functional.pad(completion_mask, (0, full_width - width))
    placed = [
        torch.zeros(rows, full_width, dtype=flat.dtype, device=device).masked_scatter(full_mask, flat)
        for flat in (outputs if with_entropy else (outputs,))
    ]
    return tuple(placed) if with_entropy else placed[0]


def batched_log_probs(model, rollout, rows: torch.Tensor, micro_batch: int, temperature: float) -> torch.Tensor:
    """Completion log-probs of the given rows of a `Rollout`, `micro_batch` rows per forward."""
    parts = []
    for start in range(0, len(rows), micro_batch):
        index = rows[start : start + micro_batch]
        parts.append(
            completion_log_probs(
                model, rollout.sequences[index], rollout.attention_mask[index], rollout.prompt_length, temperature
            )
        )
    return torch.cat(parts, dim=0)

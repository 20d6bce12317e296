"""krpo's own sampler for Llama-family models: LoRA folded in, fused projections, a static KV cache.

HF `generate` runs every LoRA layer as base + B·A on each token, grows its KV cache by
concatenation and, on a CPU, multiplies a handful of rows by each weight with a kernel
made for big matrices. A decode step is dominated by reading the weights, so this sampler
instead, once per rollout:

- in float32 merges each adapter into a private copy of its weight (W + s·B·A; the model is
  untouched); in bf16/fp16 applies it beside the weights as the loss's forward does (`FusedLinear`),
- fuses q/k/v and gate/up into one matrix each (fewer, larger products),
- on a CPU with oneDNN, re-lays each matrix out for oneDNN's small-batch kernel,

then decodes with a preallocated KV cache. Norms, rotary embedding and activation compute
what the model's own modules compute (in float32 the norms run fused and the rotation with
fewer ops, both bit-identical), so the arithmetic is the model's up to float rounding.
Sampling follows `generate`: min-new-tokens, then temperature, top-k, top-p; finished rows
emit padding.
Architectures other than `SUPPORTED` (or adapters other than plain LoRA) use HF `generate`.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from krpo_cli.activations import down_of_gated
from krpo_cli.models import cpu_has_fast_bf16

SUPPORTED = {"llama", "mistral", "qwen2", "qwen3"}


def unwrap(model):
    """The transformers model inside a PEFT wrapper (or `model` itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def architecture_supported(model) -> bool:
    """True when `transformer_hidden` computes what `model` (plain or PEFT-wrapped) computes."""
    base = unwrap(model)
    config = base.config
    if config.model_type not in SUPPORTED or getattr(base, "base_model_prefix", None) != "model":
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False  # a window would change attention for long sequences; leave it to HF
    return not (config.model_type in ("llama", "mistral") and getattr(config, "mlp_bias", False))


def engine_supports(model) -> bool:
    """True when `model` (plain or PEFT-wrapped) can be decoded here: a supported architecture, plain LoRA."""
    if not architecture_supported(model):
        return False
    base = unwrap(model)
    if not all(plain_lora(m) for m in base.modules() if hasattr(m, "lora_A")):
        return False
    embed, head = base.model.embed_tokens, base.get_output_embeddings()
    return not hasattr(embed, "lora_A") and not hasattr(embed, "lora_embedding_A") and type(head) is torch.nn.Linear


def plain_lora(layer) -> bool:
    """True when every active adapter of a LoRA `layer` is W + s·B·A, not yet merged into W.

    DoRA, a LoRA bias and PEFT's other variants are not; a merged delta is already in the
    base weight, and adding it again would double it.
    """
    if getattr(layer, "merged", False):
        return False
    for name in layer.active_adapters:
        if layer.use_dora.get(name, False) or getattr(layer, "lora_bias", {}).get(name, False):
            return False
        if getattr(layer, "lora_variant", {}).get(name) is not None:
            return False
    return True


def adapters(layer) -> list[str]:
    """The LoRA adapters a layer applies (none if it has none, or they are switched off)."""
    if not hasattr(layer, "lora_A") or layer.disable_adapters:
        return []
    return [name for name in layer.active_adapters if name in layer.lora_A]


def dense_weight(layer, merge: bool = True) -> torch.Tensor:
    """The weight a (possibly LoRA-wrapped, possibly 4-bit) linear layer applies, as a dense tensor;
    with `merge=False` its base weight alone."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    weight = base.weight
    if getattr(weight, "quant_state", None) is not None:  # bitsandbytes 4-bit
        import bitsandbytes.functional as bnbf

        weight = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    weight = weight.detach()
    names = adapters(layer) if merge else []
    if names:
        weight = weight.clone()
        for name in names:
            add_delta_weight(weight, layer, name)
    return weight


def add_delta_weight(weight: torch.Tensor, layer, name: str) -> None:
    """weight += s·B·A, the delta PEFT's `get_delta_weight(name)` returns, in one pass over `weight`
    (PEFT's way writes B·A, scales it and adds it: three passes over a full-size matrix)."""
    if getattr(layer, "fan_in_fan_out", False):  # stored transposed (GPT-2's Conv1D): PEFT's own way
        weight += layer.get_delta_weight(name).to(weight.dtype)
        return
    down, up = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
    weight.addmm_(up.to(weight.dtype), down.to(weight.dtype), alpha=float(layer.scaling[name]))


def low_rank_factors(layers, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The adapters of `layers` as (down, scales, up): (x·downᵀ)·scales·upᵀ is every layer's
    s·x·Aᵀ·Bᵀ, concatenated as the fused outputs are; `up` is block-diagonal. None if no layer has one."""
    blocks = [(i, layer, name) for i, layer in enumerate(layers) for name in adapters(layer)]
    if not blocks:
        return None
    first = layers[blocks[0][0]].lora_B[blocks[0][2]].weight
    downs = [layer.lora_A[name].weight.detach().to(first.dtype) for _, layer, name in blocks]
    # Scaling after the product, as adapted_linear scales: folded into A it rounds differently.
    scales = torch.cat([torch.full((d.shape[0],), float(layer.scaling[name]), dtype=first.dtype, device=first.device)
                        for (_, layer, name), d in zip(blocks, downs)])
    up = torch.zeros(sum(sizes), len(scales), dtype=first.dtype, device=first.device)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    column = 0
    for (i, layer, name), down in zip(blocks, downs):
        up[offsets[i] : offsets[i] + sizes[i], column : column + down.shape[0]] = layer.lora_B[name].weight.detach()
        column += down.shape[0]
    return torch.cat(downs), scales, up


def dense_bias(layer) -> torch.Tensor | None:
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    return None if base.bias is None else base.bias.detach()


class FusedLinear:
    """y = x·Wᵀ + b for several layers at once (their outputs concatenated along the last dim).

    In float32 a LoRA adapter is merged into the private weight. In bf16/fp16 it is not: a weight
    change below half a unit of the last place rounds back to the base weight (after a few steps
    most of an adapter's changes are that small), so the samples would come from nearly the base
    model. There the adapter is applied as the loss's forward applies it (`adapted_linear`):
    base output + s·x·Aᵀ·Bᵀ in the adapter's precision, rounded once.
    """

    def __init__(self, layers, dtype: torch.dtype, pack: bool, rows_hint: int):
        merge = dtype == torch.float32
        weights = [dense_weight(layer, merge).to(dtype) for layer in layers]
        biases = [dense_bias(layer) for layer in layers]
        self.sizes = [w.shape[0] for w in weights]
        self.low_rank = None if merge else low_rank_factors(layers, self.sizes)
        self.bias = None
        if any(b is not None for b in biases):
            zeros = [torch.zeros(w.shape[0], dtype=dtype, device=w.device) for w in weights]
            self.bias = torch.cat([z if b is None else b.to(dtype) for b, z in zip(biases, zeros)])
        weight = weights[0] if len(weights) == 1 else torch.cat(weights, dim=0)
        # oneDNN keeps its own layout of the matrix; the plain one is then not needed.
        self.weight = None if pack else weight
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint) if pack else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.packed is None:
            out = F.linear(flat, self.weight, self.bias)
        else:
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        if self.low_rank is not None:
            down, scales, up = self.low_rank
            low = F.linear(flat.to(down.dtype), down) * scales
            out = out.to(down.dtype).addmm_(low, up.T).to(x.dtype)  # in place: one wide buffer, not two
        return out.view(*x.shape[:-1], out.shape[-1])

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each fused layer's output, in order."""
        return self(x).split(self.sizes, dim=-1)


class ModuleLinear:
    """The model's own layers called one by one (quantization and autograd included), LoRA folded in."""

    def __init__(self, layers):
        self.layers = layers

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(adapted_linear(layer, x) for layer in self.layers)


def adapted_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """What `layer(x)` computes for a plain LoRA layer, as base(x) + (s·x·Aᵀ)·Bᵀ in one addmm.

    PEFT scales and adds the adapter's output at full width; scaling the rank-r product and
    adding inside the B product saves two full-width passes forward and one backward.
    Anything else (no adapter, adapters disabled, active dropout, DoRA, …) calls the layer.
    """
    if not hasattr(layer, "lora_A") or layer.disable_adapters or not plain_lora(layer):
        return layer(x)
    names = adapters(layer)
    if layer.training and any(getattr(layer.lora_dropout[name], "p", 0.0) > 0 for name in names):
        return layer(x)
    result = layer.base_layer(x)
    out = result.reshape(-1, result.shape[-1])
    for name in names:
        down, up = layer.lora_A[name].weight, layer.lora_B[name].weight
        low = F.linear(x.to(down.dtype), down) * layer.scaling[name]
        out = torch.addmm(out.to(low.dtype), low.reshape(-1, low.shape[-1]), up.T)
    return out.view(result.shape).to(result.dtype)


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN's packed small-batch kernel: CPU builds with oneDNN, float32, or bfloat16 where the
    CPU multiplies it natively (measured, batch 16: float32 110 → 63 ms a token, bfloat16 65 → 54 ms)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_has_fast_bf16())


class DecoderWeights:
    """Per-layer projections of a Llama-family model.

    `fused=True` (sampling): fused and packed private copies (the adapter merged in float32), built once per rollout.
    `fused=False` (log-probs for the loss): the model's own layers, so gradients reach the adapter.
    """

    def __init__(self, model, rows_hint: int = 1, fused: bool = True):
        base = unwrap(model)
        self.base = base
        self.config = base.config
        embed = base.model.embed_tokens.weight
        self.dtype, self.device = embed.dtype, embed.device
        pack = can_pack(self.device, self.dtype)

        def projection(layers):
            return FusedLinear(layers, self.dtype, pack, rows_hint) if fused else ModuleLinear(layers)

        self.layers = []
        for layer in base.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                dict(
                    qkv=projection([attn.q_proj, attn.k_proj, attn.v_proj]),
                    o=projection([attn.o_proj]),
                    gate_up=projection([mlp.gate_proj, mlp.up_proj]),
                    down=projection([mlp.down_proj]),
                    module=layer,
                )
            )
        self.lm_head = FusedLinear([base.get_output_embeddings()], self.dtype, pack, rows_hint) if fused else None


class StaticCache:
    """Keys and values for every layer, preallocated for the whole rollout."""

    def __init__(self, num_layers, batch, kv_heads, max_length, head_dim, dtype, device):
        shape = (num_layers, batch, kv_heads, max_length, head_dim)
        # Zeros, not garbage: the fixed-shape step (`DecodeStep`) also attends to columns not
        # yet written, masked, and a masked NaN would still poison the weighted sum.
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor):
        end = start + keys.shape[2]
        self.keys[layer, :, :, start:end] = keys
        self.values[layer, :, :, start:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


def rms_norm(module, x: torch.Tensor) -> torch.Tensor:
    """The model's RMSNorm `module` applied to `x`.

    In float32 as one fused op, bit-identical to the module's seven. In lower precision the
    module itself runs: it rounds the normalised value before scaling, which the fused op does not.
    """
    if x.dtype == torch.float32 and hasattr(module, "variance_epsilon"):
        return F.rms_norm(x, module.weight.shape, module.weight, module.variance_epsilon)
    return module(x)


def signed_sine(sin: torch.Tensor) -> torch.Tensor:
    """The rotary sine with rotate_half's sign folded in: its first half negated."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding x·cos + rotate_half(x)·sin in four ops; `signed_sin` from `signed_sine`."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def transformer_hidden(weights: DecoderWeights, input_ids, position_ids, attention):
    """Hidden states (B, T, H) before the final norm for `input_ids` at `position_ids`.

    attention(layer, q, k, v, scale) → (B, heads, T, head_dim) attends the rotated queries
    (B, heads, T, d) to keys and values (B, kv_heads, T, d) wherever they come from: a
    decoding cache, or prompts shared by several rows.
    """
    config, base = weights.config, weights.base
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    batch, length = input_ids.shape
    hidden = base.model.embed_tokens(input_ids)
    cos, sin = base.model.rotary_emb(hidden, position_ids)
    cos, signed_sin = cos.unsqueeze(1), signed_sine(sin).unsqueeze(1)
    for index, layer in enumerate(weights.layers):
        module = layer["module"]
        attn = module.self_attn
        normed = rms_norm(module.input_layernorm, hidden)
        q, k, v = layer["qkv"].outputs(normed)
        q = q.view(batch, length, heads, head_dim)
        k = k.view(batch, length, kv_heads, head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3 normalises each head before the rotation
            q, k = rms_norm(attn.q_norm, q), rms_norm(attn.k_norm, k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(batch, length, kv_heads, head_dim).transpose(1, 2)
        q, k = rotate(q, cos, signed_sin), rotate(k, cos, signed_sin)
        out = attention(index, q, k, v, attn.scaling)
        (attended,) = layer["o"].outputs(out.transpose(1, 2).reshape(batch, length, heads * head_dim))
        hidden = hidden + attended
        gate, up = layer["gate_up"].outputs(rms_norm(module.post_attention_layernorm, hidden))
        (mlp_out,) = down_of_gated(layer["down"].outputs, module.mlp.act_fn, gate, up)
        hidden = hidden + mlp_out
    return hidden


def prompt_attention_mask(prompt_mask: torch.Tensor) -> torch.Tensor:
    """(B, P, P) boolean: causal attention among a left-padded prompt's real tokens.

    A padding query attends to itself only, so that it stays finite (nothing attends to it).
    """
    length = prompt_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=prompt_mask.device).tril()
    return (causal & prompt_mask[:, None, :]) | torch.eye(length, dtype=torch.bool, device=prompt_mask.device)


def masked_attention(q, keys, values, mask, scale):
    """Scaled dot-product attention with a boolean mask; grouped-query heads are shared, not copied."""
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != keys.shape[1])


def forward_step(weights: DecoderWeights, cache: StaticCache, input_ids, position_ids, start: int, mask: torch.Tensor):
    """Float32 logits (B, V) of the last position after feeding `input_ids` at cache columns start…start+T.

    mask: (B, 1, T, start+T) boolean, True where a query may attend a key.
    """

    def cached_attention(index, q, k, v, scale):
        keys, values = cache.update(index, start, k, v)
        return masked_attention(q, keys, values, mask, scale)

    hidden = transformer_hidden(weights, input_ids, position_ids, cached_attention)
    return last_logits(weights, hidden)


def last_logits(weights: DecoderWeights, hidden: torch.Tensor) -> torch.Tensor:
    last = rms_norm(weights.base.model.norm, hidden[:, -1:])
    (logits,) = weights.lm_head.outputs(last)
    return logits[:, -1].float()


def uses_fixed_shape_steps(device: torch.device) -> bool:
    """Decode with `DecodeStep` (and a CUDA graph) on CUDA; a CPU runs each op as it comes anyway."""
    return device.type == "cuda"


class DecodeStep:
    """One decoding step (a token per row) that runs the same kernels on the same buffers every time.

    The new keys and values go to a cache column held in a tensor, and attention spans the
    cache's first `width` columns, masked, where `width` grows in steps of WIDTH_STEP columns (so
    a long completion does not read the whole cache from its first token). On CUDA each width's
    step is captured as a CUDA graph when decoding first reaches it and then replayed: a small
    model's step is hundreds of short kernels, and launching them one by one from Python costs
    more than running them. Without CUDA, or where capture fails, the same step runs eagerly.
    """

    WIDTH_STEP = 256

    def __init__(self, weights: DecoderWeights, cache: StaticCache, batch: int, graph: bool):
        device = cache.keys.device
        self.weights, self.cache, self.total = weights, cache, cache.keys.shape[3]
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.mask = torch.zeros(batch, 1, 1, self.total, dtype=torch.bool, device=device)
        self.use_graph = graph
        self.graph, self.graph_width, self.logits = None, 0, None

    def run(self, width: int) -> torch.Tensor:
        def cached_attention(index, q, k, v, scale):
            keys, values = self.cache.keys[index], self.cache.values[index]
            keys.index_copy_(2, self.column, k)
            values.index_copy_(2, self.column, v)
            return masked_attention(q, keys[:, :, :width], values[:, :, :width], self.mask[..., :width], scale)

        hidden = transformer_hidden(self.weights, self.tokens, self.position, cached_attention)
        return last_logits(self.weights, hidden)

    def width_for(self, column: int) -> int:
        """The attention width of the step that writes cache `column`."""
        return min(self.total, -(-(column + 1) // self.WIDTH_STEP) * self.WIDTH_STEP)

    def needs_capture(self, column: int) -> bool:
        return self.use_graph and self.graph_width != self.width_for(column)

    def capture(self, width: int) -> None:
        """Record this width's step as a CUDA graph (replacing the last width's).

        The warm-up before the capture runs the step for real, on the inputs already in place;
        the replay that follows computes the same step again, which writes the same keys.
        `capture_begin`/`capture_end` on a side stream rather than `torch.cuda.graph`, which
        also synchronises and empties the allocator's cache at every capture (once per
        rollout here); the stream context restores the current stream even if capture fails.
        """
        self.graph, self.logits = None, None  # the previous width's graph is not needed again
        main = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(main)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(side):
                self.run(width)  # warm-up: lazy initialisation stays out of the graph
                graph.capture_begin()
                try:
                    self.logits = self.run(width)
                finally:
                    graph.capture_end()
            self.graph, self.graph_width = graph, width
        except RuntimeError as err:  # an op that cannot be captured: decode eagerly from now on
            cause = err.__context__ or err  # capture_end's complaint hides what broke the capture
            warnings.warn(f"krpo's decoder runs without a CUDA graph: capture failed ({str(cause)[:300]})",
                          stacklevel=3)
            self.use_graph, self.logits = False, None
        main.wait_stream(side)

    def __call__(self, tokens: torch.Tensor, position: torch.Tensor, column: int, key_valid: torch.Tensor):
        """Float32 logits (B, V) after feeding `tokens` (B,) at `position` (B, 1) and cache `column`.

        key_valid: (B, cache length) boolean, True for the columns a row attends to. With a
        graph, the logits tensor is reused: read it before the next call.
        """
        self.tokens.copy_(tokens[:, None])
        self.position.copy_(position)
        self.column.fill_(column)
        self.mask.copy_(key_valid[:, None, None, :])
        width = self.width_for(column)
        if self.needs_capture(column):
            self.capture(width)
        if not self.use_graph:
            return self.run(width)
        self.graph.replay()
        return self.logits


NON_FINITE = "the model produced non-finite logits while sampling"


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    finite: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row from (B, V) float logits, with `generate`'s warpers in its order.

    Temperature divides the logits; top-k keeps the k largest; top-p keeps the smallest set
    of tokens whose probability reaches p (always at least one). Greedy takes the argmax.
    Non-finite logits raise FloatingPointError, or, given a boolean tensor `finite`, clear it
    (so that a GPU caller need not wait for the answer at every token).
    """
    if greedy:
        return logits.argmax(dim=-1)
    # float64, so that rare tokens still widen the running sum below and the uniform resolves
    # them; a private copy, worked on in place (each new (B, V) buffer costs a pass of page faults).
    scores = logits.to(torch.float64, copy=True)
    if temperature != 1.0:
        scores /= temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores.masked_fill_(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1)  # ascending
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1.0 - top_p
        drop_sorted[:, -1] = False  # the most likely token always stays
        scores.masked_fill_(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    # Inverse-CDF draw: one uniform number per row, scaled to the row's unnormalised total
    # (softmax's division is not needed). (torch.multinomial draws an exponential variate per
    # vocabulary entry, which cost ~15 % of a decode step on a CPU.) Tokens with probability
    # zero have empty intervals and are never drawn. A NaN or +inf logit makes the total NaN.
    cdf = scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_().cumsum_(dim=-1)
    if finite is not None:
        finite &= torch.isfinite(cdf[:, -1]).all()
    elif not bool(torch.isfinite(cdf[:, -1]).all()):
        raise FloatingPointError(NON_FINITE)
    uniform = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, uniform, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


def prefill(weights: DecoderWeights, cache: StaticCache, input_ids, prompt_mask, positions, group_size: int) -> torch.Tensor:
    """Run the prompts into `cache`; returns the logits after each row's prompt.

    Rows that come in runs of `group_size` copies of a prompt (a rollout's layout) read each
    prompt once and copy its keys and values to its rows.
    """
    batch, prompt_length = input_ids.shape
    attend = prompt_attention_mask(prompt_mask.bool())
    shared = group_size > 1 and batch % group_size == 0
    if shared:
        firsts = slice(None, None, group_size)
        shared = torch.equal(input_ids, input_ids[firsts].repeat_interleave(group_size, dim=0))
    if not shared:
        return forward_step(weights, cache, input_ids, positions, 0, attend[:, None])
    prompts_cache = StaticCache(len(weights.layers), batch // group_size, cache.keys.shape[2],
                                prompt_length, cache.keys.shape[-1], weights.dtype, weights.device)
    logits = forward_step(weights, prompts_cache, input_ids[firsts], positions[firsts], 0, attend[firsts, None])
    cache.keys[:, :, :, :prompt_length] = prompts_cache.keys.repeat_interleave(group_size, dim=1)
    cache.values[:, :, :, :prompt_length] = prompts_cache.values.repeat_interleave(group_size, dim=1)
    return logits.repeat_interleave(group_size, dim=0)


@torch.no_grad()
def generate_tokens(
    model,
    input_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    *,
    eos_ids: list[int],
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_new_tokens: int | None = None,
    greedy: bool = False,
    group_size: int = 1,
) -> torch.Tensor:
    """Completion token ids (B, ≤ max_new_tokens) for left-padded prompts; rows end at EOS, then padding.

    With `group_size` G > 1 and rows that come in runs of G copies of a prompt (a rollout's
    layout), each prompt is read once and its keys and values are copied to its G rows.
    """
    batch, prompt_length = input_ids.shape
    weights = DecoderWeights(model, rows_hint=batch)
    config = weights.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    total = prompt_length + max_new_tokens
    cache = StaticCache(
        len(weights.layers), batch, config.num_key_value_heads, total, head_dim, weights.dtype, weights.device
    )
    device = input_ids.device
    decode_step = None
    if uses_fixed_shape_steps(device) and max_new_tokens > 1:
        decode_step = DecodeStep(weights, cache, batch, graph=device.type == "cuda")
    eos = torch.tensor(eos_ids, device=device)
    key_valid = torch.zeros(batch, total, dtype=torch.bool, device=device)
    key_valid[:, :prompt_length] = prompt_mask.bool()

    positions = (prompt_mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = prefill(weights, cache, input_ids, prompt_mask, positions, group_size)

    tokens = torch.full((batch, max_new_tokens), pad_id, dtype=input_ids.dtype, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    end_step = torch.zeros(batch, dtype=torch.long, device=device)  # the step at which a row ended
    position = positions[:, -1:]
    # With fixed-shape steps (a GPU) the host asks whether every row has ended (and whether the
    # logits were finite) every few tokens only: each question waits for the GPU to drain its queue.
    check_every = 8 if decode_step is not None else 1
    finite = torch.ones((), dtype=torch.bool, device=device) if check_every > 1 else None
    for step in range(max_new_tokens):
        if min_new_tokens and step < min_new_tokens:
            logits.index_fill_(1, eos, float("-inf"))  # `logits[:, eos] = …` can copy the value to the GPU, and wait
        next_token = sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, finite=finite)
        next_token = torch.where(finished, torch.full_like(next_token, pad_id), next_token)
        tokens[:, step] = next_token
        ends = torch.isin(next_token, eos) & ~finished
        end_step = torch.where(ends, step, end_step)
        finished |= ends
        last = step == max_new_tokens - 1
        if last or (step + 1) % check_every == 0:
            if finite is not None and not bool(finite):
                raise FloatingPointError(NON_FINITE)
            if bool(finished.all()):  # no column after the last row's end
                return tokens[:, : int(end_step.max()) + 1]
            if last:
                return tokens
        column = prompt_length + step
        if decode_step is not None and decode_step.needs_capture(column) and bool(finished.all()):
            return tokens[:, : int(end_step.max()) + 1]  # done: no graph to capture for steps nobody needs
        key_valid[:, column] = True
        position = position + 1
        if decode_step is not None:
            logits = decode_step(next_token, position, column, key_valid)
        else:
            attend = key_valid[:, None, None, : column + 1]
            logits = forward_step(weights, cache, next_token[:, None], position, column, attend)
    return tokens

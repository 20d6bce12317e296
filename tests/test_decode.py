"""krpo's own decoder (krpo_cli.decode) against HF: same logits, same greedy text, same sampling rules."""

import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from krpo_cli import decode
from krpo_cli.decode import generate_tokens, sample_next_token
from krpo_cli.rollout import generate_rollout, pick_engine
from krpo_cli.models import ModelError, load_tokenizer
from conftest import make_adapter


def tiny_config(kind: str):
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=2, tie_word_embeddings=True)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "qwen2":  # q/k/v biases
        return Qwen2Config(**common, use_sliding_window=False)
    return Qwen3Config(**common, head_dim=16, use_sliding_window=False)  # per-head q/k norms, head_dim ≠ hidden/heads


def left_padded_prompts():
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [0, 13, 14, 15, 16]])
    return ids, (ids != 0).long()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("pack, fixed_shape", [(True, False), (False, False), (False, True)])
def test_greedy_decoding_equals_hf_generate(kind, pack, fixed_shape, monkeypatch):
    """Packed weights (CPU), plain weights, and the fixed-shape steps a GPU replays as a CUDA graph."""
    monkeypatch.setattr(decode, "can_pack", lambda device, dtype: pack and torch.backends.mkldnn.is_available())
    monkeypatch.setattr(decode, "uses_fixed_shape_steps", lambda device: fixed_shape)
    monkeypatch.setattr(decode.DecodeStep, "WIDTH_STEP", 4)  # attention's width grows 8, 12, 16
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(kind)).eval()
    for param in model.parameters():  # larger weights: sharper distributions, no near-ties in argmax
        param.data.mul_(4.0)
    ids, mask = left_padded_prompts()
    assert decode.engine_supports(model)
    ours = generate_tokens(model, ids, mask, 12, eos_ids=[2], pad_id=0, greedy=True)
    theirs = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                            pad_token_id=0, eos_token_id=[2])[:, ids.shape[1]:]
    assert torch.equal(ours, theirs)


def cpu_can_reorder_bf16() -> bool:
    """oneDNN's bf16 weight reorder needs AVX-NE-CONVERT or AVX512 BW+VL+DQ (any CPU with native bf16 has them)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return "avx_ne_convert" in flags or {"avx512bw", "avx512vl", "avx512dq"} <= flags


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs a torch build with oneDNN")
@pytest.mark.skipif(not cpu_can_reorder_bf16(), reason="oneDNN's bf16 packing needs AVX512 BW/VL/DQ or AVX-NE-CONVERT")
def test_packed_bfloat16_weights_give_the_models_logits(tiny_model_dir, monkeypatch):
    """oneDNN-packed bf16 matrices (used where the CPU has native bf16): the model's logits up to bf16 rounding."""
    monkeypatch.setattr(decode, "cpu_has_fast_bf16", lambda: True)  # packing runs (slowly) on any CPU
    assert decode.can_pack(torch.device("cpu"), torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    ids, mask = left_padded_prompts()
    weights = decode.DecoderWeights(model, rows_hint=3)
    assert weights.layers[0]["qkv"].packed is not None
    cache = decode.StaticCache(2, 3, 2, 8, 8, torch.bfloat16, torch.device("cpu"))
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    attend = (torch.ones(5, 5, dtype=torch.bool).tril() & mask.bool()[:, None, :]) | torch.eye(5, dtype=torch.bool)
    ours = decode.forward_step(weights, cache, ids, positions, 0, attend[:, None])
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
    assert (ours - theirs).norm() <= 0.02 * theirs.norm()
    monkeypatch.setattr(decode, "cpu_has_fast_bf16", lambda: False)
    assert not decode.can_pack(torch.device("cpu"), torch.bfloat16)  # slow bf16 products: plain weights


def test_decoder_logits_match_the_model_forward(tiny_model_dir, tmp_path):
    """With a LoRA adapter merged in: last-position logits equal the PEFT model's own forward."""
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", scale=0.3)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = left_padded_prompts()
    weights = decode.DecoderWeights(model, rows_hint=3)
    cache = decode.StaticCache(2, 3, 2, 8, 8, torch.float32, torch.device("cpu"))
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    attend = (causal & mask.bool()[:, None, :]) | torch.eye(5, dtype=torch.bool)
    ours = decode.forward_step(weights, cache, ids, positions, 0, attend[:, None])
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    assert torch.allclose(ours, theirs, atol=1e-4)
    # one decode step on top of the cache
    next_ids = torch.tensor([[20], [21], [22]])
    full_ids, full_mask = torch.cat([ids, next_ids], 1), torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
    valid = torch.cat([mask.bool(), torch.ones(3, 1, dtype=torch.bool)], 1)
    ours = decode.forward_step(weights, cache, next_ids, positions[:, -1:] + 1, 5, valid[:, None, None])
    with torch.no_grad():
        theirs = model(input_ids=full_ids, attention_mask=full_mask, position_ids=(full_mask.cumsum(1) - 1).clamp(min=0)).logits[:, -1]
    assert torch.allclose(ours, theirs, atol=1e-4)
    # the merge went into private copies: the model's own weights are untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_and_rotation_are_bit_identical_to_the_model_modules(dtype):
    """The decoder's fused RMSNorm and its rotation give exactly what transformers' Llama code gives."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    torch.manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-5)
    norm.weight.data.normal_(1.0, 0.2)
    norm = norm.to(dtype)
    x = (torch.randn(3, 5, 64) * 4).to(dtype)
    assert torch.equal(decode.rms_norm(norm, x), norm(x))

    q, k = torch.randn(2, 4, 6, 16).to(dtype), torch.randn(2, 2, 6, 16).to(dtype)
    angles = torch.randn(2, 6, 8)
    cos, sin = torch.cat([angles, angles], -1).cos().to(dtype), torch.cat([angles, angles], -1).sin().to(dtype)
    expected_q, expected_k = apply_rotary_pos_emb(q, k, cos, sin)
    signed_sin = decode.signed_sine(sin).unsqueeze(1)
    assert torch.equal(decode.rotate(q, cos.unsqueeze(1), signed_sin), expected_q)
    assert torch.equal(decode.rotate(k, cos.unsqueeze(1), signed_sin), expected_k)


def lora_layer(dropout: float):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("proj", torch.nn.Linear(6, 5))
    wrapped = get_peft_model(net, LoraConfig(r=2, lora_alpha=6, lora_dropout=dropout, target_modules=["proj"]))
    layer = wrapped.base_model.model.proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # B starts at zero: make the adapter matter
    return wrapped, layer


def test_in_bfloat16_the_decoder_applies_the_adapter_as_the_loss_does():
    """Merged into a bf16 weight, an adapter's changes below half a bf16 step round back to the base
    weight, and samples came from another policy than the one the loss scores. Unmerged, the
    decoder's product is the loss's forward (`adapted_linear`) exactly."""
    _, layer = lora_layer(dropout=0.0)
    layer.base_layer.to(torch.bfloat16)  # a bf16 base with a float32 adapter, as PEFT makes them
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=3e-4)  # an adapter after a few small steps
    merged = decode.dense_weight(layer).to(torch.bfloat16)
    assert (merged == layer.base_layer.weight).float().mean() > 0.5  # most of the merged changes round away
    x = torch.randn(64, 6).to(torch.bfloat16)
    fused = decode.FusedLinear([layer], torch.bfloat16, pack=False, rows_hint=64)
    with torch.no_grad():
        expected = decode.adapted_linear(layer, x)
        assert torch.equal(fused(x), expected)
        assert not torch.equal(F.linear(x, merged, layer.base_layer.bias), expected)
    float32 = decode.FusedLinear([layer.float()], torch.float32, pack=False, rows_hint=4)
    assert float32.low_rank is None  # in float32 a merge keeps the adapter, and costs nothing per token


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_fused_group_applies_each_layers_adapter_to_its_own_outputs(dtype):
    """q/k/v fused, biases (Qwen2), an adapter on q and v only, scaling not a power of two: each
    output equals the loss's forward of its own layer."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2")).to(dtype)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj"]))
    attn = model.base_model.model.model.layers[0].self_attn
    for layer in (attn.q_proj, attn.v_proj):
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    layers = [attn.q_proj, attn.k_proj, attn.v_proj]
    fused = decode.FusedLinear(layers, dtype, pack=False, rows_hint=8)
    x = torch.randn(8, 32).to(dtype)
    with torch.no_grad():
        ours = fused.outputs(x)
        theirs = [decode.adapted_linear(layer, x) for layer in layers]
        assert [o.shape for o in ours] == [t.shape for t in theirs]
        for o, t in zip(ours, theirs):  # equal here; a CPU whose kernels sum a wider product otherwise may differ by an ulp
            torch.testing.assert_close(o, t, rtol=2**-7, atol=2**-9)
        assert not torch.equal(theirs[0], attn.q_proj.base_layer(x))  # the adapter matters


def test_adapted_linear_equals_the_lora_layer_in_values_and_gradients():
    """The folded LoRA product gives PEFT's output and the same gradients for A, B and the input."""
    _, layer = lora_layer(dropout=0.0)
    x = torch.randn(2, 3, 6, requires_grad=True)
    grads = {}
    for name, fn in (("peft", layer), ("ours", lambda t: decode.adapted_linear(layer, t))):
        layer.zero_grad()
        x.grad = None
        out = fn(x)
        (out * torch.linspace(-1, 1, 5)).sum().backward()
        grads[name] = (out.detach(), x.grad.clone(), layer.lora_A["default"].weight.grad.clone(),
                       layer.lora_B["default"].weight.grad.clone())
    for ours, theirs in zip(grads["ours"], grads["peft"]):
        assert torch.allclose(ours, theirs, atol=1e-6)
    base = layer.base_layer(x).detach()
    assert not torch.allclose(grads["ours"][0], base, atol=1e-3)  # the adapter is really in there


def test_adapted_linear_leaves_disabled_adapters_and_dropout_to_the_layer():
    wrapped, layer = lora_layer(dropout=0.0)
    x = torch.randn(4, 6)
    with wrapped.disable_adapter():
        assert torch.equal(decode.adapted_linear(layer, x), layer.base_layer(x))
    wrapped, layer = lora_layer(dropout=0.5)
    layer.train()
    torch.manual_seed(3)
    theirs = layer(x)
    torch.manual_seed(3)
    assert torch.equal(decode.adapted_linear(layer, x), theirs)  # the same dropout draws: PEFT's own forward


def test_sample_next_token_top_k_and_top_p_keep_the_right_tokens():
    torch.manual_seed(0)
    # probabilities 0.5, 0.3, 0.15, 0.05
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    top_k = sample_next_token(logits, top_k=2)
    assert set(top_k.tolist()) == {0, 1}
    assert abs((top_k == 0).float().mean().item() - 0.5 / 0.8) < 0.03  # renormalised over the two kept
    # top-p 0.7: 0.5 alone is short of 0.7, so {0.5, 0.3} is the smallest set reaching it
    top_p = sample_next_token(logits, top_p=0.7)
    assert set(top_p.tolist()) == {0, 1}
    # top-p 0.85 needs the third token too (0.5 + 0.3 = 0.8 < 0.85)
    assert set(sample_next_token(logits, top_p=0.85).tolist()) == {0, 1, 2}
    # temperature 0.5 squares the odds: 0.5² : 0.3² = 25 : 9 between the first two
    hot = sample_next_token(logits, temperature=0.5, top_k=2)
    assert abs((hot == 0).float().mean().item() - 25 / 34) < 0.03
    assert sample_next_token(logits[:1], greedy=True).tolist() == [0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sampling_draws_the_softmax_probabilities_and_leaves_the_logits_alone(dtype):
    """Frequencies of 20,000 draws match softmax(logits) (the rows are shifted by different
    constants, which must not matter), and the caller's logits are not modified in place."""
    probabilities = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0], dtype=torch.float64)
    logits = (probabilities.log() + torch.arange(20000, dtype=torch.float64)[:, None] % 7).to(dtype)
    before = logits.clone()
    drawn = sample_next_token(logits, generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits, before)
    frequencies = torch.bincount(drawn, minlength=5).double() / len(drawn)
    assert frequencies[4] == 0  # probability zero: never drawn
    assert torch.allclose(frequencies, probabilities, atol=0.012)  # 3.4 standard errors of the largest


def test_a_token_far_below_float32_resolution_is_still_drawn(monkeypatch):
    """A token of probability 1e-9 between 50,000 equal others: in a float32 running sum it
    would not move the total, and no uniform could land in its interval."""
    vocabulary, rare = 50_001, 25_000
    logits = torch.zeros(1, vocabulary)
    logits[0, rare] = math.log(5e-5)  # 5e-5 against 50,000 × 1: probability 1e-9
    inside = (rare + 2.5e-5) / (vocabulary - 1 + 5e-5)  # the middle of the rare token's interval
    monkeypatch.setattr(torch, "rand", lambda *shape, **kwargs: torch.full(shape, inside, dtype=kwargs["dtype"]))
    assert sample_next_token(logits).tolist() == [rare]


@pytest.mark.parametrize("fixed_shape", [False, True])
def test_min_new_tokens_and_padding_after_eos(tiny_model_dir, monkeypatch, fixed_shape):
    """Also with fixed-shape steps, which look for the end of every row only every 8 tokens."""
    monkeypatch.setattr(decode, "uses_fixed_shape_steps", lambda device: fixed_shape)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    eos = model.config.eos_token_id
    real_logits = decode.last_logits

    def eos_favoured(*args):  # EOS overwhelmingly likely: only min_new_tokens holds it back
        logits = real_logits(*args)
        logits[:, eos] += 100.0
        return logits

    monkeypatch.setattr(decode, "last_logits", eos_favoured)
    ids = torch.tensor([[40, 41, 42], [43, 44, 45]])
    tokens = generate_tokens(model, ids, torch.ones_like(ids), 6, eos_ids=[eos], pad_id=0, min_new_tokens=3)
    assert tokens.shape == (2, 4)  # stops once every row has ended
    assert (tokens[:, :3] != eos).all() and (tokens[:, 3] == eos).all()
    # a row that ends early is padded while the others go on
    first_row_ends = [True, False]

    def one_row_ends(*args):
        logits = real_logits(*args)
        logits[:, eos] = float("-inf")
        logits[torch.tensor(first_row_ends), eos] = 1e4
        return logits

    monkeypatch.setattr(decode, "last_logits", one_row_ends)
    tokens = generate_tokens(model, ids, torch.ones_like(ids), 5, eos_ids=[eos], pad_id=0, min_new_tokens=2)
    assert tokens.shape == (2, 5)
    assert tokens[0].tolist()[2:] == [eos, 0, 0] and (tokens[1] != eos).all()


def test_pick_engine(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert pick_engine(model, "auto") == "krpo"  # a Llama on the CPU
    assert pick_engine(model, "transformers") == "transformers"
    model.config.model_type = "gpt2"  # pretend: an architecture the decoder does not know
    assert pick_engine(model, "auto") == "transformers"
    with pytest.raises(ModelError, match="does not support"):
        pick_engine(model, "krpo")


def test_rollouts_from_both_engines_have_the_same_layout(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts = ["1 + 2", "a much longer prompt"]
    krpo = generate_rollout(model, tokenizer, prompts, 2, 8, greedy=True, engine="krpo")
    hf = generate_rollout(model, tokenizer, prompts, 2, 8, greedy=True, engine="transformers")
    assert torch.equal(krpo.sequences, hf.sequences) and torch.equal(krpo.completion_mask, hf.completion_mask)
    assert krpo.completions == hf.completions


def test_prompts_shared_across_a_group_are_read_once_with_the_same_result(tiny_model_dir, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids, mask = left_padded_prompts()
    ids, mask = ids.repeat_interleave(3, dim=0), mask.repeat_interleave(3, dim=0)  # 3 prompts × G=3
    prefill_rows = []
    real_step = decode.forward_step

    def counting_step(weights, cache, input_ids, *rest):
        prefill_rows.append(input_ids.shape)
        return real_step(weights, cache, input_ids, *rest)

    monkeypatch.setattr(decode, "forward_step", counting_step)
    shared = generate_tokens(model, ids, mask, 6, eos_ids=[2], pad_id=0, greedy=True, group_size=3)
    assert prefill_rows[0] == (3, 5)  # one row per distinct prompt
    prefill_rows.clear()
    unshared = generate_tokens(model, ids, mask, 6, eos_ids=[2], pad_id=0, greedy=True)
    assert prefill_rows[0] == (9, 5)
    assert torch.equal(shared, unshared)


@pytest.mark.parametrize("option", ["lora_bias", "use_dora"])
def test_adapters_that_do_not_fold_into_the_weights_use_hf_generate(tiny_model_dir, option):
    """A LoRA bias or DoRA is not W + s·B·A: the decoder must refuse rather than drop it."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert decode.engine_supports(get_peft_model(base, LoraConfig(r=2, target_modules="all-linear")))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=2, target_modules="all-linear", **{option: True}))
    assert not decode.engine_supports(model)
    assert pick_engine(model, "auto") == "transformers"


def test_non_finite_logits_are_an_error_not_a_token():
    logits = torch.tensor([[0.0, float("nan"), 1.0]])
    with pytest.raises(FloatingPointError):
        sample_next_token(logits)
    with pytest.raises(FloatingPointError):
        sample_next_token(torch.tensor([[0.0, float("inf"), 1.0]]))
    finite = torch.ones((), dtype=torch.bool)  # or noted, for a caller that asks later
    sample_next_token(torch.tensor([[0.0, 1.0]]), finite=finite)
    assert bool(finite)
    sample_next_token(logits, finite=finite)
    assert not bool(finite)


@pytest.mark.parametrize("fixed_shape", [False, True])
def test_non_finite_logits_while_decoding_stop_the_rollout(tiny_model_dir, monkeypatch, fixed_shape):
    monkeypatch.setattr(decode, "uses_fixed_shape_steps", lambda device: fixed_shape)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    real_logits, calls = decode.last_logits, []

    def nan_on_the_third_token(*args):
        calls.append(1)
        logits = real_logits(*args)
        return logits.fill_(float("nan")) if len(calls) == 3 else logits

    monkeypatch.setattr(decode, "last_logits", nan_on_the_third_token)
    ids = torch.tensor([[40, 41, 42], [43, 44, 45]])
    with pytest.raises(FloatingPointError, match="non-finite"):  # no row may end before the NaN
        generate_tokens(model, ids, torch.ones_like(ids), 12, eos_ids=[2], pad_id=0, min_new_tokens=12)


class StandInGraph:
    """Plays torch.cuda.CUDAGraph on a CPU: a replay re-runs the captured step into its output."""

    def __init__(self, step, fail):
        self.step, self.fail = step, fail

    def capture_begin(self):
        pass

    def capture_end(self):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")

    def replay(self):
        self.step.logits.copy_(self.step.run(self.step.graph_width))


@pytest.mark.parametrize("capture_fails", [False, True])
def test_decode_step_graph_bookkeeping_with_a_stand_in_for_cuda(monkeypatch, capture_fails):
    """One capture per attention width, replays give the eager tokens, and a failed capture warns
    and decodes eagerly (the CUDA graph calls themselves are replaced: no GPU here)."""
    import contextlib

    class Stream:
        def wait_stream(self, other):
            pass

    captures = []
    real_capture = decode.DecodeStep.capture

    def capture(step, width):
        captures.append(width)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: StandInGraph(step, capture_fails))
        real_capture(step, width)

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(decode.DecodeStep, "capture", capture)
    monkeypatch.setattr(decode.DecodeStep, "WIDTH_STEP", 4)
    monkeypatch.setattr(decode, "uses_fixed_shape_steps", lambda device: True)
    real_init = decode.DecodeStep.__init__
    monkeypatch.setattr(decode.DecodeStep, "__init__", lambda self, w, c, b, graph: real_init(self, w, c, b, True))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen2")).eval()
    for param in model.parameters():
        param.data.mul_(4.0)
    ids, mask = left_padded_prompts()
    theirs = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                            pad_token_id=0, eos_token_id=[2])[:, ids.shape[1]:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = generate_tokens(model, ids, mask, 12, eos_ids=[2], pad_id=0, greedy=True)
    assert torch.equal(ours, theirs)
    notices = [str(w.message) for w in caught if "CUDA graph" in str(w.message)]
    if capture_fails:
        assert captures == [8] and len(notices) == 1 and "not permitted" in notices[0]
    else:
        assert captures == [8, 12, 16] and not notices  # columns 5–15 are decoded: widths 8, 12, 16

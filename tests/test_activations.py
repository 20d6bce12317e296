import math

import pytest
import torch
import torch.nn.functional as F

from krpo_cli.activations import down_of_gated, gated_activation, is_silu, recomputed_when_saved, silu_mul


def saved_storages(fn, *args):
    """(result, data pointers of the distinct storages autograd keeps for backward while running fn)."""
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, set(saved)


def test_silu_mul_hand_computed():
    gate = torch.tensor([1.0, 0.0, -1.0, 2.0])
    up = torch.tensor([2.0, 5.0, 1.0, -0.5])
    # silu(x) = x / (1 + e^-x)
    expected = [2 / (1 + math.exp(-1)), 0.0, -1 / (1 + math.e), -0.5 * 2 / (1 + math.exp(-2))]
    assert silu_mul(gate, up).tolist() == pytest.approx(expected, abs=1e-6)
    assert expected[0] == pytest.approx(1.4621171572600098)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("needs", ["both", "gate", "up"])
def test_silu_mul_values_and_gradients_are_autograds_bit_for_bit(dtype, needs):
    torch.manual_seed(0)
    gate0, up0, grad = (torch.randn(5, 7, 24).to(dtype) for _ in range(3))
    results = []
    for fn in (silu_mul, lambda g, u: F.silu(g) * u):
        gate = gate0.clone().requires_grad_(needs in ("both", "gate"))
        up = up0.clone().requires_grad_(needs in ("both", "up"))
        out = fn(gate, up)
        out.backward(grad)
        results.append((out.detach(), gate.grad, up.grad))
    (out, gate_grad, up_grad), (ref_out, ref_gate_grad, ref_up_grad) = results
    assert torch.equal(out, ref_out)
    for got, want in ((gate_grad, ref_gate_grad), (up_grad, ref_up_grad)):
        assert (got is None) == (want is None)
        if want is not None:
            assert torch.equal(got, want)


def test_silu_mul_keeps_gate_and_up_only_for_backward():
    gate = torch.randn(6, 40, requires_grad=True)
    up = torch.randn(6, 40, requires_grad=True)
    a, b = gate * 1.0, up * 1.0  # non-leaf inputs, as in a model
    out, saved = saved_storages(silu_mul, a, b)
    assert saved == {a.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()}
    _, autograd_saved = saved_storages(lambda g, u: F.silu(g) * u, a, b)
    assert len(autograd_saved) == 3  # what it replaces also keeps silu(gate)
    out.sum().backward()
    assert gate.grad is not None and up.grad is not None


def test_without_gradients_silu_mul_leaves_its_inputs_alone():
    gate, up = torch.randn(3, 8), torch.randn(3, 8)
    gate_copy, up_copy = gate.clone(), up.clone()
    with torch.no_grad():
        out = silu_mul(gate, up)
    assert torch.equal(gate, gate_copy) and torch.equal(up, up_copy)
    assert torch.equal(out, F.silu(gate_copy) * up_copy)


def test_gated_activation_recognises_silu_and_calls_any_other_activation():
    from transformers.activations import ACT2FN

    assert is_silu(torch.nn.SiLU()) and is_silu(ACT2FN["silu"])
    assert not is_silu(torch.nn.GELU()) and not is_silu(ACT2FN["gelu"])
    gate, up = torch.randn(4, 10), torch.randn(4, 10)
    assert torch.equal(gated_activation(torch.nn.GELU(), gate, up), F.gelu(gate) * up)
    assert torch.equal(gated_activation(ACT2FN["silu"], gate, up), F.silu(gate) * up)
    mixed = gated_activation(torch.nn.SiLU(), gate.bfloat16(), up)  # promoted as `act(gate) * up` is
    assert mixed.dtype == torch.float32 and torch.equal(mixed, F.silu(gate.bfloat16()) * up)


def test_the_loss_forward_keeps_only_gate_and_up_of_each_mlp(monkeypatch):
    """completion_log_probs (the update's forward) keeps two (tokens × intermediate) tensors per layer
    for backward, gate and up: not silu(gate) (silu_mul), nor the down projection's input, which
    its adapter needs for A's gradient (down_of_gated recomputes it). The gradients are those of
    keeping everything, bit for bit."""
    import gc
    import weakref
    from contextlib import nullcontext

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from krpo_cli import activations, decode
    from krpo_cli.log_probs import completion_log_probs

    intermediate, layers = 48, 3
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(config),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.train()
    sequences = torch.tensor([[5, 6, 7, 30, 31, 32], [5, 6, 7, 33, 34, 35]])
    attention = torch.ones_like(sequences)
    down_inputs = []
    adapted_linear = decode.adapted_linear

    def recording(layer, x):
        if x.shape[-1] == intermediate:
            down_inputs.append(weakref.ref(x))
        return adapted_linear(layer, x)

    monkeypatch.setattr(decode, "adapted_linear", recording)

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def forward_and_backward():
        kept = []

        def pack(t):
            if t.shape[-1] == intermediate and t.untyped_storage().data_ptr() not in weights:
                kept.append(t.untyped_storage().data_ptr())
            return t

        down_inputs.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            log_probs = completion_log_probs(model, sequences, attention, prompt_length=3)
        gc.collect()
        alive = sum(ref() is not None for ref in down_inputs)
        model.zero_grad()
        log_probs.sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return len(set(kept)), alive, grads

    kept, alive, grads = forward_and_backward()
    assert len(down_inputs) == layers and alive == 0
    assert kept == 2 * layers
    monkeypatch.setattr(activations, "recomputed_when_saved", lambda tensor, recompute: nullcontext())
    _, alive_without, grads_without = forward_and_backward()
    assert alive_without == layers  # kept by the adapter's A product
    assert len(grads) == len(grads_without) and all(torch.equal(a, b) for a, b in zip(grads, grads_without))


def lora_down(weight, down, up):
    """x·Wᵀ + (0.5·x·Aᵀ)·Bᵀ, a down projection with an adapter, as the loss computes it."""
    return lambda x: torch.addmm(F.linear(x, weight), F.linear(x, down) * 0.5, up.T)


def test_down_of_gated_recomputes_its_input_in_backward_only_and_frees_it_after_forward():
    import gc
    import weakref

    torch.manual_seed(0)
    weight = torch.randn(6, 10)
    down0, up0 = torch.randn(3, 10), torch.randn(6, 3)
    gate0, upper0, grad = torch.randn(5, 10), torch.randn(5, 10), torch.randn(5, 6)
    results = []
    for recompute in (True, False):
        gate, upper = (t.clone().requires_grad_() for t in (gate0, upper0))
        down, up = down0.clone().requires_grad_(), up0.clone().requires_grad_()
        project, seen = lora_down(weight, down, up), []

        def recording(x):
            seen.append(weakref.ref(x))
            return project(x)

        if recompute:
            out = down_of_gated(recording, torch.nn.SiLU(), gate, upper)
        else:
            out = recording(F.silu(gate) * upper)
        gc.collect()
        results.append((seen[0]() is None, out.detach(), *torch.autograd.grad(out, (gate, upper, down, up), grad)))
    (freed, *ours), (kept_freed, *plain) = results
    assert freed and not kept_freed
    assert all(torch.equal(a, b) for a, b in zip(ours, plain))


def test_recomputed_when_saved_calls_recompute_during_backward_for_views_too():
    x0 = torch.randn(2, 3, 4)
    calls = []

    def recompute():
        calls.append(1)
        return x0 * 2.0

    source = x0.clone().requires_grad_()
    x = source * 2.0
    weight = torch.randn(4, 5, requires_grad=True)
    with recomputed_when_saved(x, recompute):
        out = x.reshape(6, 4) @ weight  # saves a view of x for weight's gradient
    assert calls == []
    (grad_weight,) = torch.autograd.grad(out.sum(), weight)
    assert calls == [1]
    assert torch.equal(grad_weight, (x0 * 2.0).reshape(6, 4).T @ torch.ones(6, 5))


def test_down_of_gated_without_gradients_is_the_plain_product():
    gate, upper, weight = torch.randn(4, 8), torch.randn(4, 8), torch.randn(3, 8)
    with torch.no_grad():
        out = down_of_gated(lambda x: F.linear(x, weight), torch.nn.SiLU(), gate, upper)
    assert torch.equal(out, F.linear(F.silu(gate) * upper, weight))

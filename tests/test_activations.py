import math

import pytest
import torch
import torch.nn.functional as F

from krpo_cli.activations import gated_activation, is_silu, silu_mul


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


def test_the_loss_forward_keeps_one_mlp_activation_less_per_layer(monkeypatch):
    """completion_log_probs (the update's forward) goes through silu_mul: one (tokens × intermediate)
    tensor less per layer is kept for backward than with autograd's silu-then-multiply."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from krpo_cli import decode
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

    def intermediate_activations():
        kept = []

        def pack(t):
            if t.shape[-1] == intermediate:
                kept.append(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            completion_log_probs(model, sequences, attention, prompt_length=3)
        return len(set(kept))

    fused = intermediate_activations()
    monkeypatch.setattr(decode, "gated_activation", lambda act_fn, gate, up: act_fn(gate) * up)
    assert intermediate_activations() == fused + layers

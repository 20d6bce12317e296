"""Data parallel training: sharding, the gradient arithmetic, the collectives, and a real two-process run.

The collectives run in two CPU processes with the Gloo backend; the end-to-end test launches
`accelerate launch -m krpo_cli train` exactly as docs/distributed.md says.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import read_jsonl, tiny_recipe, write_recipe
from krpo_cli.config import RecipeError
from krpo_cli.data import PromptSampler
from krpo_cli.distributed import DistributedContext, RanksOutOfSync, adapter_digest
from krpo_cli.log_probs import token_log_probs
from krpo_cli.losses import policy_loss

REPO = Path(__file__).resolve().parents[1]


# --- in one process: which rows are whose ------------------------------------------------------------


def test_shards_keep_whole_groups_and_cover_the_batch():
    prompts_per_step, group_size, world_size = 6, 4, 3
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(20)]
    batch = PromptSampler(rows, seed=3).next_batch(prompts_per_step)  # every rank draws this same batch
    rollout_size = prompts_per_step * group_size
    seen_prompts, seen_rows = [], []
    for rank in range(world_size):
        ctx = DistributedContext(rank=rank, world_size=world_size)
        mine = ctx.shard(batch)
        assert len(mine) == 2
        seen_prompts += mine
        # Rollout rows are prompt-major (i·G + j): this rank's rows are exactly its prompts' groups.
        rows_held = list(range(rollout_size))[ctx.local_slice(rollout_size)]
        assert sorted({row // group_size for row in rows_held}) == [batch.index(p) for p in mine]
        assert len(rows_held) == len(mine) * group_size
        seen_rows += rows_held
    assert seen_prompts == batch and seen_rows == list(range(rollout_size))


def test_local_rows_split_a_minibatch_in_its_order():
    minibatch = torch.tensor([7, 0, 5, 2, 3])  # global rows of an 8-row rollout, two ranks of 4 rows
    rank0 = DistributedContext(rank=0, world_size=2).local_rows(minibatch, 8)
    rank1 = DistributedContext(rank=1, world_size=2).local_rows(minibatch, 8)
    assert rank0.tolist() == [0, 2, 3] and rank1.tolist() == [3, 1]  # rank 1's local 3, 1 = global 7, 5
    assert DistributedContext().local_rows(minibatch, 8) is minibatch  # one process: untouched


def test_prompts_per_step_must_split_evenly():
    with pytest.raises(RecipeError, match=r"prompts_per_step \(3\) must be divisible by the number of processes \(2\)"):
        DistributedContext(rank=0, world_size=2).check_prompts_per_step(3)
    DistributedContext(rank=0, world_size=2).check_prompts_per_step(4)
    DistributedContext().check_prompts_per_step(3)


def test_adapter_digest_sees_one_changed_value():
    state = {"b": torch.zeros(2, 3), "a": torch.ones(4)}
    same = {"a": torch.ones(4), "b": torch.zeros(2, 3)}
    changed = {"a": torch.ones(4), "b": torch.zeros(2, 3)}
    changed["b"][1, 2] = 1e-30
    assert adapter_digest(state) == adapter_digest(same) != adapter_digest(changed)


# --- two Gloo processes: the collectives ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def policy_terms(weight, features, tokens, mask, old, ref, advantages):
    """Per-sequence policy loss of a one-matrix 'model' (log-probs of tokens under features @ weight)."""
    log_probs = token_log_probs(features @ weight, tokens) * mask
    return policy_loss(log_probs, old, ref, advantages, mask, clip_eps=0.2, kl_beta=0.1).loss


def collectives_worker(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)  # two processes on a small CI machine
    ctx = DistributedContext.from_env()
    try:
        assert (ctx.rank, ctx.world_size, ctx.device.type, ctx.is_main) == (rank, 2, "cpu", rank == 0)

        # Rows of every rank, in rank order, each in its own dtype.
        rewards, lengths = ctx.gather_rows(torch.tensor([rank, rank + 0.5]), torch.tensor([10 + rank, 20 + rank]))
        assert rewards.tolist() == [0.0, 0.5, 1.0, 1.5] and rewards.dtype == torch.float32
        assert lengths.tolist() == [10, 20, 11, 21] and lengths.dtype == torch.int64
        # Ranks hold different numbers of values: (1 + 2 + 6) / 3.
        assert ctx.global_mean([1.0, 2.0] if rank == 0 else [6.0]) == 3.0
        assert ctx.reduce_floats([rank + 1.0, 5.0 * rank], "max") == [2.0, 5.0]
        assert ctx.any(rank == 1) and not ctx.any(False)

        # Gradients: each rank's share of a minibatch, each loss over the GLOBAL minibatch size, summed
        # over ranks = the one-process gradient and loss of the whole minibatch.
        torch.manual_seed(0)  # the same data on both ranks: the "global rollout"
        n, t, d, v = 8, 5, 6, 11
        features, tokens = torch.randn(n, t, d), torch.randint(0, v, (n, t))
        mask = (torch.rand(n, t) > 0.2).float()
        old, ref, advantages = -torch.rand(n, t) * 3, -torch.rand(n, t) * 3, torch.randn(n)
        init = torch.randn(d, v)
        held = ctx.local_slice(n)
        for minibatch in (torch.tensor([6, 1, 3, 7, 4]), torch.tensor([2, 0, 3])):  # the 2nd: rank 1 holds none
            single = init.clone().requires_grad_()
            single_loss = policy_terms(single, *(x[minibatch] for x in (features, tokens, mask, old, ref, advantages)))
            single_loss = single_loss.sum() / len(minibatch)
            single_loss.backward()

            weight = torch.nn.Parameter(init.clone())
            mine = ctx.local_rows(minibatch, n)
            local_loss = 0.0
            if len(mine):
                local = [x[held][mine] for x in (features, tokens, mask, old, ref, advantages)]
                loss = policy_terms(weight, *local).sum() / len(minibatch)
                loss.backward()
                local_loss = loss.item()
            assert (weight.grad is None) == (len(mine) == 0)
            total_loss = ctx.sum_gradients([weight], local_loss)
            assert abs(total_loss - single_loss.item()) < 1e-6
            assert torch.allclose(weight.grad, single.grad, atol=1e-6, rtol=1e-5)

        # Every rank gets rank 0's parameters.
        param = torch.full((3,), float(rank))
        ctx.broadcast_parameters([param])
        assert param.tolist() == [0.0, 0.0, 0.0]

        # Sampling: different streams per rank; each rank's own state comes back from a checkpoint.
        ctx.seed_sampling(7)
        state = ctx.gather_rng_states()
        draws = torch.rand(4)
        (all_draws,) = ctx.gather_rows(draws)
        assert not torch.equal(all_draws[:4], all_draws[4:])
        torch.manual_seed(123)
        ctx.restore_rng(state, seed=7, step=3)
        assert torch.equal(torch.rand(4), draws)
        ctx.restore_rng({"rank_rng": state["rank_rng"][:1]}, seed=7, step=3)  # written by another world size
        (fresh,) = ctx.gather_rows(torch.rand(4))
        assert not torch.equal(fresh[:4], fresh[4:])

        # The end-of-run check: equal adapters pass, one differing value on one rank fails on both.
        adapter = {"layer.lora_A.weight": torch.ones(2, 4), "layer.lora_B.weight": torch.zeros(4, 2)}
        digests = ctx.check_in_sync(adapter)
        assert len(digests) == 2 and digests[0] == digests[1] == adapter_digest(adapter)
        if rank == 1:
            adapter["layer.lora_B.weight"][0, 0] = 1e-3
        with pytest.raises(RanksOutOfSync):
            ctx.check_in_sync(adapter)
    finally:
        ctx.close()


def test_collectives_on_two_gloo_processes():
    mp.spawn(collectives_worker, args=(2, free_port()), nprocs=2, join=True)


def checkpoint_clock_worker(rank: int, world_size: int, port: int) -> None:
    """Each rank's own clock says something else; rank 0's decides for both."""
    import time
    from types import SimpleNamespace

    from krpo_cli.config import Recipe
    from krpo_cli.train import checkpoint_due

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    os.environ["LOCAL_RANK"] = str(rank)
    ctx = DistributedContext.from_env()
    try:
        recipe = Recipe.model_validate({"train": {"steps": 10}, "output": {"save_every": 4, "save_every_minutes": 10}})
        run = SimpleNamespace(recipe=recipe, dist=ctx)
        now = time.monotonic()
        assert checkpoint_due(run, 3, now - 601 if rank == 0 else now)  # only rank 0 is late: both save
        assert not checkpoint_due(run, 3, now if rank == 0 else now - 601)  # only rank 1 is late: neither
    finally:
        ctx.close()


def test_a_checkpoint_by_time_is_rank_0s_decision_on_every_rank():
    mp.spawn(checkpoint_clock_worker, args=(2, free_port()), nprocs=2, join=True)


# --- the real entry points: accelerate launch, then torchrun to resume; two CPU processes --------

GRADER = '''
def reward(completion, reference):
    """A random model is never right; this reward still varies between samples."""
    return (sum(map(ord, completion)) % 5) / 4
'''


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def launch(launcher: list[str], args: list[str], extra_path: Path) -> subprocess.CompletedProcess:
    """`LAUNCHER -m krpo_cli train ARGS` from the repository root, offline, `extra_path` importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), str(extra_path)]))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [*launcher, "-m", "krpo_cli", "train", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def rank_digests(stdout: str) -> list[str]:
    (line,) = [line for line in stdout.splitlines() if line.startswith("adapter sha256 by rank:")]
    return re.findall(r"\b[0-9a-f]{64}\b", line)


def test_two_cpu_processes_train_then_resume(tmp_path, tiny_model_dir):
    from peft.utils import load_peft_weights

    (tmp_path / "varied_grader.py").write_text(GRADER, encoding="utf-8")
    recipe = write_recipe(
        tmp_path / "recipe.yaml",
        tiny_recipe(tiny_model_dir, tmp_path / "runs", reward={"grader": "varied_grader:reward"}),
    )
    run_dir = tmp_path / "runs" / "tiny"

    first = launch(ACCELERATE, [str(recipe)], tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    digests = rank_digests(first.stdout)
    assert len(digests) == 2 and digests[0] == digests[1], "both ranks must end with the same adapter"
    assert first.stdout.count("done: 2 steps") == 1, "only rank 0 prints"
    # The digest is that of the adapter rank 0 saved, and training moved it (LoRA B starts at zero).
    saved = load_peft_weights(str(run_dir / "adapter"), device="cpu")
    assert adapter_digest(saved) == digests[0]
    assert any(w.abs().max() > 0 for name, w in saved.items() if "lora_B" in name)
    # Rank 0 alone logs: one line per step, and samples of its own prompt (2 prompts / 2 ranks).
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]
    assert [s["step"] for s in read_jsonl(run_dir / "samples.jsonl")] == [1, 2]
    # Each rank's own RNG state is in rank 0's checkpoint, and they differ (ranks sample differently).
    state = torch.load(run_dir / "checkpoints" / "step_000002" / "trainer_state.pt", weights_only=True)
    assert len(state["rank_rng"]) == 2 and not torch.equal(state["rank_rng"][0]["torch"], state["rank_rng"][1]["torch"])

    resumed = launch(TORCHRUN, [str(recipe), "train.steps=3", "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert resumed.stdout.count("resumed from") == 1 and "(step 2 done)" in resumed.stdout
    after = rank_digests(resumed.stdout)
    assert after[0] == after[1] != digests[0]
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert adapter_digest(load_peft_weights(str(run_dir / "adapter"), device="cpu")) == after[0]

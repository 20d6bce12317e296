"""Data parallel training: which process am I, which rows are mine, and the few collectives the loop needs.

`accelerate launch -m krpo_cli train …` or `torchrun --nproc_per_node N -m krpo_cli train …`
starts N copies of the same loop. Every rank holds the whole model and adapter; only the
prompts are split:

- every rank draws the same global batch of `train.prompts_per_step` prompts (same sampler,
  same seed) and keeps its own contiguous slice of whole prompts, so a group of G completions
  never spans two ranks;
- rewards are all-gathered, so every rank computes the advantages of the whole batch with the
  shared generator and keeps its slice (exactly what one process would compute);
- every rank draws the same global minibatch order and trains on the rows of each minibatch
  that it holds, each loss divided by the GLOBAL minibatch size; summing the gradients over
  ranks then gives exactly the one-process gradient of that minibatch (see `sum_gradients`).

With one process (`WORLD_SIZE` unset or 1) nothing is initialised and every helper returns at
once (its input unchanged), so `krpo train` behaves and costs exactly as without this module.

Plain `torch.distributed` rather than Accelerate's `Accelerator` or DDP: the loop is explicit,
a rank may hold no row of a minibatch (DDP needs the same number of backward calls on every
rank), and the adapter's gradients are small enough that one all-reduce per optimizer step,
written out, is both the simplest and the clearest choice.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import statistics
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

COLLECTIVE_TIMEOUT_MINUTES = 60


class RanksOutOfSync(RuntimeError):
    """Ranks ended a run with different adapters: a bug, never a user error."""


def adapter_digest(state_dict: dict) -> str:
    """sha256 of an adapter's tensors (names and raw bytes, in name order): equal digests, equal weights."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def adapter_state(model) -> dict:
    """The adapter weights of a PEFT model, as `save_pretrained` writes them."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


@dataclass
class DistributedContext:
    """This process's place in a data parallel run; the defaults describe a single process."""

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None  # None: a single process picks its own device
    owns_group: bool = False  # True when from_env initialised the process group (and so must close it)

    @classmethod
    def from_env(cls) -> "DistributedContext":
        """Join the process group a launcher describes (WORLD_SIZE > 1), or stay a single process.

        Each rank uses `cuda:LOCAL_RANK` with NCCL where CUDA is available, the CPU with Gloo otherwise.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if torch.cuda.is_available():
            device, backend = torch.device("cuda", local_rank), "nccl"
            torch.cuda.set_device(device)
        else:
            device, backend = torch.device("cpu"), "gloo"
        owns_group = not torch_dist.is_initialized()
        if owns_group:  # env:// reads MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE
            torch_dist.init_process_group(
                backend,
                device_id=device if device.type == "cuda" else None,
                # Ranks wait for rank 0 while it evaluates (eval.every); NCCL's default is 10 minutes.
                timeout=datetime.timedelta(minutes=COLLECTIVE_TIMEOUT_MINUTES),
            )
        return cls(rank, world_size, device, owns_group)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory, logs, checkpoints and the adapter, and prints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def check_prompts_per_step(self, prompts_per_step: int) -> None:
        """Whole prompts per rank: the global batch must split evenly."""
        if prompts_per_step % self.world_size:
            from krpo_cli.config import RecipeError

            raise RecipeError(
                [
                    f"train.prompts_per_step ({prompts_per_step}) must be divisible by the number of processes "
                    f"({self.world_size}): each process takes an equal share of whole prompts"
                ]
            )

    # --- what is mine -------------------------------------------------------------------------------

    def shard(self, items: list) -> list:
        """This rank's contiguous share of a global list (its length divisible by the world size)."""
        if not self.is_distributed:
            return items
        share = len(items) // self.world_size
        return items[self.rank * share : (self.rank + 1) * share]

    def local_slice(self, total: int) -> slice:
        """The global rows this rank holds, out of `total` rows split as `shard` splits them."""
        share = total // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def local_rows(self, global_rows: torch.Tensor, total: int) -> torch.Tensor:
        """Of a minibatch's global row indices, those this rank holds, as indices into its own rows
        (in the minibatch's order; possibly none)."""
        if not self.is_distributed:
            return global_rows
        mine = self.local_slice(total)
        held = global_rows[(global_rows >= mine.start) & (global_rows < mine.stop)]
        return held - mine.start

    # --- collectives (all ranks must call each, in the same order) ----------------------------------

    def broadcast_parameters(self, params: list[torch.Tensor]) -> None:
        """Give every rank rank 0's values (the same seed already makes them equal; this makes it certain)."""
        if self.is_distributed:
            for param in params:
                torch_dist.broadcast(param.data, src=0)

    def sum_gradients(self, params: list[torch.Tensor], loss: float) -> float:
        """Sum the parameters' gradients and the minibatch loss over ranks, in one all-reduce.

        Each rank's loss is Σ_{its rows} ℓᵢ / |global minibatch|, so the sum over ranks is the
        one-process mean over the whole minibatch, and so is the sum of the gradients (a sum, not
        an average, because the division by the global size already happened). A rank that held
        no row of this minibatch has no gradient and contributes zeros.
        """
        if not self.is_distributed:
            return loss
        parts = [
            p.grad.detach().flatten().float() if p.grad is not None else torch.zeros(p.numel(), device=p.device)
            for p in params
        ]
        flat = torch.cat(parts + [torch.tensor([loss], dtype=torch.float32, device=parts[0].device)])
        torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
        offset = 0
        for param in params:
            summed = flat[offset : offset + param.numel()].view_as(param).to(param.dtype)
            param.grad = summed.clone()
            offset += param.numel()
        return float(flat[-1])

    def gather_rows(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """All ranks' 1-D per-row tensors (same length on every rank), concatenated in rank order.

        One all-gather for all of them; each comes back on the CPU in its own dtype.
        """
        if not self.is_distributed:
            return tensors
        packed = torch.stack([t.detach().double().flatten().to(self.device) for t in tensors], dim=1)
        gathered = [torch.empty_like(packed) for _ in range(self.world_size)]
        torch_dist.all_gather(gathered, packed)
        full = torch.cat(gathered).cpu()
        return tuple(full[:, i].to(t.dtype) for i, t in enumerate(tensors))

    def reduce_floats(self, values: list[float], op: str = "sum") -> list[float]:
        """Element-wise sum or max of a few numbers over ranks."""
        if not self.is_distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(tensor, op={"sum": torch_dist.ReduceOp.SUM, "max": torch_dist.ReduceOp.MAX}[op])
        return tensor.tolist()

    def global_mean(self, values: list[float]) -> float:
        """Mean of every rank's values together (ranks may hold different numbers of them)."""
        if not self.is_distributed:
            return statistics.fmean(values)
        total, count = self.reduce_floats([math.fsum(values), len(values)])
        return total / count

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (e.g. a stop request that reached one rank first)."""
        if not self.is_distributed:
            return bool(flag)
        return self.reduce_floats([float(flag)], "max")[0] > 0

    def barrier(self) -> None:
        if self.is_distributed:
            torch_dist.barrier()

    # --- random state --------------------------------------------------------------------------------

    def seed_sampling(self, seed: int) -> None:
        """Per-rank sampling RNG (seed + rank), so ranks do not draw identical completions.

        Called after the adapter is initialised, which must stay identical on every rank.
        """
        if self.is_distributed:
            torch.manual_seed(seed + self.rank)

    def gather_rng_states(self) -> dict:
        """Every rank's RNG states for rank 0's checkpoint: {'rank_rng': [...]} (nothing for one process)."""
        if not self.is_distributed:
            return {}
        from krpo_cli.checkpoint import rng_state

        states = [None] * self.world_size
        torch_dist.all_gather_object(states, rng_state())
        return {"rank_rng": states}

    def restore_rng(self, trainer_state: dict, seed: int, step: int) -> None:
        """Restore this rank's own RNG states from a checkpoint (after the shared ones were set).

        A checkpoint written with another number of processes has no state for this rank; every
        rank then starts a fresh stream from (seed, step, rank), so ranks still sample differently.
        """
        if not self.is_distributed:
            return
        from krpo_cli.checkpoint import set_rng_state

        states = trainer_state.get("rank_rng") or []
        if len(states) == self.world_size:
            set_rng_state(states[self.rank])
        else:
            torch.manual_seed(seed + 1_000_003 * step + self.rank)

    # --- end of run ----------------------------------------------------------------------------------

    def check_in_sync(self, state: dict) -> list[str]:
        """Every rank's digest of its adapter `state` (see `adapter_state`); raises RanksOutOfSync when they differ."""
        digest = adapter_digest(state)
        if not self.is_distributed:
            return [digest]
        digests = [None] * self.world_size
        torch_dist.all_gather_object(digests, digest)
        if len(set(digests)) > 1:
            shown = ", ".join(d[:12] for d in digests)
            raise RanksOutOfSync(f"ranks ended with different adapters (sha256 by rank: {shown})")
        return digests

    def close(self) -> None:
        """Wait for every rank, then leave the process group (if this context created it)."""
        if self.is_distributed and self.owns_group:
            torch_dist.barrier()
            torch_dist.destroy_process_group()

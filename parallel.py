"""More than one process: what the training stages share under `torchrun` (torch.distributed).

    torchrun --standalone --nproc-per-node N stage1_sft.py --run-dir runs/x ...

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `init()` then joins the process group (NCCL on CUDA,
gloo on CPU); without torchrun it returns a one-process World and every method below is a no-op,
so each stage has one code path. Two kinds of parallelism, both chosen so that N processes give
what one process gives:
- work split into chunks (rollouts, explanations, scorer predictions, frozen lower-layer states):
  the chunking depends on the data and the settings only, never on N; chunk c runs on rank c % N,
  seeded by its index, and the results are gathered in chunk order. Each chunk is computed by the
  same batches in every case, so the output files of N processes are identical to one process's.
- data-parallel training (SFT, PPO, CTR): every rank holds the same parameters (broadcast from
  rank 0), takes its share of each batch, and `average_gradients` weights each rank's gradient
  of its mean loss by its share: N processes with B/N samples each make the update of one
  process with batch B (up to float rounding). This is what DistributedDataParallel does, written
  out over the trainable parameters (the LoRA / CTR tensors) because our forwards are not one
  nn.Module call.
Only rank 0 writes (the writes themselves are atomic, common.atomic_path). A rank that fails
exits; torchrun then stops the others, and collectives time out after EXPCTR_DIST_TIMEOUT seconds
(default 600) instead of hanging.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from tqdm import tqdm

TIMEOUT_S = float(os.environ.get("EXPCTR_DIST_TIMEOUT", "600"))


def resolve(device: str | None) -> str:
    """A stage's --device (None = auto: cuda when there is one); llm.LLM places its model so."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


class World:
    """This process's place among the N of a torchrun job (N = 1 without torchrun)."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0):
        self.rank, self.size, self.local_rank = rank, size, local_rank

    @property
    def main(self) -> bool:  # the one rank that writes files and prints summaries
        return self.rank == 0

    def device(self, device: str | None) -> str | None:
        """The device of this rank: cuda -> cuda:<local rank> under torchrun."""
        if self.size > 1 and resolve(device) == "cuda":
            return f"cuda:{self.local_rank}"
        return device

    def threads(self, n: int) -> int:
        """CPU threads per process: the --threads of one process shared by the processes of this
        machine (N processes of n threads each would oversubscribe the cores)."""
        if self.size == 1 or not n:
            return n
        return max(1, n // int(os.environ.get("LOCAL_WORLD_SIZE", self.size)))

    # -- chunked work ------------------------------------------------------------------------
    def my_chunks(self, n_chunks: int) -> list[int | None]:
        """One chunk index per round: round j gives this rank chunk j*N + rank, or None past the
        end. Every rank sees the same number of rounds, so a collective after each round (a
        gather, a partial save) is reached by all of them."""
        rounds = -(-n_chunks // self.size)
        return [c if c < n_chunks else None for c in (j * self.size + self.rank for j in range(rounds))]

    def map_chunks(self, n_chunks: int, fn, desc: str, on_round=None, every: int = 1) -> dict:
        """{c: fn(c)} for every chunk c < n_chunks, on every rank: this rank runs its chunks
        (round robin), the results (CPU objects) are gathered. on_round(results so far) is called
        on every rank after each `every` rounds (e.g. rank 0 saves a partial file)."""
        out, new = {}, {}
        rounds = self.my_chunks(n_chunks)
        bar = tqdm(rounds, desc=desc, unit=" chunk", disable=None if self.main else True)
        for j, c in enumerate(bar):
            _killpoint(self.rank, j)
            if c is not None:
                new[c] = fn(c)
            if on_round is not None and (j + 1) % every == 0:
                out.update(self.gather_dict(new))
                new = {}
                on_round(out)
        out.update(self.gather_dict(new))
        return out

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects; CPU tensors)."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def gather_dict(self, d: dict) -> dict:
        """The union of every rank's {key: value} (keys are disjoint: chunk or sample indices)."""
        out = {}
        for part in self.gather(d):
            out.update(part)
        return out

    # -- data-parallel training --------------------------------------------------------------
    def share(self, idx):
        """This rank's part of one batch (contiguous, sizes differ by at most 1)."""
        n = len(idx)
        a, b = n * self.rank // self.size, n * (self.rank + 1) // self.size
        return idx[a:b]

    def broadcast_params(self, params) -> None:
        """Rank 0's values into every rank (the same start, as DDP does)."""
        if self.size > 1:
            with torch.no_grad():
                for p in params:
                    dist.broadcast(p.data, src=0)

    def average_gradients(self, params, n_local: int) -> int:
        """grad <- sum_r n_r * grad_r / sum_r n_r, where grad_r is rank r's gradient of the mean
        loss over its n_r samples: the gradient of the mean loss over the whole batch. A rank with
        no samples contributes zeros. Returns the batch size sum_r n_r."""
        if self.size == 1:
            return n_local
        params = [p for p in params if p.requires_grad]
        dev = params[0].device
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] +
                         [torch.tensor([1.0], device=dev)]) * float(n_local)
        dist.all_reduce(flat)
        total = float(flat[-1])
        off = 0
        for p, g in zip(params, grads):
            k = g.numel()
            p.grad = (flat[off:off + k] / total).view_as(p).to(p.dtype)
            off += k
        return int(round(total))

    def weighted_mean(self, values: dict[str, float], n_local: int) -> dict[str, float]:
        """Per-batch statistics of each rank, averaged over ranks by their sample counts."""
        if self.size == 1:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] * n_local for k in keys] + [float(n_local)], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return {k: float(t[i] / t[-1]) for i, k in enumerate(keys)}

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def _killpoint(rank: int, j: int) -> None:
    """Test hook (tests/test_parallel.py): EXPCTR_KILL_RANK_AT_ROUND=r:j SIGKILLs rank r as it
    starts round j of a chunked map: a rank that dies midway, with no clean-up."""
    at = os.environ.get("EXPCTR_KILL_RANK_AT_ROUND")
    if at and at == f"{rank}:{j}":
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


_world: World | None = None


def init(device: str | None = None) -> World:
    """Join the torchrun process group (once per process; NCCL when `device` - a stage's --device,
    None = auto - is CUDA, else gloo); a one-process World without torchrun."""
    global _world
    if _world is not None:
        return _world
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = resolve(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=TIMEOUT_S))
    _world = World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))
    return _world


def close() -> None:
    """Leave the process group (end of a stage's main)."""
    global _world
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _world = None

"""Sharded fit over torch.distributed: whole MoE layers per rank, one replicated bank.

Why: one family of a DeepSeek-V3-size model is ~218B parameters, far beyond one GPU, and the global
bank couples every layer, so the layers cannot be fitted independently. Each rank holds only the
experts of its MoE layers; what couples them is small (the bank's gradient, a few sums per step).

Who holds what (R ranks, L MoE layers, E experts per layer, N = L E, experts numbered layer-major):
  experts W (N/R, p, d)    rank k owns layer positions [k L / R, (k+1) L / R), i.e. the contiguous
                           experts [lo, hi), and reads only those tensors from the safetensors files
  A (N/R, p, r)            local (refit_every > 1 keeps them; the final A goes to a per-rank file)
  bank (m, r, d), gain     replicated; gradients all-reduced (sum) every step, so the replicas stay
                           bitwise equal (all ranks get the same all-reduce result)
  logits (N, m)            replicated, but each row's gradient is computed only by the rank owning the
                           expert: the gradient rows are disjoint across ranks, so the all-reduce sum is
                           an exact copy (x + 0 = x) and every rank's Adam makes the same update. Logits
                           are tiny (N m: 15 MB at DeepSeek-V3's N = 14848, m = 256), and replicas keep the
                           temperature controller's global median support, the best snapshot and the
                           final codes free of extra collectives
  scales (N,), spectra     gathered once after reading / the warm start (N min(p, d) floats)
A minibatch is drawn globally (`loop.batch_indices`, the same permutation on every rank) and each
rank computes its own experts of it; the loss is split so the summed gradients equal the one-process
gradient (`batch_loss`). Evaluations sum per-rank partial sums in float64 (`sum64`: all-gather, then
every rank adds in rank order, so every rank takes the same best-snapshot and early-stop decisions).

Checkpoints: rank 0 writes the replicated state to the usual `{f}.ckpt.pt`; with refit_every > 1 every
rank first writes its layers' A to `{f}.ckpt.pt.A{li}.s{step}` (one file per MoE layer, so a resume may
use another number of ranks), and the main file, written after a barrier, commits that step.
Final write: each rank streams its layers' A into `.globe_fit/{f}.A.rank{k}.safetensors`; rank 0 then
assembles the family file (`artifacts.FamilyWriter`, one layer in memory at a time).

`Dist()` (the default everywhere) is a no-op single process. Collectives run on `self.dev` (cuda for
NCCL, cpu for gloo). The output directory must be on a file system every rank sees.
"""

from __future__ import annotations

import datetime
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import GlobeError
from ..io.outputs import scratch_dir

TIMEOUT_ENV = "GLOBE_DIST_TIMEOUT_S"  # collective timeout: rank 0 assembles family files while the rest wait
DEFAULT_TIMEOUT_S = 7200


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> Any:
    """torch.load of a resume checkpoint written by this package; GlobeError naming it when it is damaged
    (a disk that filled up, a copy cut short: a checkpoint is written to a temp name and renamed, so a
    fit killed while saving leaves the previous one intact)."""
    try:
        return torch.load(path, weights_only=False, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as e:  # RuntimeError (zip reader), EOFError, UnpicklingError, ...
        raise GlobeError(f"resume checkpoint {path} is unreadable ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else ''}); delete it (or the output_dir) to "
                         "start over") from None


def launched() -> bool:
    """True when the process was started by torchrun (or any launcher setting RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_launch_env() -> None:
    """The launcher's variables, when set, are what torchrun writes: GlobeError naming the first that is not
    (RANK, LOCAL_RANK >= 0; WORLD_SIZE, LOCAL_WORLD_SIZE >= 1; RANK < WORLD_SIZE; a positive timeout)."""
    vals = {}
    for k, lo in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0), ("LOCAL_WORLD_SIZE", 1)):
        raw = os.environ.get(k)
        if raw is None:
            continue
        try:
            vals[k] = int(raw)
        except ValueError:
            vals[k] = None
        if vals[k] is None or vals[k] < lo:
            raise GlobeError(f"{k}={raw!r}: expected an integer >= {lo} (set by torchrun; unset it for one process)")
    if "RANK" in vals and "WORLD_SIZE" in vals and vals["RANK"] >= vals["WORLD_SIZE"]:
        raise GlobeError(f"RANK={vals['RANK']} is not below WORLD_SIZE={vals['WORLD_SIZE']}")
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is not None:
        try:
            ok = 0 < float(raw) < float("inf")
        except ValueError:
            ok = False
        if not ok:
            raise GlobeError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")


def is_rank0() -> bool:
    """False only in a launched process whose RANK is not 0 (check_launch_env first)."""
    return int(os.environ.get("RANK") or 0) == 0


def wanted(setting: Any) -> bool:
    """Whether a fit runs sharded: train.distributed auto (when launched by torchrun or a process group
    exists), true (required) or false. Raises GlobeError for a setting the launch cannot honour, or for a
    launcher variable that is not what torchrun writes (check_launch_env)."""
    import torch.distributed as td
    check_launch_env()
    env = launched() or (td.is_available() and td.is_initialized())
    if setting == "auto":
        return env
    if setting is True:
        if not env:
            raise GlobeError("train.distributed=true needs a torch.distributed launch: "
                             "torchrun --nproc_per_node=N -m globe fit ... (RANK and WORLD_SIZE are not set)")
        return True
    if env and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise GlobeError(f"train.distributed=false but this process is one of {os.environ['WORLD_SIZE']} launched "
                         "by torchrun; they would all write the same output_dir")
    return False


class Shard:
    """Rows [lo, lo + n) of an (N, ...) tensor held by this rank, indexed by GLOBAL row numbers.

    `W[idx]` / `W[a:b]` / `W[idx] = x` take global indices (all owned, else GlobeError); `shape` and
    `numel()` are those of the whole (N, ...) tensor, so the fit code indexes it like the full tensor.
    """

    def __init__(self, local: torch.Tensor, lo: int, N: int):
        self.local, self.lo, self.N = local, int(lo), int(N)
        self.shape = torch.Size((self.N, *local.shape[1:]))
        self.dtype, self.device = local.dtype, local.device

    def numel(self) -> int:
        return self.shape.numel()

    def _loc(self, idx):
        n = self.local.shape[0]
        if isinstance(idx, slice):
            a, b, st = idx.indices(self.N)
            b = max(a, b)
            if st != 1 or (b > a and not (self.lo <= a and b <= self.lo + n)):
                raise GlobeError(f"rows [{a}, {b}) are not all held by this rank ([{self.lo}, {self.lo + n}))")
            return slice(a - self.lo, b - self.lo)
        loc = torch.as_tensor(idx).long() - self.lo
        if loc.numel() and (int(loc.min()) < 0 or int(loc.max()) >= n):
            raise GlobeError(f"experts outside this rank's [{self.lo}, {self.lo + n}) were asked for")
        return loc.to(self.local.device)

    def __getitem__(self, idx):
        return self.local[self._loc(idx)]

    def __setitem__(self, idx, val) -> None:
        self.local[self._loc(idx)] = val


class Dist:
    """Rank, world, owned layers and collectives of one fit; `Dist()` is the single-process no-op."""

    def __init__(self, rank: int = 0, world: int = 1, on: bool = False, n_layers: int = 0, E: int = 0,
                 dev: str = "cpu", backend: str = ""):
        self.rank, self.world, self.on, self.n_layers, self.E = rank, world, on, n_layers, E
        self.dev, self.backend = dev, backend
        self.owns_group = False  # setup() joined the default group itself: close() leaves it again
        bounds = [k * n_layers // world for k in range(world + 1)]
        self.layer_bounds = bounds  # rank k owns layer positions [bounds[k], bounds[k+1])
        self.layers = range(bounds[rank], bounds[rank + 1])
        self.lo, self.hi = bounds[rank] * E, bounds[rank + 1] * E
        self.N = n_layers * E

    # ---- setup -------------------------------------------------------------------------------------
    @classmethod
    def setup(cls, dev: str, n_layers: int, E: int) -> Dist:
        """Join (or reuse) the default process group: NCCL for cuda, gloo otherwise; cuda ranks use the
        GPU LOCAL_RANK. Raises GlobeError when there are more ranks than MoE layers, or more processes
        on a node than GPUs."""
        import torch.distributed as td
        if not td.is_available():
            raise GlobeError("train.distributed: this torch build has no torch.distributed")
        backend = "nccl" if dev == "cuda" else "gloo"
        if dev == "cuda":
            per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
            if per_node > gpus:  # NCCL cannot put two ranks on one GPU
                raise GlobeError(f"train.distributed: {per_node} processes per node but {gpus} GPU(s); use "
                                 f"--nproc_per_node={gpus} or train.device=cpu (gloo)")
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        owns = not td.is_initialized()
        if owns:
            secs = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
            try:
                td.init_process_group(backend, timeout=datetime.timedelta(seconds=secs))
            except (ValueError, RuntimeError) as e:  # MASTER_ADDR/PORT unset, a rendezvous that failed
                msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
                raise GlobeError(f"train.distributed: cannot join the process group ({msg}); launch with "
                                 "torchrun, which sets MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE") from None
        else:
            backend = td.get_backend()
        rank, world = td.get_rank(), td.get_world_size()
        if world > n_layers:
            raise GlobeError(f"train.distributed: {world} ranks but the model has {n_layers} MoE layers; "
                             f"each rank owns whole layers, so use at most {n_layers} ranks")
        d = cls(rank, world, True, n_layers, E, "cuda" if backend == "nccl" else "cpu", backend)
        d.owns_group = owns
        return d

    def close(self, finished: bool) -> None:
        """Leave the default group if setup() joined it (exiting with it alive can SIGABRT in gloo's thread
        teardown); finished (every rank got here): a barrier first, so no peer is mid-collective."""
        if not (self.on and self.owns_group):
            return
        import torch.distributed as td
        if td.is_initialized():
            if finished:
                self.barrier()
            td.destroy_process_group()
        self.owns_group = False

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.world, "backend": self.backend,
                "layers_per_rank": [self.layer_bounds[k + 1] - self.layer_bounds[k] for k in range(self.world)]}

    # ---- ownership ---------------------------------------------------------------------------------
    def own(self, idx: torch.Tensor) -> torch.Tensor:
        """The entries of global expert indices idx (n,) that this rank owns, in their order."""
        if not self.on:
            return idx
        return idx[(idx >= self.lo) & (idx < self.hi)]

    @property
    def span(self) -> tuple[int, int]:
        return (self.lo, self.hi)

    def shard(self, local: torch.Tensor) -> Shard | torch.Tensor:
        """Wrap this rank's rows (hi - lo, ...) for global indexing (single process: unchanged)."""
        return Shard(local, self.lo, self.N) if self.on else local

    # ---- collectives -------------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.on and self.world > 1:
            import torch.distributed as td
            td.barrier()

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (any device; copied through self.dev when needed)."""
        if not self.on:
            return t
        import torch.distributed as td
        if t.device.type == torch.device(self.dev).type:
            td.all_reduce(t)
            return t
        buf = t.to(self.dev)
        td.all_reduce(buf)
        t.copy_(buf)
        return t

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's values of t, in place, on every rank."""
        if not self.on or self.world == 1:
            return t
        import torch.distributed as td
        buf = t if t.device.type == torch.device(self.dev).type else t.to(self.dev)
        td.broadcast(buf, src=0)
        if buf is not t:
            t.copy_(buf)
        return t

    def sum64(self, vals: Sequence[float | torch.Tensor]) -> list[float]:
        """Sums over ranks of a few scalars, in float64, added in rank order: identical on every rank."""
        v = torch.tensor([float(x) for x in vals], dtype=torch.float64)
        if not self.on or self.world == 1:
            return v.tolist()
        import torch.distributed as td
        v = v.to(self.dev)
        parts = [torch.empty_like(v) for _ in range(self.world)]
        td.all_gather(parts, v)
        tot = parts[0].cpu()
        for x in parts[1:]:
            tot = tot + x.cpu()
        return tot.tolist()

    def gather_rows(self, x: torch.Tensor, counts: Sequence[int] | None = None) -> torch.Tensor:
        """Concatenate every rank's rows x (n_k, ...) in rank order (default n_k: rank k's experts)."""
        if not self.on or self.world == 1:
            return x
        import torch.distributed as td
        if counts is None:
            counts = [(self.layer_bounds[k + 1] - self.layer_bounds[k]) * self.E for k in range(self.world)]
        elif len(counts) != self.world:
            raise ValueError("gather_rows: one count per rank")
        n = max(counts)
        buf = torch.zeros((n, *x.shape[1:]), dtype=x.dtype, device=self.dev)
        buf[:x.shape[0]] = x.to(self.dev)
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        td.all_gather(parts, buf)
        return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(x.device)

    def gather_var(self, x: torch.Tensor) -> torch.Tensor:
        """Like gather_rows for rows whose count differs per rank and is not known in advance."""
        if not self.on or self.world == 1:
            return x
        counts = [int(c) for c in self.gather_rows(torch.tensor([x.shape[0]]), [1] * self.world).tolist()]
        return self.gather_rows(x, counts)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.on or self.world == 1:
            return obj
        import torch.distributed as td
        box = [obj]
        td.broadcast_object_list(box, src=0, device=torch.device(self.dev) if self.backend == "nccl" else None)
        return box[0]

    def on_rank0(self, fn: Callable[[], Any]) -> Any:
        """fn() on rank 0, its result (or its GlobeError, raised on every rank) shared with all ranks."""
        if not self.on or self.world == 1:
            return fn()
        out: tuple[bool, Any] = (True, None)
        if self.rank == 0:
            try:
                out = (True, fn())
            except GlobeError as e:
                out = (False, str(e))
        ok, val = self.broadcast(out)
        if not ok:
            raise GlobeError(val)
        return val

    # ---- the fit's reductions ----------------------------------------------------------------------
    def reduce_grads(self, prm: torch.nn.Module) -> None:
        """Sum every parameter's gradient over ranks (bank alone, the small logits and gain together)."""
        if not self.on:
            return
        ps = list(prm.parameters())
        for q in ps:
            if q.grad is None:  # no expert of the batch on this rank: a zero contribution
                q.grad = torch.zeros_like(q)
        big = [q for q in ps if q.numel() >= 1 << 20]
        small = [q for q in ps if q.numel() < 1 << 20]
        for q in big:
            self.all_reduce_(q.grad)
        if small:
            flat = torch.cat([q.grad.reshape(-1) for q in small])
            self.all_reduce_(flat)
            o = 0
            for q in small:
                q.grad.copy_(flat[o:o + q.numel()].view_as(q.grad))
                o += q.numel()

    def batch_loss(self, r2: torch.Tensor, n2: torch.Tensor, z_rows: torch.Tensor, l1: float, n_batch: int,
                   w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's share of the global batch loss and the global values for the log.

        r2, n2 (n_local,): residual and norm per local expert of the batch; z_rows (n_local, m) their
        logits; n_batch the global batch size; w (n_local,) their weights (None: one). The global loss
        is mean_{live} w r2 / n2 + l1 mean |z| (loop.rel_mean); the local loss uses the global live count
        and batch size, so the gradients summed over ranks equal the one-process gradient. Returns (local
        loss for backward, global loss, global sum r2, global sum n2) as tensors (the last three detached,
        float64).
        """
        live = n2 > 0
        ratio = r2 / torch.where(live, n2, torch.ones_like(n2))
        ratio = (ratio if w is None else ratio * w).sum()
        zabs = z_rows.abs().sum() if l1 > 0 else r2.new_zeros(())
        g = self.sum64([ratio.detach(), live.sum(), r2.detach().sum(), n2.detach().sum(), zabs.detach()])
        cnt = max(g[1], 1.0)
        denom = max(n_batch * z_rows.shape[-1], 1)
        loss = ratio / cnt + (l1 * zabs / denom if l1 > 0 else 0.0)
        tot = torch.tensor(g[0] / cnt + (l1 * g[4] / denom if l1 > 0 else 0.0), dtype=torch.float64)
        return loss, tot, torch.tensor(g[2], dtype=torch.float64), torch.tensor(g[3], dtype=torch.float64)

    def reduce_eval(self, num: torch.Tensor, den: torch.Tensor, obj_live: torch.Tensor) -> tuple[float, float]:
        """(rel_fro_error, objective) of an evaluation over every rank's experts: per-expert weighted
        residuals `num` and energies `den` (n,), objectives of the live experts `obj_live`."""
        a, b, c, k = self.sum64([num.sum(), den.sum(), obj_live.sum(), obj_live.numel()])
        return (a / max(b, 1e-300)) ** 0.5, (c / k if k else 0.0)

    # ---- checkpoints -------------------------------------------------------------------------------
    def save_state(self, state: dict, path: str | os.PathLike) -> None:
        """Checkpoint: local A per MoE layer (if any), barrier, then rank 0 commits the replicated state."""
        from ..artifacts import atomic_write
        A = state.get("A_all")
        if not self.on:  # what loop._save does
            atomic_write(path, lambda tmp: torch.save(state, tmp))
            return
        step = int(state["step"])
        if A is not None:
            for li in self.layers:
                rows = A.local[li * self.E - self.lo:(li + 1) * self.E - self.lo]
                atomic_write(_a_file(path, li, step), lambda tmp, rows=rows: torch.save(rows.clone(), tmp))
        self.barrier()
        if self.rank == 0:
            main = {**state, "A_all": None if A is None else {"layers": self.n_layers, "step": step}}
            atomic_write(path, lambda tmp: torch.save(main, tmp))
        self.barrier()
        for li in self.layers:  # older steps of our layers are garbage once the new step is committed
            for f in Path(path).parent.glob(f"{Path(path).name}.A{li}.s*"):
                if f.name != _a_file(path, li, step).name:
                    f.unlink(missing_ok=True)

    def load_state(self, path: str | os.PathLike) -> dict | None:
        """The checkpoint at `path` (None if absent), with A restored to this rank's rows."""
        if not os.path.exists(path):
            return None
        st = read_checkpoint(path)
        A = st.get("A_all")
        if isinstance(A, dict):  # written by a sharded fit: one file per MoE layer
            n = int(A["layers"])
            if self.on and n != self.n_layers:
                raise GlobeError(f"checkpoint {path} has {n} MoE layers, this model {self.n_layers}")
            lis = self.layers if self.on else range(n)
            try:
                parts = [read_checkpoint(_a_file(path, li, int(A["step"]))) for li in lis]
            except FileNotFoundError as e:
                raise GlobeError(f"checkpoint {path}: adapter file missing ({e.filename}); delete the "
                                 "output_dir to start over") from None
            st["A_all"] = self.shard(torch.cat(parts))
        elif isinstance(A, torch.Tensor) and self.on:  # a one-process checkpoint resumed sharded
            st["A_all"] = self.shard(A[self.lo:self.hi].clone())
        return st


def _a_file(path, li: int, step: int) -> Path:
    return Path(f"{path}.A{li}.s{step}")


class RankAWriter:
    """The final adapters of this rank's layers -> `.globe_fit/{f}.A.rank{k}.safetensors`; `close()`
    makes rank 0 assemble `dest` (the family file, `artifacts.FamilyWriter`) from every rank's file.

    Same interface as FamilyWriter: write_A(idx, A) with global expert indices, close() -> A loader, abort().
    """

    def __init__(self, dist: Dist, state_dir: Path, f: str, fam, layers: list[int], dest: Path):
        from ..artifacts import key
        from ..io.writer import ShardedWriter
        self.d, self.dir, self.f, self.fam, self.layers, self.dest = dist, Path(state_dir), f, fam, list(layers), dest
        n, m, p, r, d = fam.shape
        self.tmp = scratch_dir(self.dir)
        plan = [(key(f, "A", self.layers[li]), torch.float32, (fam.num_experts, p, r)) for li in dist.layers]
        self.w = ShardedWriter(self.tmp, plan, prefix="rank", max_shard_bytes=1 << 62)

    def _file(self, k: int) -> str:
        return f"{self.f}.A.rank{k}"

    def write_A(self, idx: torch.Tensor, A: torch.Tensor) -> None:
        """Rows A (n, p, r) of global experts idx (n,), ascending and consecutive within a layer."""
        from ..artifacts import write_A_rows
        write_A_rows(self.w, self.f, self.layers, self.fam.num_experts, idx, A)

    def close(self) -> Callable[[int], torch.Tensor]:
        from ..artifacts import FamilyWriter, key
        from ..io.tensors import TensorDir
        try:
            self.w.close()
            os.replace(self.tmp / "rank.safetensors", self.dir / f"{self._file(self.d.rank)}.safetensors")
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.d.barrier()
        if self.d.rank == 0:
            E = self.fam.num_experts
            fw = FamilyWriter(self.dest, self.f, self.fam, self.layers)
            try:
                for k in range(self.d.world):
                    src = TensorDir(self.dir, self._file(k))
                    for li in range(self.d.layer_bounds[k], self.d.layer_bounds[k + 1]):
                        fw.write_A(torch.arange(li * E, (li + 1) * E), src.tensor(key(self.f, "A", self.layers[li])))
            except BaseException:
                fw.abort()
                raise
            fw.close()
            for k in range(self.d.world):
                (self.dir / f"{self._file(k)}.safetensors").unlink(missing_ok=True)
        self.d.barrier()
        src = TensorDir(self.dest.parent, self.dest.name.removesuffix(".safetensors"))
        return lambda li: src.tensor(key(self.f, "A", self.layers[li]))

    def abort(self) -> None:
        self.w.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)


def rank_memory(N: int, n_k: int, p: int, d: int, m: int, r: int, *, batch: int, chunk: int = 32,
                refit_every: int = 1, expert_bytes: int = 4, device: str = "cpu") -> dict[str, int]:
    """Bytes one rank needs while it fits one family (families run one after the other), by part.

    N experts in all, n_k of them on this rank (its layers x E), experts p x d, bank m x r x d, `batch`
    this rank's share of a minibatch (batch_size / R on average, at most batch_size), `chunk` =
    train.eval_chunk, expert_bytes 4 (fp32) or 2 (stored bf16 when the shard exceeds train.max_memory_gb).
      experts     n_k p d expert_bytes                  the shard: the only term that shrinks with R
      adapters    4 n_k p r if refit_every > 1
      spectra     4 N min(p, d);  logits 4 N 8 m        (value, gradient, Adam, best, codes, gathers)
      bank        4 m r d x 9                           value, gradient, 2 Adam moments, best snapshot,
                                                        unit-RMS atoms and their gradients
      step        4 batch (6 p d + 5 r d + p r)         one minibatch's forward and backward
      eval        4 chunk (5 p d + 2 r d + p r)         one chunk of a full evaluation
      warm_start  16 d^2 + 4 x 8 (6 p d + 3 p^2)        the Gram of all experts, one chunk of 8 experts'
                                                        spectra (copies of the chunk, Gram eigenvectors)
    The three working sets (step, eval, warm_start) never coexist, but freed memory stays with the
    process (glibc's heap), so on the CPU the host peak is about the sum of ALL terms (measured within
    about 10% by benchmarks/bench_distributed.py). device "cuda": the bank, logits and step/eval work
    live on the GPU (device_bytes, allocated, counting only the larger of step and eval), the rest on the
    host, plus 2 x 4 m r d there for checkpoints. The process itself (torch: ~0.22 GB here; a CUDA
    context) comes on top.
    """
    k = min(p, d)
    parts = {"experts": n_k * p * d * expert_bytes, "adapters": 4 * n_k * p * r if refit_every > 1 else 0,
             "spectra": 4 * N * k, "logits": 4 * N * 8 * m, "bank": 4 * m * r * d * 9,
             "step": 4 * batch * (6 * p * d + 5 * r * d + p * r), "eval": 4 * chunk * (5 * p * d + 2 * r * d + p * r),
             "warm_start": 16 * d * d + 4 * 8 * (6 * p * d + 3 * p * p)}
    if device == "cuda":
        dev = parts["bank"] + parts["logits"] + max(parts["step"], parts["eval"])
        host = (parts["experts"] + parts["adapters"] + parts["spectra"] + parts["warm_start"]
                + 2 * 4 * m * r * d)  # the checkpoint's host copy of the bank, and one more while it is saved
    else:
        dev, host = 0, sum(parts.values())
    return {**parts, "host_bytes": host, "device_bytes": dev}

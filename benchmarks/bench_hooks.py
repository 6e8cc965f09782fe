"""Per-sample gradients of a BERT classifier: the vmap route against the module-hooks route.

A ``transformers.BertForSequenceClassification`` from a small configuration (hidden 64, 2
layers, 2 heads, intermediate 256, vocabulary 1,000, 2 classes; no pretrained weights),
float32, in eval mode, on N random token sequences of T tokens with random labels. Measured
side by side in one run:

(a) per-sample loss gradients (N x M) without an attention mask, where both routes run: under
    ``torch.func.vmap`` (``fmodel.route = "vmap"``) and from module hooks in batched forwards
    (``fmodel.route = "hooks"``), with the relative error between the two (Frobenius over all
    N, and the worst sample) and, for a few samples, against plain ``torch.autograd.grad``;
    and the floor: the gradient of the summed loss of each chunk by one plain batched forward
    and backward, which any route that differentiates the losses costs at least;
(b) the same gradients of sequences padded to T with an attention mask (``input_ids`` and
    ``attention_mask`` as keyword inputs, ``iif.task.inputs.Inputs``): the route is left to
    the probe, which finds that vmap cannot run the forward and takes the hooks; checked
    against plain autograd on a few samples;
(c) projected features (``iif.engine.features.projected_jacobians``, the input of every
    method) with a Kronecker projection (its fast path for the Linear layers, the embeddings
    and LayerNorms projected densely) and a dense one, on both routes and with the mask.

The runs take turns chunk by chunk (the same chunks, one run after the other), so that a
change in the machine's load reaches all of them alike; the load average is printed at the
start and the end. Every figure is the wall-clock time over all N samples, after an untimed
call on one chunk, which also measures the chunk's peak memory: the process's peak resident
memory (VmHWM, reset through /proc/self/clear_refs) above its resident memory before the
chunk, freed memory handed back first (Linux only, "n/a" elsewhere). Ratio hooks/vmap: hooks
seconds over vmap seconds, above 1 when the hooks route is slower. One torch thread by
default.

Usage::

    python benchmarks/bench_hooks.py [--n 2000] [--seq 64] [--chunk 128] [--kron-dim 1024]
                                     [--dense-dim 1024] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers

from iif.engine.features import projected_jacobians
from iif.engine.functional import FunctionalModel, ModelState
from iif.engine.grads import per_sample_jacobians, sample_loss_fn
from iif.engine.projection import ProjectionSettings, make_projector
from iif.task.inputs import Inputs
from iif.task.task import Recipe, Task

SEED = 0
VOCAB, CLASSES, PAD = 1000, 2, 0
CHECKED = 4  # samples checked against plain autograd


# ---- memory --------------------------------------------------------------------------------
def _status_mib(key: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def chunk_peak_mib(run: Callable[[], object]) -> float:
    """Run ``run`` once; the peak resident memory it reached above the resident memory before
    it, in MiB (NaN where /proc/self/clear_refs cannot reset the peak)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed memory back: an honest baseline
    except (OSError, AttributeError):
        pass
    before = _status_mib("VmRSS:")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        run()
        return math.nan
    run()
    return _status_mib("VmHWM:") - before


# ---- the model and data --------------------------------------------------------------------
def make_bert(seq: int) -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=256, max_position_embeddings=max(seq, 8), num_labels=CLASSES,
        pad_token_id=PAD)
    torch.manual_seed(SEED)
    return transformers.BertForSequenceClassification(config).eval()


def make_data(n: int, seq: int) -> tuple[torch.Tensor, Inputs, torch.Tensor]:
    """Token ids (n, T) without padding; the same ids padded at random lengths (T/4 to T) with
    their attention mask, as keyword inputs; one-hot labels (n, 2)."""
    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(1, VOCAB, (n, seq), generator=gen)
    lengths = torch.randint(max(1, seq // 4), seq + 1, (n,), generator=gen)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    padded = ids.masked_fill(mask == 0, PAD)
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    targets = torch.nn.functional.one_hot(labels, CLASSES).float()
    return ids, Inputs(kwargs={"input_ids": padded, "attention_mask": mask}), targets


def autograd_error(model: torch.nn.Module, task: Task, x, targets: torch.Tensor,
                   jac: torch.Tensor) -> float:
    """Largest relative error of per-sample gradients ``jac`` (n, M) against plain autograd
    of the model called on one sample at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    worst = 0.0
    for i in range(jac.shape[0]):
        xi = x[i : i + 1]
        out = model(**xi.kwargs) if isinstance(xi, Inputs) else model(input_ids=xi)
        loss = task.sample_loss(out.logits, targets[i : i + 1])[0]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        want = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                          for p, g in zip(params, grads, strict=True)])
        worst = max(worst, float((jac[i] - want).norm() / want.norm()))
    return worst


def routed(model: torch.nn.Module, route: str | None) -> FunctionalModel:
    """A FunctionalModel whose route is forced (None: left to the probe)."""
    fmodel = FunctionalModel(model)
    fmodel.route = route
    return fmodel


# ---- running routes side by side ----------------------------------------------------------
Runs = dict[str, tuple[FunctionalModel, Any]]  # name -> (model with its route, its inputs)
Compute = Callable[[FunctionalModel, Any, slice], torch.Tensor]


def interleaved(runs: Runs, compute: Compute, n: int, chunk: int,
                keep: Callable[[int, dict[str, torch.Tensor]], None]
                ) -> tuple[dict[str, float], dict[str, float]]:
    """Every run on each chunk in turn, so that a change in the machine's load reaches all
    of them alike. Returns wall-clock seconds over all n samples and the peak MiB of one
    chunk (from an untimed first call, which also warms up) per run; ``keep(start, outputs)``
    receives each chunk's outputs."""
    peaks = {name: chunk_peak_mib(lambda fm=fm, x=x: compute(fm, x, slice(0, chunk)))
             for name, (fm, x) in runs.items()}
    seconds = dict.fromkeys(runs, 0.0)
    for lo in range(0, n, chunk):
        outs = {}
        for name, (fm, x) in runs.items():
            start = time.perf_counter()
            outs[name] = compute(fm, x, slice(lo, lo + chunk))
            seconds[name] += time.perf_counter() - start
        keep(lo, outs)
    return seconds, peaks


@dataclass
class Agreement:
    """Relative error of the hooks route's rows against the vmap route's, accumulated
    chunk by chunk (Frobenius over all samples, and the worst sample); the first rows of
    every run are kept for the autograd check."""

    diff: float = 0.0
    ref: float = 0.0
    worst: float = 0.0
    first: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, start: int, outs: dict[str, torch.Tensor]) -> None:
        if start == 0:
            self.first = {name: rows[:CHECKED].clone() for name, rows in outs.items()}
        delta = (outs["hooks"] - outs["vmap"]).norm(dim=1)
        norms = outs["vmap"].norm(dim=1)
        self.diff += float((delta**2).sum())
        self.ref += float((norms**2).sum())
        self.worst = max(self.worst, float((delta / norms).max()))

    @property
    def error(self) -> float:
        return math.sqrt(self.diff / self.ref)


def three_runs(model: torch.nn.Module, ids: torch.Tensor, padded: Inputs) -> Runs:
    """vmap and hooks (forced) on the unpadded ids; the probe's route on the padded ones."""
    return {"vmap": (routed(model, "vmap"), ids), "hooks": (routed(model, "hooks"), ids),
            "masked": (routed(model, None), padded)}


# ---- (a) and (b): per-sample gradients ------------------------------------------------------
def jacobians(fmodel: FunctionalModel, state: ModelState, x, fn, targets: torch.Tensor,
              chunk: int) -> torch.Tensor:
    """Per-sample gradients (n, M) of samples ``x`` in chunks of ``chunk``."""
    return torch.cat([j[:, 0] for _, j in per_sample_jacobians(
        fmodel, state, x, fn, targets, chunk_size=chunk)])


def summed_gradient(model: torch.nn.Module, task: Task, x: torch.Tensor,
                    targets: torch.Tensor) -> torch.Tensor:
    """The gradient (1, M) of the summed loss of samples ``x``: one plain batched forward and
    backward, no per-sample work. Any route that differentiates the samples' losses costs at
    least this, so it bounds what a faster route can gain."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = task.sample_loss(model(input_ids=x).logits, targets).sum()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for p, g in zip(params, grads, strict=True)])[None]


def gradients(model, task: Task, ids: torch.Tensor, padded: Inputs, targets: torch.Tensor,
              chunk: int) -> dict:
    """Per-sample loss gradients by the three runs, and the summed gradient (the floor), on
    the same chunks."""
    runs = three_runs(model, ids, padded)
    floor = routed(model, "vmap")
    runs["floor"] = (floor, ids)
    state = runs["vmap"][0].state()
    fn = sample_loss_fn(task)
    agree = Agreement()

    def compute(fm: FunctionalModel, x, s: slice) -> torch.Tensor:
        if fm is floor:
            return summed_gradient(model, task, x[s], targets[s])
        return jacobians(fm, state, x[s], fn, targets[s], chunk)

    seconds, peaks = interleaved(runs, compute, ids.shape[0], chunk, agree.add)
    masked, hooked = runs["masked"][0], runs["hooks"][0]
    return {"seconds": seconds, "peaks": peaks, "error": agree.error, "worst": agree.worst,
            "plan": hooked.hook_plans[tuple(hooked.names)].summary(), "route": masked.route,
            "note": masked.route_note or "",
            "autograd": {name: autograd_error(model, task, x, targets, agree.first[name])
                         for name, (_, x) in runs.items() if name != "floor"}}


# ---- (c): projected features ----------------------------------------------------------------
def features(fmodel: FunctionalModel, state: ModelState, x, fn, targets: torch.Tensor,
             projector, chunk: int) -> torch.Tensor:
    """Projected per-sample loss gradients (n, P)."""
    chunks: Iterator = projected_jacobians(fmodel, state, x, fn, targets, projector=projector,
                                           chunk_size=chunk)
    return torch.cat([f[:, 0] for _, f in chunks])


def projected(model, task: Task, ids: torch.Tensor, padded: Inputs, targets: torch.Tensor,
              structure: str, dim: int, chunk: int) -> dict:
    """Features of one projection by the three runs, on the same chunks."""
    runs = three_runs(model, ids, padded)
    fmodel = runs["vmap"][0]
    state = fmodel.state()
    fn = sample_loss_fn(task)
    projector = make_projector(fmodel.num_params, ProjectionSettings(
        dim=dim, structure=structure), "cpu", torch.float32, fmodel)
    agree = Agreement()
    seconds, peaks = interleaved(
        runs, lambda fm, x, s: features(fm, state, x[s], fn, targets[s], projector, chunk),
        ids.shape[0], chunk, agree.add)
    return {"dim": projector.dim, "seconds": seconds, "peaks": peaks, "error": agree.error}


# ---- the report -----------------------------------------------------------------------------
def _mib(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.0f}"


def _row(label: str, seconds: float, n: int, peak: float, ratio: str = "") -> str:
    return f"  {label:<34} {seconds:9.2f} {n / seconds:11.1f} {_mib(peak):>13} {ratio:>12}"


HEADER = (f"  {'':<34} {'seconds':>9} {'samples/s':>11} {'chunk peak MiB':>13} "
          f"{'hooks/vmap':>12}")


def report_gradients(res: dict, n: int) -> None:
    seconds, peaks, checked = res["seconds"], res["peaks"], res["autograd"]
    print("\n(a) per-sample loss gradients (N x M), no attention mask")
    print(HEADER)
    print(_row("vmap route", seconds["vmap"], n, peaks["vmap"]))
    print(_row("hooks route", seconds["hooks"], n, peaks["hooks"],
               f"{seconds['hooks'] / seconds['vmap']:.2f}x"))
    print(_row("floor: one batched fwd+bwd, summed", seconds["floor"], n, peaks["floor"],
               f"{seconds['floor'] / seconds['vmap']:.2f}x"))
    print(f"  floor: the summed loss's gradient, no per-sample work; any route costs at least "
          f"this, so vmap/floor = {seconds['vmap'] / seconds['floor']:.1f}x is the most a "
          f"faster route could gain")
    print(f"  hooks plan: {res['plan']}")
    print(f"  hooks against vmap: relative error {res['error']:.1e} over all {n} samples "
          f"(Frobenius), worst sample {res['worst']:.1e}")
    print(f"  against plain autograd, first {CHECKED} samples: vmap {checked['vmap']:.1e}, "
          f"hooks {checked['hooks']:.1e}")
    print("\n(b) the same, padded, with the attention mask (route left to the probe)")
    print(HEADER)
    print(_row(f"{res['route']} route", seconds["masked"], n, peaks["masked"],
               f"{seconds['masked'] / seconds['vmap']:.2f}x"))
    print(f"  probe: {res['note']}; hooks/vmap here: over the unpadded vmap time")
    print(f"  against plain autograd with the mask, first {CHECKED} samples: relative error "
          f"{checked['masked']:.1e}")


def report_features(results: dict[str, dict], n: int) -> None:
    print("\n(c) projected features (N x P, projected_jacobians)")
    print("  kronecker: the fast path (layer inputs and output gradients of the Linear and "
          "Embedding layers\n  from one hooked batched forward); the LayerNorms' per-sample "
          "gradients, projected densely,\n  by vmap on the vmap route and by hooks on the "
          "hooks route; dense: per-sample gradients, then projected")
    print(HEADER)
    for structure, res in results.items():
        label = f"{structure} P = {res['dim']}"
        seconds, peaks = res["seconds"], res["peaks"]
        for name, suffix in (("vmap", "vmap"), ("hooks", "hooks"), ("masked", "hooks, masked")):
            ratio = "" if name == "vmap" else f"{seconds[name] / seconds['vmap']:.2f}x"
            print(_row(f"{label}, {suffix}", seconds[name], n, peaks[name], ratio))
        print(f"  {label}: hooks against vmap, relative error {res['error']:.1e}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="samples (default 2000)")
    ap.add_argument("--seq", type=int, default=64, help="tokens per sample T (default 64)")
    ap.add_argument("--chunk", type=int, default=128, help="samples per chunk (default 128)")
    ap.add_argument("--kron-dim", type=int, default=1024, help="Kronecker P asked (1024)")
    ap.add_argument("--dense-dim", type=int, default=1024, help="dense P (default 1024)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--quick", action="store_true",
                    help="a small size that finishes in seconds (N = 96, T = 16, chunk 48, "
                    "dense P = 256)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.seq, args.chunk, args.dense_dim = 96, 16, 48, 256
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = make_bert(args.seq)
    task = Task(model, "classification", Recipe())
    ids, padded, targets = make_data(args.n, args.seq)
    load0 = os.getloadavg()[0]
    m = sum(p.numel() for p in model.parameters() if p.requires_grad)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{threads} thread{'s' if threads > 1 else ''} (torch.set_num_threads({args.threads})), "
          f"{os.cpu_count()} logical CPUs")
    print(f"BertForSequenceClassification: hidden 64, 2 layers, 2 heads, vocabulary {VOCAB}, "
          f"M = {m:,}, float32, eval mode; N = {args.n}, T = {args.seq}, chunk {args.chunk}; "
          f"padded lengths {max(1, args.seq // 4)}-{args.seq} "
          f"(mean {float(padded.kwargs['attention_mask'].sum(1).float().mean()):.1f})")
    grads = gradients(model, task, ids, padded, targets, args.chunk)
    report_gradients(grads, args.n)
    feats = {structure: projected(model, task, ids, padded, targets, structure, dim, args.chunk)
             for structure, dim in (("kronecker", args.kron_dim), ("dense", args.dense_dim))}
    report_features(feats, args.n)
    print(f"\nload average (1 min) at the start {load0:.2f}, at the end {os.getloadavg()[0]:.2f} "
          f"on {os.cpu_count()} logical CPUs: other processes slow the figures down")
    return {"gradients": grads, "features": feats}


if __name__ == "__main__":
    main()

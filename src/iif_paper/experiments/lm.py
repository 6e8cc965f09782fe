"""A language model on fortunes: do the methods find the planted copies of a document?

Protocol:

1. Corpus: Debian's ``fortunes`` (``apt-get install fortunes``), one document per fortune,
   at most ``max_bytes`` UTF-8 bytes, deduplicated, shuffled with the seed; the first
   ``n_queries`` are held out as queries, the next ``n_train`` are the training documents.
2. Planted duplicates: for each query, one exact copy and two near-duplicates (one with a
   few letters changed, one with two neighbouring words swapped, both drawn from the seed)
   are added to the training set at seeded positions, so the "source" query of every planted
   document is known. The byte-level Llama-style LM (:mod:`iif_paper.lm`) is trained on the
   whole training set with AdamW (the task's recipe), checkpoints kept for TracIn.
3. Each query's test loss (its summed next-token cross-entropy) is attributed by IIF, IF
   (projected), TRAK and TracIn. Three completions: the first ``prompt_bytes`` bytes of the
   first three queries, ``gen_bytes`` bytes generated greedily by the trained model; the
   log-probability of the generated part only (the prompt's labels ignored) is attributed
   (``measurement=LogProb()`` for IIF, IF and TracIn; TRAK refuses measurements and scores
   its default output on the same completion-labelled sample).
4. Metric: recall@10 of the planted documents, the fraction of a query's three planted
   documents among its ten strongest proponents (most negative scores), averaged over the
   queries; for the completions, the same for the query they were prompted from. Seconds per
   method (its fitting included) and the torch thread count are reported.
5. LDS of the queries' scores: ``lds_subsets`` random halves of the training set, one model
   retrained on each with the recipe and the run's seed (same initialisation and minibatch
   seed), Spearman correlation of the queries' summed losses with the summed scores of each
   half, averaged over the queries.

The ``smoke`` scale runs the same code on the tiny corpus shipped with the tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iif import InfluenceFunction, IntegratedInfluence, Recipe, Task, train
from iif.engine.projection import ProjectionSettings
from iif.errors import InputError
from iif.evaluation.metrics import LDSResult, lds, random_subsets
from iif.io import atomic_write
from iif.methods import TRAK, TracIn
from iif.methods.integrated.target_path import PathSettings
from iif.methods.tracin.checkpoints import Checkpoint, train_with_checkpoints
from iif.results.attribution import Attribution
from iif.task.measurements import LogProb
from iif_paper.experiments.base import ExperimentResult, Table, begin
from iif_paper.lm.corpus import DEFAULT_FOLDER, read_fortunes
from iif_paper.lm.model import build_model, sequence_log_prob
from iif_paper.lm.tokenizer import BOS, EOS, IGNORE, PAD, decode, encode

NAME = "lm"
TITLE = "Language model on fortunes: recall@10 of planted duplicates"
ENV_VAR = "IIF_FORTUNES_DIR"
"""A fortune folder (or file) to read instead of the scale's default."""
TINY = Path(__file__).resolve().parents[3] / "tests" / "data" / "tiny_fortunes"
METHODS = ["IIF", "IF", "TRAK", "TracIn"]
COLUMNS = ["recall@10", "completion recall@10", "LDS", "seconds"]
K = 10
SIZES: dict[str, dict[str, Any]] = {
    "full": {"folder": str(DEFAULT_FOLDER), "max_bytes": 62, "n_train": 2000,
             "n_queries": 20, "epochs": 20, "lr": 3e-3, "batch_size": 32,
             "model": {"hidden": 64, "layers": 2, "heads": 4, "intermediate": 128},
             "steps": 3, "dim": 256, "iif_dim": 1024, "iif_sparse": False, "test_batch": 1,
             "trak_dim": 2048, "checkpoint_every": 5,
             "prompt_bytes": 10, "gen_bytes": 30, "lds_subsets": 32, "threads": 2},
    "smoke": {"folder": str(TINY), "max_bytes": 62, "n_train": None, "n_queries": 4,
              "epochs": 4, "lr": 3e-3, "batch_size": 16,
              "model": {"hidden": 32, "layers": 1, "heads": 2, "intermediate": 64},
              "steps": 2, "dim": 32, "iif_dim": 32, "iif_sparse": False, "test_batch": "auto",
              "trak_dim": 64, "checkpoint_every": 2,
              "prompt_bytes": 10, "gen_bytes": 12, "lds_subsets": 3, "threads": None},
}


SETTINGS_NOTE = (
    "IIF's settings: the exact default (no projection) would hold (N x M) = (2,060 x 115,520) "
    "features per path step, so a Kronecker projection is used; the default K = 3 and "
    "baseline are kept. The projection (P = 1024) and dense path targets were chosen on a "
    "tuning split, seed 1 (other queries, training set, model and LDS ground truth; 10 "
    "queries), against the first settings P = 256 with sparse targets and six baseline and "
    "path variants: `python benchmarks/tune_lm_iif.py --seed 1 --queries 10` (docs/RESULTS.md, "
    "'Choosing IIF's settings for sequences'). One test sample at a time: 8 stacked copies "
    "gained little on 8 unseen fortunes (18.2 against 19.6 s per query) and each copy holds "
    "dense (N, T x V) path targets (about 0.4 GB).")


# ---- corpus and planting -----------------------------------------------------------------
@dataclass(frozen=True)
class Planted:
    """The training documents (planted ones included), the held-out queries and, per query,
    the training indices of its exact copy and two near-duplicates (n_queries, 3)."""

    train: list[str]
    queries: list[str]
    planted: np.ndarray


def _change_letters(doc: str, rng: random.Random, n: int = 3) -> str:
    """``doc`` with up to ``n`` ASCII letters replaced by other lowercase letters (the byte
    length stays)."""
    chars = list(doc)
    letters = [i for i, c in enumerate(chars) if c.isascii() and c.isalpha()]
    for i in rng.sample(letters, min(n, len(letters))):
        chars[i] = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != chars[i].lower()])
    return "".join(chars)


def _swap_words(doc: str, rng: random.Random) -> str:
    """``doc`` with two neighbouring different words swapped (letters changed when there are
    no two)."""
    words = doc.split(" ")
    pairs = [i for i in range(len(words) - 1) if words[i] != words[i + 1]]
    if not pairs:
        return _change_letters(doc, rng, 2)
    i = rng.choice(pairs)
    words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def near_duplicates(doc: str, seed: int) -> tuple[str, str]:
    """Two near-duplicates of ``doc``, drawn from ``seed`` and the text: letters changed,
    and two words swapped."""
    rng = random.Random(f"{seed}:{doc}")
    return _change_letters(doc, rng), _swap_words(doc, rng)


def plant(train: list[str], queries: list[str], seed: int) -> Planted:
    """Insert an exact copy and two near-duplicates of every query into ``train`` at seeded
    positions; the other documents keep their order."""
    extra = [(q, doc) for q, query in enumerate(queries)
             for doc in (query, *near_duplicates(query, seed))]
    n = len(train) + len(extra)
    slots = sorted(random.Random(seed + 1).sample(range(n), len(extra)))
    order = random.Random(seed + 2).sample(range(len(extra)), len(extra))
    docs: list[str | None] = [None] * n
    planted = np.zeros((len(queries), 3), dtype=np.int64)
    for slot, j in zip(slots, order, strict=True):
        q, doc = extra[j]
        docs[slot] = doc
        planted[q, j % 3] = slot
    rest = iter(train)
    return Planted([d if d is not None else next(rest) for d in docs], list(queries), planted)


def corpus_folder(size: dict[str, Any]) -> Path:
    """The fortune folder of the run: ``$IIF_FORTUNES_DIR`` or the scale's; missing is an
    :class:`InputError` that says how to install it."""
    folder = Path(os.environ.get(ENV_VAR) or size["folder"])
    if not folder.exists():
        raise InputError(f"no fortune files at {folder}: install them with `apt-get install "
                         f"fortunes` (Debian/Ubuntu), or set {ENV_VAR} to a folder of "
                         f"fortune files")
    return folder


def load_planted(size: dict[str, Any], seed: int) -> Planted:
    """Read, shuffle and split the corpus, then plant the duplicates of the queries."""
    docs = read_fortunes(corpus_folder(size), size["max_bytes"])
    random.Random(seed).shuffle(docs)
    n_q = size["n_queries"]
    n_train = size["n_train"]
    if len(docs) < n_q + (n_train or 1):
        raise InputError(f"{len(docs)} documents of at most {size['max_bytes']} bytes: too "
                         f"few for {n_q} queries and {n_train} training documents")
    rest = docs[n_q:] if n_train is None else docs[n_q:n_q + n_train]
    return plant(rest, docs[:n_q], seed)


# ---- model, completions ------------------------------------------------------------------
def token_loss(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean next-token cross-entropy (nats per predicted token)."""
    return float(-sequence_log_prob(model, ids, targets).sum() / (targets != IGNORE).sum())


@torch.no_grad()
def complete(model: torch.nn.Module, prompts: list[str], gen_bytes: int, length: int
             ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Greedy completions of ``prompts``: ids (n, length), labels (n, length) on the
    generated tokens only (IGNORE on the prompt's), and the generated texts."""
    model.eval()
    ids = torch.full((len(prompts), length), PAD, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    texts = []
    for i, prompt in enumerate(prompts):
        seq = [BOS, *prompt.encode("utf-8")]
        start = len(seq)
        while len(seq) < min(start + gen_bytes, length):
            nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
            seq.append(nxt)
            if nxt == EOS or nxt > EOS:  # EOS (or a special id) ends the completion
                break
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, start - 1:len(seq) - 1] = ids[i, start:len(seq)]
        texts.append(decode(seq[start:]))
    return ids, labels, texts


def recall_at_k(result: Attribution, planted: np.ndarray, k: int = K) -> np.ndarray:
    """Per test row, the fraction of its planted documents among its ``k`` proponents."""
    return np.array([len(set(result.proponents(i, k=k).tolist()) & set(planted[i].tolist()))
                     / planted.shape[1] for i in range(planted.shape[0])])


# ---- methods -----------------------------------------------------------------------------
@dataclass
class Setup:
    """What every method needs: the trained model's task (and its LogProb twin), the
    training data, the checkpoints and the sizes."""

    task: Task
    logprob_task: Task
    train: tuple[torch.Tensor, torch.Tensor]
    checkpoints: list[Checkpoint]
    size: dict[str, Any]
    seed: int
    progress: bool | None


def _builders(s: Setup) -> dict[str, Callable[[Task], Any]]:
    """Method name -> a function building the method on a task."""
    proj = ProjectionSettings(dim=s.size["dim"], seed=s.seed, structure="kronecker")
    iif_proj = ProjectionSettings(dim=s.size["iif_dim"], seed=s.seed, structure="kronecker")
    path = PathSettings(steps=s.size["steps"], sparse=s.size["iif_sparse"])
    common = {"seed": s.seed, "progress": s.progress}
    return {
        "IIF": lambda t: IntegratedInfluence(t, s.train, projection=iif_proj, path=path,
                                             test_batch=s.size["test_batch"], **common),
        "IF": lambda t: InfluenceFunction(t, s.train, solver="projected", projection=proj,
                                          **common),
        "TRAK": lambda t: TRAK(t, s.train, projection=ProjectionSettings(
            dim=s.size["trak_dim"], seed=s.seed, structure="kronecker"), **common),
        "TracIn": lambda t: TracIn(t, s.train, checkpoints=s.checkpoints, projection=proj,
                                   **common),
    }


def attribute_all(s: Setup, queries: tuple[torch.Tensor, torch.Tensor],
                  completions: tuple[torch.Tensor, torch.Tensor]
                  ) -> dict[str, tuple[Attribution, Attribution, float]]:
    """Per method: the queries' and the completions' attributions and the seconds taken."""
    out = {}
    for name, build in _builders(s).items():
        start = time.perf_counter()
        on_queries = build(s.task).attribute(queries)
        # TRAK refuses a measurement: its default output on the completion-labelled sample
        on_completions = build(s.task if name == "TRAK" else s.logprob_task
                               ).attribute(completions)
        out[name] = (on_queries, on_completions, time.perf_counter() - start)
    return out


def subset_losses(s: Setup, queries: tuple[torch.Tensor, torch.Tensor]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The LDS ground truth: ``lds_subsets`` random halves of the training set (M, N) and the
    queries' summed losses (M, n_queries) of one model retrained on each (the recipe, the
    run's seed)."""
    subsets = random_subsets(s.size["lds_subsets"], len(s.train[0]), 0.5, s.seed)
    losses = []
    for mask in subsets:
        # a fresh model as the run built it (RMSNorm has no reset_parameters to reinitialise)
        model = build_model(s.seed, max_length=s.size["max_bytes"] + 2, **s.size["model"])
        keep = torch.as_tensor(mask)
        train(dataclasses.replace(s.task, model=model),
              (s.train[0][keep], s.train[1][keep]), seed=s.seed, progress=False)
        losses.append(-sequence_log_prob(model, *queries).numpy())
    return subsets, np.stack(losses)


def subset_lds(s: Setup, queries: tuple[torch.Tensor, torch.Tensor],
               scores: dict[str, np.ndarray]) -> dict[str, LDSResult]:
    """LDS of each method's query scores against :func:`subset_losses`."""
    subsets, losses = subset_losses(s, queries)
    return {name: lds(value, subsets, losses) for name, value in scores.items()}


# ---- the run -----------------------------------------------------------------------------
def _train(planted: Planted, size: dict[str, Any], seed: int, progress: bool | None
           ) -> tuple[Task, list[Checkpoint], dict[str, Any]]:
    length = size["max_bytes"] + 2
    x, y = encode(planted.train, length)
    model = build_model(seed, max_length=length, **size["model"])
    recipe = Recipe(lr=size["lr"], epochs=size["epochs"], batch_size=size["batch_size"],
                    optimizer="adamw")
    task = Task(model, "sequence", recipe)
    start = time.perf_counter()
    checkpoints = train_with_checkpoints(task, (x, y), every=size["checkpoint_every"],
                                         seed=seed, progress=progress)
    model.eval()
    xq, yq = encode(planted.queries, length)
    info = {"parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": time.perf_counter() - start,
            "train_token_loss": token_loss(model, x, y),
            "query_token_loss": token_loss(model, xq, yq),
            "checkpoint_epochs": [c.epoch for c in checkpoints]}
    return task, checkpoints, info


def _held_out_loss(size: dict[str, Any], planted: Planted, model: torch.nn.Module,
                   seed: int) -> float | None:
    """Token loss on documents in neither the training set nor the queries (up to 200)."""
    docs = read_fortunes(corpus_folder(size), size["max_bytes"])
    random.Random(seed).shuffle(docs)
    used = set(planted.train) | set(planted.queries)
    other = [d for d in docs if d not in used][:200]
    if not other:
        return None
    return token_loss(model, *encode(other, size["max_bytes"] + 2))


def _tables(runs: dict[str, tuple[Attribution, Attribution, float]],
            ldss: dict[str, LDSResult], planted: np.ndarray, n_completions: int
            ) -> tuple[Table, Table, dict[str, list[float]]]:
    """The results and standard-error tables, and each method's per-query recall."""
    results: Table = {}
    stderr: Table = {}
    per_query = {}
    for name, (on_q, on_c, seconds) in runs.items():
        recall = recall_at_k(on_q, planted)
        per_query[name] = recall.tolist()
        results[name] = {"recall@10": float(recall.mean()),
                         "completion recall@10": float(
                             recall_at_k(on_c, planted[:n_completions]).mean()),
                         "LDS": ldss[name].mean, "seconds": seconds}
        stderr[name] = {"LDS": ldss[name].stderr}
    return results, stderr, per_query


def _examples(name: str, result: Attribution, texts: list[str], rows: list[int],
              train: list[str], planted: np.ndarray | None) -> str:
    """Top-3 proponents and opponents of ``rows`` as text (a Markdown block)."""
    lines = []
    for i in rows:
        lines.append(f"{name} {i}: {texts[i]!r}")
        for label, ranked in (("proponents", result.proponents(i, 3, with_scores=True)),
                              ("opponents", result.opponents(i, 3, with_scores=True))):
            lines.append(f"  {label}:")
            for r in ranked:
                mark = " [planted]" if planted is not None and r.index in planted[i] else ""
                lines.append(f"    {r.score:+.3e} #{r.index}{mark} {train[r.index]!r}")
    return "\n".join(lines)


def _save(out: Path, planted: Planted, runs: dict[str, tuple[Attribution, Attribution, float]],
          completion_texts: list[str], prompts: list[str]) -> list[str]:
    """Scores as .npy, the documents as JSON, IIF's result folder and its HTML page."""
    files = []
    for name, (on_q, on_c, _) in runs.items():
        for suffix, result in (("queries", on_q), ("completions", on_c)):
            fname = f"{NAME}_{name.lower()}_{suffix}.npy"
            atomic_write(out / fname, lambda f, r=result: np.save(f, r.scores))
            files.append(fname)
    docs = {"train": planted.train, "queries": planted.queries,
            "planted": planted.planted.tolist(), "prompts": prompts,
            "completions": completion_texts}
    text = json.dumps(docs, indent=1, ensure_ascii=False) + "\n"
    atomic_write(out / f"{NAME}_documents.json", lambda f: f.write(text.encode()))
    files.append(f"{NAME}_documents.json")
    from iif.views.html_report import write_html

    folder = out / f"{NAME}_iif"
    runs["IIF"][0].save(folder)
    # `iif report` without a task shows bare indices: the page with the texts is written here
    write_html(folder, folder / "report.html", train_x=planted.train,
               test_x=planted.queries, top=5)
    files += [f"{NAME}_iif/", f"{NAME}_iif/report.html"]
    return files


def run(
    out_dir: str | Path, scale: str = "smoke", seed: int = 0, progress: bool | None = None
) -> ExperimentResult:
    """Run the language-model experiment at ``scale``: writes lm.json, lm.md, the scores
    (.npy), the documents (lm_documents.json) and IIF's result folder with its HTML page."""
    start, out, size = begin(out_dir, scale, SIZES)
    planted = load_planted(size, seed)
    if size["threads"]:  # the timings are reported per thread count: fixed at full scale
        torch.set_num_threads(size["threads"])
    task, checkpoints, info = _train(planted, size, seed, progress)
    info["held_out_token_loss"] = _held_out_loss(size, planted, task.model, seed)
    length = size["max_bytes"] + 2
    prompts = [q.encode("utf-8")[:size["prompt_bytes"]].decode("utf-8", errors="ignore")
               for q in planted.queries[:3]]
    comp_ids, comp_labels, comp_texts = complete(task.model, prompts, size["gen_bytes"], length)
    setup = Setup(task, Task(task.model, "sequence", task.recipe, measurement=LogProb()),
                  encode(planted.train, length), checkpoints, size, seed, progress)
    runs = attribute_all(setup, encode(planted.queries, length), (comp_ids, comp_labels))
    lds_start = time.perf_counter()
    ldss = subset_lds(setup, encode(planted.queries, length),
                      {name: r[0].scores for name, r in runs.items()})
    info["lds_seconds"] = time.perf_counter() - lds_start
    results, stderr, per_query = _tables(runs, ldss, planted.planted, len(prompts))
    examples = "\n\n".join(
        [_examples("query", runs["IIF"][0], planted.queries, [0, 1], planted.train,
                   planted.planted),
         _examples("completion", runs["IIF"][1],
                    [p + "|" + c for p, c in zip(prompts, comp_texts, strict=True)],
                    list(range(len(prompts))), planted.train, planted.planted)])
    print(f"IIF's top-3 proponents and opponents (score < 0: proponent):\n{examples}\n")
    files = _save(out, planted, runs, comp_texts, prompts)
    settings = {**size, "seed": seed, "threads": torch.get_num_threads(), "k": K,
                "n_train_total": len(planted.train), "planted": planted.planted.tolist(),
                "per_query_recall": per_query, "completions": comp_texts,
                "prompts": prompts, **info}
    result = ExperimentResult(
        name=NAME, scale=scale, title=TITLE, settings=settings, results=results,
        stderr=stderr,
        paper={m: dict.fromkeys(COLUMNS) for m in METHODS}, columns=COLUMNS,
        protocol=_protocol(size, info, len(planted.train), torch.get_num_threads()),
        extra={"IIF's top-3 proponents and opponents": f"```\n{examples}\n```",
               "Files": ", ".join(f"`{f}`" for f in files)},
        notes=["The paper has no language-model experiment; recall@10 of planted "
               "duplicates is a sanity check of the attribution.",
               SETTINGS_NOTE],
        seconds=time.perf_counter() - start)
    return result.write(out)


def _protocol(size: dict[str, Any], info: dict[str, Any], n_train: int, threads: int) -> str:
    first = (__doc__ or "").split("Protocol:", 1)[-1].split("The ``smoke``")[0].strip()
    held = info.get("held_out_token_loss")
    return (
        f"{first}\n\nThis run: {n_train} training documents ({size['n_queries']} queries, "
        f"{3 * size['n_queries']} planted), at most {size['max_bytes']} bytes; model "
        f"{size['model']} ({info['parameters']} parameters), AdamW lr {size['lr']}, batch "
        f"{size['batch_size']}, {size['epochs']} epochs ({info['train_seconds']:.0f} s); "
        f"token loss: training {info['train_token_loss']:.3f}, queries "
        f"{info['query_token_loss']:.3f}"
        + (f", unseen documents {held:.3f}" if held is not None else "")
        + f" nats. IIF: default baseline, K = {size['steps']} path steps, "
        f"{'sparse' if size['iif_sparse'] else 'dense'} path targets, Kronecker projection "
        f"P = {size['iif_dim']}, test batch {size['test_batch']}; IF: projected, Kronecker "
        f"P = {size['dim']}; TRAK: Kronecker P = {size['trak_dim']}; TracIn: checkpoints "
        f"after epochs {info['checkpoint_epochs']}, P = {size['dim']}. {threads} torch "
        f"threads.")

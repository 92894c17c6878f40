"""Benchmark one SPON training step against one dense forward of the same batch (same run, same dtype).

Protocol: smollm2-135m (offline default), a batch of 8 x 128 token ids (seeded random ids: timing does
not depend on the text), magnitude top-k at sparsity 0.5 on ``down_proj`` of all 30 layers, a float32
SPON bias on each (UNIF-ALL), the ``kl`` trainer with its defaults.

- dense forward: ``model(ids)`` under ``no_grad`` (median of ``--reps`` after one warm-up);
- training step, teacher not cached (``teacher_cache_mb=0``): teacher forward + student forward + chunked
  KL + backward + AdamW step, as the trainer runs it (median per-step time over ``--reps`` steps after a
  warm-up step, from the trainer's own per-step metrics);
- training step, teacher cached (what later epochs cost).

Peak memory (max RSS, each measured in a fresh subprocess so peaks do not mix): dense forward, training
step, and the KL computation alone on ``8*128 x 49152`` logits (forward + backward) with the default
chunking and unchunked. Memory numbers are the increase of max RSS over the RSS just before the measured
operation, with its inputs already allocated.

Run: ``python benchmarks/bench_train.py [--dtype bfloat16|float32] [--reps 3] [--threads N]``;
``--memory-options`` compares micro-batches and activation checkpointing (peak RSS, step time).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time

import torch

BATCH, BLOCK, VOCAB = 8, 128, 49152


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _setup(dtype: str):
    from spon_toolkit import MagnitudeSparsifier, SparseModel, SponBiases, load_model

    model, _ = load_model("smollm2-135m", dtype=dtype, device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (BATCH, BLOCK), generator=torch.Generator().manual_seed(0))
    biases = SponBiases(model, "down_proj")
    sm = SparseModel(model, MagnitudeSparsifier(0.5), "down_proj", biases=biases)
    return model, ids, sm


def _dense_forward(model, ids) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    return time.perf_counter() - t0


def _train_steps(sm, ids, reps: int, cache_mb: float, **options) -> list[float]:
    from spon_toolkit.train import KLTrainer

    # One batch repeated: with cache_mb=0 the teacher runs every step; otherwise it runs at step 1 only.
    trainer = KLTrainer(epochs=reps + 1, teacher_cache_mb=cache_mb, logging_steps=1, progress=False, **options)
    result = trainer.train(sm, [ids])
    return [BATCH * BLOCK / m["tokens_per_s"] for m in result.metrics][1:]


def _child(kind: str, dtype: str, queue) -> None:
    torch.set_num_threads(_THREADS[0])
    if kind.startswith("kl_"):
        from spon_toolkit.losses import DEFAULT_CHUNK_SIZE, chunked_divergence

        # The trainer's case: student hidden states [tokens, hidden] and a frozen head [vocab, hidden];
        # "kl_unchunked" materialises all logits at once, the chunked variants never do.
        g = torch.Generator().manual_seed(0)
        hidden = 576
        head_w = torch.randn(VOCAB, hidden, generator=g) * 0.05
        t_hidden = torch.randn(BATCH * BLOCK, hidden, generator=g)
        s_hidden = torch.randn(BATCH * BLOCK, hidden, generator=g).requires_grad_(True)

        def head(x):
            return x @ head_w.T

        before = _rss_mb()
        if kind == "kl_unchunked":
            loss = chunked_divergence(head(t_hidden), head(s_hidden), chunk_size=None)
        else:
            loss = chunked_divergence(lambda sl: head(t_hidden[sl]), s_hidden, head=head,
                                      chunk_size=DEFAULT_CHUNK_SIZE)
        loss.backward()
        queue.put({kind: _peak_mb() - before})
        return
    model, ids, sm = _setup(dtype)
    _dense_forward(model, ids)
    if kind == "dense":
        before = _rss_mb()
        _dense_forward(model, ids)
        queue.put({kind: _peak_mb() - before, "model_rss_mb": before})
    else:
        before = _rss_mb()
        _train_steps(sm, ids, 1, 0.0)
        queue.put({kind: _peak_mb() - before, "model_rss_mb": before})


_THREADS = [torch.get_num_threads()]

#: trainer memory options compared by ``--memory-options`` (each in a fresh subprocess)
VARIANTS = {  # micro_batch_size spelled out: the trainer's default is 2
    "whole batch": {"micro_batch_size": None},
    "micro-batch 4": {"micro_batch_size": 4},
    "micro-batch 2": {"micro_batch_size": 2},
    "checkpointing": {"activation_checkpointing": True, "micro_batch_size": None},
    "checkpointing + micro-batch 4": {"activation_checkpointing": True, "micro_batch_size": 4},
}


def _variant_child(options: dict, dtype: str, reps: int, queue) -> None:
    """Peak RSS increase over the loaded model and the median step time (teacher cached) of one variant."""
    torch.set_num_threads(_THREADS[0])
    model, ids, sm = _setup(dtype)
    before = _rss_mb()
    times = _train_steps(sm, ids, reps, 1024.0, **options)
    queue.put({"peak_extra_mb": _peak_mb() - before, "model_rss_mb": before, "step_s": statistics.median(times)})


def _memory_options(dtype: str, reps: int) -> dict:
    ctx = mp.get_context("spawn")
    out = {}
    for name, options in VARIANTS.items():
        q = ctx.Queue()
        p = ctx.Process(target=_variant_child, args=(options, dtype, reps, q))
        p.start()
        out[name] = q.get()
        p.join()
    base = out["whole batch"]
    for row in out.values():
        row["step_ratio_vs_whole_batch"] = row["step_s"] / base["step_s"]
    return out


def _measure_memory(dtype: str, kinds=("dense", "train_step", "kl_chunked", "kl_unchunked")) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    out: dict[str, float] = {}
    for kind in kinds:
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(kind, dtype, q))
        p.start()
        res = q.get()
        p.join()
        out.update({f"{k}_peak_extra_mb" if k == kind else k: v for k, v in res.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", help="model dtype (bfloat16 or float32)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--kl-memory-only", action="store_true",
                        help="only the KL memory measurement (chunked vs unchunked; no model)")
    parser.add_argument("--memory-options", action="store_true",
                        help="compare the trainer's memory options (micro-batches, activation checkpointing): "
                             "peak RSS above the loaded model and step time with the teacher cached")
    args = parser.parse_args()
    if args.memory_options:
        if args.threads:
            _THREADS[0] = args.threads
        print(json.dumps({"protocol": f"smollm2-135m {args.dtype}, batch {BATCH}x{BLOCK}, magnitude 0.5 on "
                                      f"down_proj x30, UNIF-ALL, kl trainer, teacher cached, {_THREADS[0]} threads, "
                                      f"median of {args.reps} steps after one; each variant in a fresh process",
                          **_memory_options(args.dtype, args.reps)}, indent=2))
        return
    if args.kl_memory_only:
        print(json.dumps(_measure_memory(args.dtype, ("kl_chunked", "kl_unchunked")), indent=2))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    _THREADS[0] = torch.get_num_threads()
    # Memory first, while this process is still small: a child's max RSS starts from its parent's.
    memory = {} if args.no_memory else _measure_memory(args.dtype)

    model, ids, sm = _setup(args.dtype)
    with sm.dense():
        _dense_forward(model, ids)  # warm-up
        dense = statistics.median(_dense_forward(model, ids) for _ in range(args.reps))
    step_uncached = statistics.median(_train_steps(sm, ids, args.reps, 0.0))
    step_cached = statistics.median(_train_steps(sm, ids, args.reps, 1024.0))
    sm.detach()
    result = {
        "protocol": f"smollm2-135m {args.dtype}, batch {BATCH}x{BLOCK}, magnitude 0.5 on down_proj x30, "
                    f"UNIF-ALL biases, kl trainer defaults, {torch.get_num_threads()} threads, median of {args.reps}",
        "dense_forward_s": dense,
        "train_step_s": step_uncached,
        "train_step_cached_teacher_s": step_cached,
        "ratio_step_vs_dense": step_uncached / dense,
        "ratio_cached_step_vs_dense": step_cached / dense,
        "dense_tokens_per_s": BATCH * BLOCK / dense,
    }
    result.update(memory)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

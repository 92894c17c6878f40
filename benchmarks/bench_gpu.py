"""GPU figures of the SPON pipeline (needs CUDA; prints a notice and exits 0 without it).

Protocol: a model (default smollm2-135m) on ``cuda`` in bfloat16 with float32 SPON biases, a batch of
``--batch`` x ``--block`` seeded random token ids, magnitude top-k at ``--sparsity`` on ``down_proj`` of
every layer, UNIF-ALL biases, the ``kl`` trainer with its defaults (bf16 autocast on CUDA). Times are CUDA
wall times (synchronised), median of ``--reps`` after one warm-up:

- dense forward and sparse (+SPON) forward of the batch under ``no_grad``: the sparse forward ratio;
- one training step with the teacher targets cached (what every step costs once the experiment's shared
  teacher holds the batch) and with the teacher run in the step: the train step ratios vs dense forward;
- items per hour for an item shaped like the quickstart's (``--train-blocks`` blocks, 1 epoch, eval on
  ``--eval-blocks`` blocks), from the measured step and sparse forward times (teacher shared, model loaded).

Run: ``python benchmarks/bench_gpu.py [--model smollm2-135m] [--reps 5]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _timed(fn, reps: int) -> float:
    fn()  # warm-up
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--train-blocks", type=int, default=64)
    parser.add_argument("--eval-blocks", type=int, default=32)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing measured (run it on a machine with a GPU)")
        return

    from spon_toolkit import MagnitudeSparsifier, SparseModel, SponBiases, load_model
    from spon_toolkit.train import KLTrainer

    model, _ = load_model(args.model, device="cuda")  # bfloat16 on a GPU
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.block),
                        generator=torch.Generator().manual_seed(0)).cuda()
    sm = SparseModel(model, MagnitudeSparsifier(args.sparsity), "down_proj", biases=SponBiases(model, "down_proj"))

    def forward():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    with sm.dense():
        dense = _timed(forward, args.reps)
    sparse = _timed(forward, args.reps)

    def steps(cache_mb: float) -> float:
        trainer = KLTrainer(epochs=args.reps + 1, teacher_cache_mb=cache_mb, logging_steps=1, progress=False)
        result = trainer.train(sm, [ids])
        torch.cuda.synchronize()
        return statistics.median(args.batch * args.block / m["tokens_per_s"] for m in result.metrics[1:])

    step_uncached, step_cached = steps(0.0), steps(4096.0)
    n_steps = -(-args.train_blocks // args.batch)
    n_eval = -(-args.eval_blocks // args.batch)
    item_s = n_steps * step_cached + n_eval * sparse
    print(json.dumps({
        "protocol": f"{args.model} bf16 on {torch.cuda.get_device_name()}, batch {args.batch}x{args.block}, "
                    f"magnitude {args.sparsity} on down_proj (all layers), UNIF-ALL float32 biases, kl trainer, "
                    f"median of {args.reps}",
        "dense_forward_s": dense, "sparse_forward_s": sparse, "sparse_forward_ratio": sparse / dense,
        "train_step_s": step_uncached, "train_step_cached_teacher_s": step_cached,
        "ratio_step_vs_dense": step_uncached / dense, "ratio_cached_step_vs_dense": step_cached / dense,
        "item_s": item_s, "items_per_hour": 3600 / item_s,
        "item_shape": f"{n_steps} steps + {n_eval} eval batches (quickstart-shaped, teacher shared)",
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20,
    }, indent=2))


if __name__ == "__main__":
    main()

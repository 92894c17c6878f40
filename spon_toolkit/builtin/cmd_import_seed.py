"""``spon import-seed``: convert a SPON checkpoint of the seed repository (``.pt``) into a toolkit checkpoint.

Example: ``spon import-seed spon_TOP-50_s0.50.pt --model smollm2-135m --sparsity 0.5 -o top50.safetensors``.
The ``.pt`` is read with ``torch.load(weights_only=True)`` only; the result works with ``spon analyze``,
``spon export`` and ``spon eval --checkpoint``.
"""

from __future__ import annotations

from spon_toolkit.hookspecs import hookimpl


def configure(parser) -> None:
    parser.add_argument("file", help="the seed's checkpoint (.pt with a 'biases' dict keyed layer_<i>_<module>)")
    parser.add_argument("--model", default="smollm2-135m",
                        help="the model the biases were trained on (loader name, directory or hub id)")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="the sparsity they were trained at (checked against the file's record; needed "
                             "only when the file has none)")
    parser.add_argument("--dtype", default=None, help="dtype to load the model in (default: the loader's)")
    parser.add_argument("--output", "-o", required=True, help="checkpoint to write (.safetensors)")


def run(args, toolkit) -> int:
    from spon_toolkit.models import load_model
    from spon_toolkit.results import check_output_file
    from spon_toolkit.seed_checkpoint import import_seed_checkpoint, read_seed_checkpoint
    from spon_toolkit.sparsifiers import check_sparsity

    check_output_file(args.output, "--output")
    if args.sparsity is not None:
        check_sparsity(args.sparsity, "--sparsity")
    seed = read_seed_checkpoint(args.file)  # a bad file fails before the model loads
    model, _ = load_model(args.model, dtype=args.dtype, device="cpu", toolkit=toolkit)
    path = import_seed_checkpoint(args.file, model, args.output, toolkit=toolkit, sparsity=args.sparsity)
    print(f"wrote {path}: {len(seed.biases)} biases ({', '.join(seed.modules)}), sparsity "
          f"{seed.sparsity if seed.sparsity is not None else args.sparsity}")
    return 0


@hookimpl
def spon_register_commands(register):
    register("import-seed", run, "convert a seed-repository SPON checkpoint (.pt) into a toolkit checkpoint",
             configure=configure)

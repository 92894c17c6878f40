"""Dataset functions of the toolkit's offline lm-eval tasks (referenced by ``!function`` in the YAMLs).

lm-eval imports this file by path; the data itself is built by :mod:`spon_toolkit.lmeval_data`.
"""

from spon_toolkit.lmeval_data import continuation_dataset, ppl_dataset

__all__ = ["continuation_dataset", "ppl_dataset"]

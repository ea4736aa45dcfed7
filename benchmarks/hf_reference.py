"""transformers' own decoding, set up the way the benchmarks compare against it.

The helpers now live in `specbench.hf_backend` (the `engine.backend=transformers` backend uses
them too); this module keeps the benchmarks' `from hf_reference import ...` working until they
import from there.
"""

from specbench.hf_backend import fixed_k, generate_new_tokens

__all__ = ["fixed_k", "generate_new_tokens"]

"""Does drafting with several drafts at once pay on this machine? (issue: concurrent drafting)

Two copies of the int8 Qwen2.5-Coder-0.5B draft propose k tokens for the same
prompt, one after the other, then in two threads (PyTorch releases the GIL in
its kernels). Median of --repeats runs after a warm-up. The engine keeps
drafting sequential unless this shows threads winning.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from specbench.config import PROJECT_ROOT, DrafterConfig
from specbench.data import PromptBuilder, read_file
from specbench.engine import CachedModel, DecodeSettings, ModelDrafter, TokenChooser
from specbench.models import ModelCache, model_spec

PUBMEDQA = PROJECT_ROOT.parent / "shared" / "data" / "pubmedqa" / "pqa_labeled.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    cache = ModelCache()
    spec = model_spec(DrafterConfig(fetch="qwen2.5-coder-0.5b-instruct", quantize="int8_dynamic"), "float32",
                      torch.device("cpu"), None)  # fmt: skip
    tokenizer, model = cache.tokenizer(spec), cache.model(spec)
    prompt = PromptBuilder(tokenizer, "{question}\n{abstract}", "auto", 1024).build(read_file(PUBMEDQA)[0]).input_ids
    drafters = [ModelDrafter(f"d{i}", CachedModel(model, len(tokenizer))) for i in range(2)]
    chooser = TokenChooser(DecodeSettings(max_new_tokens=1))
    for drafter in drafters:
        drafter.reset()
        drafter.prefill(prompt)

    def propose(drafter: ModelDrafter) -> list[int]:
        return drafter.propose(prompt, args.k, chooser).tokens

    def sequential() -> float:
        start = time.perf_counter()
        for drafter in drafters:
            propose(drafter)
        return time.perf_counter() - start

    pool = ThreadPoolExecutor(max_workers=2)

    def threaded() -> float:
        start = time.perf_counter()
        list(pool.map(propose, drafters))
        return time.perf_counter() - start

    for measure in (sequential, threaded):  # warm-up
        measure()
    samples: dict[str, list[float]] = {"sequential": [], "threaded": []}
    for _ in range(args.repeats):
        samples["sequential"].append(sequential())
        samples["threaded"].append(threaded())
    medians = {name: 1000 * statistics.median(values) for name, values in samples.items()}
    print(f"torch threads {torch.get_num_threads()}; two drafts x k={args.k}: "
          f"sequential {medians['sequential']:.1f} ms, threaded {medians['threaded']:.1f} ms, "
          f"threaded/sequential {medians['threaded'] / medians['sequential']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()

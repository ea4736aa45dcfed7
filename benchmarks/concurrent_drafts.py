"""Does drafting with several drafts at once pay on this machine? (issue: concurrent drafting)

Two copies of the int8 Qwen2.5-Coder-0.5B draft propose k tokens for the same
prompt, one after the other, then in two threads (PyTorch releases the GIL in
its kernels). Median of --repeats runs after a warm-up. The engine keeps
drafting sequential unless this shows threads winning. The prompt is the first
record of the dataset (the CLI's: `--dataset`, `--dataset-path`); `--draft-path`
takes a local model folder instead of the offline draft.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from prompt_options import add_dataset_arguments, load_prompt_records
from repeats import show, spread

from specbench.config import Dtype, Quantize
from specbench.data import PromptBuilder
from specbench.drafters import ModelDrafterConfig
from specbench.engine import CachedModel, DecodeSettings, ModelDrafter, TokenChooser
from specbench.errors import UserError
from specbench.models import ModelCache, context_length, model_spec


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct", help="offline model to fetch")
    parser.add_argument("--draft-path", type=Path, help="a local model folder (with nn.Linear layers) instead")
    add_dataset_arguments(parser)
    args = parser.parse_args(argv)
    try:
        dataset, records = load_prompt_records(args, 1)
    except UserError as error:
        raise SystemExit(f"error: {error}") from None
    cache = ModelCache()
    source = {"name_or_path": str(args.draft_path)} if args.draft_path else {"fetch": args.draft}
    config = ModelDrafterConfig(**source, quantize=Quantize.int8_dynamic)
    spec = model_spec(config, Dtype.float32, torch.device("cpu"), None)
    tokenizer, model = cache.tokenizer(spec), cache.model(spec)
    max_tokens = min(1024, context_length(spec) - args.k - 1)
    builder = PromptBuilder(tokenizer, dataset.template, dataset.chat_template, max_tokens)
    prompt = builder.build(records[0]).input_ids
    drafters = [ModelDrafter(f"d{i}", CachedModel(model, len(tokenizer))) for i in range(2)]
    chooser = TokenChooser(DecodeSettings(max_new_tokens=1))
    for drafter in drafters:
        drafter.reset(1)
        drafter.prefill([prompt])

    def propose(drafter: ModelDrafter) -> list[int]:
        return drafter.propose([prompt], [args.k], [chooser])[0].tokens

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
    ratios = spread([t / s for s, t in zip(samples["sequential"], samples["threaded"], strict=True)])
    print(f"torch threads {torch.get_num_threads()}; two drafts x k={args.k}: "
          f"sequential {show(spread(samples['sequential']), 1, 1000)} ms, "
          f"threaded {show(spread(samples['threaded']), 1, 1000)} ms, "
          f"threaded/sequential {show(ratios, 2)} (median [min, max] of {args.repeats} runs)")  # fmt: skip


if __name__ == "__main__":
    main()

"""Time to the first token: `generate(max_new_tokens=1)` with LongSpec's eager and compiled target.

    PYTHONPATH=. python bench/prefill.py --out $OUT

A call that returns after the prefill costs what every call pays before its first round: transformers'
generate setup, LongSpec's workspace, and the prefill forward over the prompt. On a small target the
eager prefill is bound by launching its ops from Python, not by the GPU, whatever the prompt length;
`compile_target=True` runs it through the compiled forward (the prompt length is a dynamic dimension).
Same random SmolLM2-shaped target and bundled draft as `round_cost.py`; medians of five calls after
three warm-up calls per prompt length.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from round_cost import SMOLLM2_LAYOUT
from transformers import LlamaConfig, LlamaForCausalLM

import longspec_hf  # noqa: F401  (registers the draft with AutoModel)
from longspec_hf.assets import bundled_draft_dir
from longspec_hf.modeling import LongSpecDraftModel

METHODS = {
    "transformers": None,
    "longspec eager target": dict(tree_widths=[]),
    "longspec compiled target": dict(tree_widths=[], compile_target=True),
}


def first_token_ms(target, prompt, kwargs, warmup: int = 3, repeats: int = 5) -> float:
    for _ in range(warmup):
        target.generate(prompt, max_new_tokens=1, do_sample=False, **kwargs)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        target.generate(prompt, max_new_tokens=1, do_sample=False, **kwargs)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 7680])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    torch.manual_seed(0)
    target = LlamaForCausalLM(LlamaConfig(**SMOLLM2_LAYOUT)).to("cuda", torch.bfloat16).eval()
    target.generation_config.pad_token_id = 0
    target.generation_config.eos_token_id = None
    draft = LongSpecDraftModel.from_pretrained(bundled_draft_dir()).to("cuda", torch.bfloat16)
    rows = []
    for context in args.contexts:
        prompt = torch.randint(100, SMOLLM2_LAYOUT["vocab_size"], (1, context), device="cuda")
        row = dict(context=context)
        for name, options in METHODS.items():
            kwargs = {} if options is None else dict(assistant_model=draft, **options)
            row[name] = first_token_ms(target, prompt, kwargs)
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(os.path.join(args.out, "prefill.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)
    print("| context | " + " | ".join(f"{name} ms" for name in METHODS) + " |")
    print("|---|" + "---|" * len(METHODS))
    for row in rows:
        print(f"| {row['context']} | " + " | ".join(f"{row[name]:.2f}" for name in METHODS) + " |")


if __name__ == "__main__":
    main()

"""Give a saved draft a draft vocabulary: the N tokens most frequent in the Python files of a corpus.

Drafting then scores only those tokens (`LongSpecDraftModel.set_draft_vocabulary`); outputs do
not change. The bundled SmolLM2 draft got its vocabulary this way (16384 tokens, counted over 20M
characters of the site-packages folder holding transformers, the kind of text it was trained on; its
acceptance with that vocabulary is in BENCHMARKS.md, "Draft vocabulary"):

    python bench/draft_vocab.py --size 16384 --draft hub_configs/longspec-smollm2-135m-instruct

`bench/draft_tau.py --draft-vocab N ...` measures what a size costs in acceptance before choosing.
"""

from __future__ import annotations

import argparse
import os

import transformers
from draft_tau import token_counts
from transformers import AutoTokenizer

from longspec_hf import LongSpecDraftModel
from longspec_hf.assets import smollm2_gguf_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft", required=True, help="folder of the draft; rewritten in place unless --output")
    parser.add_argument("--output", default=None)
    parser.add_argument("--size", type=int, required=True, help="tokens in the draft vocabulary")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or id (default: SmolLM2's GGUF)")
    parser.add_argument("--corpus", default=os.path.dirname(transformers.__path__[0]))
    parser.add_argument("--corpus-chars", type=int, default=20_000_000)
    args = parser.parse_args()

    if args.tokenizer is None:
        gguf = smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    draft = LongSpecDraftModel.from_pretrained(args.draft)
    frequency = token_counts(tokenizer, args.corpus, args.corpus_chars)[: draft.config.target_vocab_size]
    draft.set_draft_vocabulary(frequency.topk(args.size).indices)
    draft.save_pretrained(args.output or args.draft)
    covered = float(frequency[draft.draft_vocab_ids].sum() / frequency.sum())
    print(f"draft vocabulary of {args.size} tokens, {covered:.2%} of the corpus's tokens; saved to {args.output or args.draft}")


if __name__ == "__main__":
    main()

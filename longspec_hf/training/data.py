"""Training text: read files, tokenize, pack into fixed-length sequences, hold some out.

Sources may be plain-text files (any extension, read whole), `.jsonl` files (one JSON object per
line with a text field), directories of such files (walked recursively, sorted, filtered by
extension), or, when the Hugging Face `datasets` package is installed, a dataset name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

DEFAULT_EXTENSIONS = (".txt", ".md", ".jsonl", ".py", ".rst")


def iter_source_files(path: str, extensions: Sequence[str] = DEFAULT_EXTENSIONS) -> Iterator[str]:
    """The file `path` itself, or every file under directory `path` whose name ends with one of `extensions`."""
    if os.path.isfile(path):
        yield path
        return
    for root, dirs, files in os.walk(path):
        dirs.sort()  # a fixed walk order makes the packed data, hence training, reproducible
        for name in sorted(files):
            if name.endswith(tuple(extensions)):
                yield os.path.join(root, name)


def iter_texts(
    sources: Iterable[str], extensions: Sequence[str] = DEFAULT_EXTENSIONS, text_field: str = "text"
) -> Iterator[str]:
    """Documents from files, directories, or (with `datasets` installed) dataset names."""
    for source in sources:
        if os.path.exists(source):
            for path in iter_source_files(source, extensions):
                yield from _read_file(path, text_field)
        else:
            yield from _read_hf_dataset(source, text_field)


def _read_file(path: str, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as handle:
        if path.endswith(".jsonl"):
            for line in handle:
                line = line.strip()
                if line:
                    yield json.loads(line)[text_field]
        else:
            yield handle.read()


def _read_hf_dataset(name: str, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as error:
        raise FileNotFoundError(
            f"{name!r} is not a file or directory (install `datasets` to read Hugging Face datasets by name)"
        ) from error
    for record in datasets.load_dataset(name, split="train", streaming=True):
        yield record[text_field]


def pack_token_sequences(
    documents: Iterable[str],
    tokenize: Callable[[str], list[int]],
    sequence_length: int,
    separator_id: int | None = None,
    max_sequences: int | None = None,
) -> torch.Tensor:
    """Tokenize `documents`, join them (with `separator_id` between when given) and cut the stream into rows.

    Returns:
        `(N, sequence_length)` int64; the incomplete tail is dropped.
    """
    rows: list[torch.Tensor] = []
    buffer: list[int] = []
    for text in documents:
        buffer.extend(tokenize(text))
        if separator_id is not None:
            buffer.append(separator_id)
        while len(buffer) >= sequence_length:
            rows.append(torch.tensor(buffer[:sequence_length], dtype=torch.long))
            buffer = buffer[sequence_length:]
            if max_sequences is not None and len(rows) >= max_sequences:
                return torch.stack(rows)
    if not rows:
        raise ValueError(f"the training text holds fewer than {sequence_length} tokens")
    return torch.stack(rows)


def most_frequent_tokens(sequences: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` token ids that occur most often in `sequences` (any shape), most frequent first;
    ties and tokens that never occur are taken in id order."""
    return ranked_by_count(torch.bincount(sequences.flatten().long()), count)


def ranked_by_count(counts: torch.Tensor, count: int) -> torch.Tensor:
    """The ids of the `count` largest of `counts` `(V,)`, largest first; ties (and ids past `V`, counted
    as zero) in id order."""
    counts = torch.cat([counts, counts.new_zeros(max(0, count - len(counts)))])
    return torch.sort(counts, descending=True, stable=True).indices[:count]


def token_counts(
    documents: Iterable[str], tokenize: Callable[[str], list[int]], vocab_size: int, max_chars: int | None = None
) -> torch.Tensor:
    """`(vocab_size,)` how often each token id occurs in `documents`, read in order until `max_chars`
    characters have been tokenized (the document that crosses the limit is counted whole)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    read = 0
    for text in documents:
        ids = torch.tensor(tokenize(text), dtype=torch.long)
        counts += torch.bincount(ids[ids < vocab_size], minlength=vocab_size)
        read += len(text)
        if max_chars is not None and read >= max_chars:
            break
    return counts


def split_held_out(sequences: torch.Tensor, held_out_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle rows of `(N, L)` with `seed` and return `(train, held_out)`; held out gets at least one row."""
    order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(seed))
    num_held_out = max(1, round(len(sequences) * held_out_fraction))
    if num_held_out >= len(sequences):
        raise ValueError(f"{len(sequences)} sequences are too few to hold {num_held_out} out")
    return sequences[order[num_held_out:]], sequences[order[:num_held_out]]


def hf_tokenize_function(tokenizer) -> Callable[[str], list[int]]:
    """A `str -> ids` function from a Hugging Face tokenizer (no special tokens; documents are joined by EOS)."""

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    return tokenize

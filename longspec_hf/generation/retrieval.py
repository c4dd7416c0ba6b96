"""Prompt-lookup branches: continuations of the current suffix found earlier in the row's own text.

Long prompts repeat themselves (code, tool output, documents quoted back), and so does generated text.
When the last `n` tokens of a row occurred before, the tokens that followed them then are a likely
continuation now, found with no model at all. [`find_continuations`] returns a few such continuations
per row; the decoding loop hangs them under the root of the draft tree as extra chains
(`tree.add_chains`), and the target verifies them in the same forward as the draft's nodes.

Every row gets the same number of chains of the same length, so the tree keeps one shape per call. Rows
that find fewer continuations (or shorter ones, near the end of the text) fill the rest with dummy
nodes. A dummy is just another fixed proposal: it is accepted only when it equals what the target
chooses (greedy) or by the point-mass rule (sampling), so it never changes the output.
"""

from __future__ import annotations

import torch

# Suffix lengths tried, longest first (transformers' prompt lookup uses up to 3-gram suffixes too).
DEFAULT_MAX_NGRAM = 3
# How many candidate match positions are looked at per row before picking distinct continuations.
CANDIDATES_PER_BRANCH = 4


def branch_length(num_draft_levels: int) -> int:
    """Tokens per retrieval chain: two past the draft tree's depth (at least 4).

    A verbatim repeat tends to go on for many tokens, so a chain a little deeper than the draft tree
    can gain more than the tree at no extra target forward; its cost is `length` tree nodes per branch.
    """
    return max(4, num_draft_levels + 2)


def find_continuations(
    tokens: torch.Tensor,
    seq_len: torch.Tensor,
    pad_start: torch.Tensor,
    num_branches: int,
    length: int,
    max_ngram: int = DEFAULT_MAX_NGRAM,
    filler: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `num_branches` distinct continuations of each row's suffix, longest suffix match first.

    Candidates are ranked by the length of the matched suffix (`max_ngram` down to 1), then by recency
    (a later occurrence first). Continuations that equal or are a prefix of an already chosen one are
    skipped.

    Args:
        tokens: `(B, S)` token buffer; row `b` is `tokens[b, pad_start[b]:seq_len[b]]`.
        seq_len: `(B,)` current row lengths (the last token is the tree's root).
        pad_start: `(B,)` left-padding length of each row.
        num_branches: continuations per row (K).
        length: tokens per continuation (L).
        max_ngram: longest suffix matched.
        filler: token of dummy nodes.

    Returns:
        `(chains, found)`, both `(B, K, L)`: the continuation tokens, and whether each is a real
        retrieved token (False: a dummy filling a missing or short continuation).
    """
    batch = tokens.shape[0]
    device = tokens.device
    width = int(seq_len.max())
    buffer = tokens[:, :width]
    positions = torch.arange(width, device=device)
    # score = n * (width + 1) + start: longer suffix first, then the later occurrence; -1 for no match.
    scores = torch.full((batch, width), -1, dtype=torch.long, device=device)
    for n in range(max_ngram, 0, -1):
        if width <= n:
            continue
        suffix = tokens.gather(1, (seq_len[:, None] - n + torch.arange(n, device=device)).clamp(min=0))
        starts = positions[: width - n]
        match = torch.ones(batch, width - n, dtype=torch.bool, device=device)
        for k in range(n):
            match &= buffer[:, k : width - n + k] == suffix[:, k : k + 1]
        # The occurrence must lie in the row's text and be followed by at least one token; the suffix
        # itself must lie in the row too.
        match &= (starts[None, :] >= pad_start[:, None]) & (starts[None, :] + n < seq_len[:, None])
        match &= (seq_len - n >= pad_start)[:, None]
        # A continuation start is scored by its longest suffix match only (shorter n come later).
        continuation = starts + n
        candidate = torch.where(match, n * (width + 1) + starts[None, :], -1)
        scores.scatter_reduce_(1, continuation[None, :].expand(batch, -1), candidate, reduce="amax")
    count = min(width, num_branches * CANDIDATES_PER_BRANCH)
    best, start = scores.topk(count, dim=1)
    offsets = torch.arange(length, device=device)
    spans = start[..., None] + offsets  # (B, count, L)
    in_text = (best[..., None] >= 0) & (spans < seq_len[:, None, None])
    span_tokens = tokens.gather(1, spans.clamp(max=tokens.shape[1] - 1).reshape(batch, -1)).view_as(spans)

    chains = torch.full((batch, num_branches, length), filler, dtype=tokens.dtype, device=device)
    found = torch.zeros(batch, num_branches, length, dtype=torch.bool, device=device)
    # Picking distinct continuations is a small Python step over (B, count, L) candidates.
    for row, (row_tokens, row_valid) in enumerate(zip(span_tokens.tolist(), in_text.tolist())):
        chosen: list[tuple[int, ...]] = []
        for candidate_tokens, valid in zip(row_tokens, row_valid):
            chain = tuple(t for t, v in zip(candidate_tokens, valid) if v)
            if not chain or any(c[: len(chain)] == chain for c in chosen):
                continue
            chosen.append(chain)
            if len(chosen) == num_branches:
                break
        for branch, chain in enumerate(chosen):
            chains[row, branch, : len(chain)] = torch.tensor(chain, dtype=tokens.dtype)
            found[row, branch, : len(chain)] = True
    return chains, found

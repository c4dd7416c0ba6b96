"""Prompt-lookup branches: continuations of the current suffix found earlier in the row's own text.

Long prompts repeat themselves (code, tool output, documents quoted back), and so does generated text.
When the last `n` tokens of a row occurred before, the tokens that followed them then are a likely
continuation now, found with no model at all. [`NgramIndex`] keeps every row's n-grams on the host
and returns a few such continuations per row; the decoding loop hangs them under the root of the draft
tree as extra chains (`tree.ChainLayout`), and the target verifies them in the same forward as the
draft's nodes.

Every row gets the same number of chains of the same length, so the tree keeps one shape per call. Rows
that find fewer continuations (or shorter ones, near the end of the text) fill the rest with dummy
nodes. A dummy is just another fixed proposal: it is accepted only when it equals what the target
chooses (greedy) or by the point-mass rule (sampling), so it never changes the output.
"""

from __future__ import annotations

from array import array

import torch

from .tree import DraftTree

# Suffix lengths tried, longest first (transformers' prompt lookup uses up to 3-gram suffixes too).
DEFAULT_MAX_NGRAM = 3
# How many candidate match positions are looked at per row before picking distinct continuations.
CANDIDATES_PER_BRANCH = 4
# n-gram keys are base-2**32 numbers of (token id + 1) digits.
_KEY_BASE = 1 << 32


# Default tokens per retrieval chain. A verbatim repeat tends to go on for many tokens and a round can
# gain at most one token past its longest chain: on held-out code with SmolLM2, chains of 7 / 12 / 16
# tokens gave 7.2 / 10.2 / 12.5 tokens per round at 4k (BENCHMARKS.md), while each chain node costs the
# verify forward only about as much as one more draft tree node.
DEFAULT_BRANCH_LENGTH = 16


def branch_length(num_draft_levels: int) -> int:
    """Default tokens per retrieval chain: `DEFAULT_BRANCH_LENGTH`, or two past the draft tree's depth for
    deeper trees."""
    return max(DEFAULT_BRANCH_LENGTH, num_draft_levels + 2)


class NgramIndex:
    """Every row's n-grams (`n = 1..max_ngram`) with the positions they start at, kept on the host.

    The decoding loop extends it with each round's committed tokens (which it has on the host anyway),
    so finding a row's continuations is a few dictionary lookups: no device work and no host sync.
    An n-gram's key is one integer and its start positions are an `array`: neither is tracked by
    Python's garbage collector, so indexing a long prompt does not make later full collections (which
    walk every tracked object of the process) slower or more frequent.

    Args:
        rows: each row's tokens so far (its prompt, without padding).
        max_ngram: longest suffix matched.
    """

    def __init__(self, rows: list[list[int]], max_ngram: int = DEFAULT_MAX_NGRAM):
        self.max_ngram = max_ngram
        self.texts: list[list[int]] = [[] for _ in rows]
        self.starts: list[dict[int, array]] = [{} for _ in rows]
        for row, tokens in enumerate(rows):
            self.extend(row, tokens)

    @staticmethod
    def _suffix_keys(text: list[int], end: int, max_ngram: int) -> list[int]:
        """Keys of the n-grams ending at `end` for n = 1, 2, ...: distinct for distinct n-grams."""
        keys, key = [], 0
        for n in range(1, min(max_ngram, end) + 1):
            key = key * _KEY_BASE + text[end - n] + 1
            keys.append(key)
        return keys

    def extend(self, row: int, tokens: list[int]) -> None:
        """Append `tokens` to row `row`."""
        text, starts = self.texts[row], self.starts[row]
        for token in tokens:
            text.append(token)
            end = len(text)
            for n, key in enumerate(self._suffix_keys(text, end, self.max_ngram), start=1):
                positions = starts.get(key)
                if positions is None:
                    starts[key] = positions = array("q")
                positions.append(end - n)

    def continuations(self, row: int, num_branches: int, length: int) -> list[list[int]]:
        """Up to `num_branches` distinct continuations (at most `length` tokens each) of the row's suffix.

        Candidates are ranked by the length of the matched suffix (`max_ngram` down to 1), then by
        recency (a later occurrence first); an occurrence must be followed by at least one token. Of the
        first `num_branches * CANDIDATES_PER_BRANCH` candidates, those that equal or are a prefix of an
        already chosen continuation are skipped.
        """
        text, starts = self.texts[row], self.starts[row]
        size = len(text)
        candidates: list[int] = []  # continuation starts, best first
        seen: set[int] = set()
        wanted = num_branches * CANDIDATES_PER_BRANCH
        keys = self._suffix_keys(text, size, self.max_ngram)
        for n in range(len(keys), 0, -1):
            for start in reversed(starts.get(keys[n - 1], ())):
                begin = start + n
                if begin < size and begin not in seen:
                    seen.add(begin)
                    candidates.append(begin)
                    if len(candidates) == wanted:
                        break
            if len(candidates) == wanted:
                break
        chosen: list[list[int]] = []
        for begin in candidates:
            chain = text[begin : begin + length]
            if any(c[: len(chain)] == chain for c in chosen):
                continue
            chosen.append(chain)
            if len(chosen) == num_branches:
                break
        return chosen

    def chains(self, num_branches: int, length: int, filler: int) -> list[list[list[int]]]:
        """`(B, K, L)` nested lists: every row's continuations, dummies (`filler`) where none were found."""
        padded = []
        for row in range(len(self.texts)):
            found = self.continuations(row, num_branches, length)
            found += [[]] * (num_branches - len(found))
            padded.append([chain + [filler] * (length - len(chain)) for chain in found])
        return padded


# What [`prompt_lookup_matches`] measures: chains at the prompt's last positions, looked up in the tokens
# before them. It runs on the host before a call's first forward: these bounds keep it to a few
# milliseconds.
LOOKUP_ESTIMATE_POSITIONS = 256
LOOKUP_ESTIMATE_HISTORY = 4096


def prompt_lookup_tokens_read(length: int) -> int:
    """How many of a row's last tokens [`prompt_lookup_matches`] reads (the rest of a long prompt need not
    be copied to the host)."""
    return LOOKUP_ESTIMATE_HISTORY + LOOKUP_ESTIMATE_POSITIONS + length


def prompt_lookup_matches(
    row: list[int], length: int, positions: int = LOOKUP_ESTIMATE_POSITIONS, history: int = LOOKUP_ESTIMATE_HISTORY
) -> list[int]:
    """What one lookup chain of `length` tokens would have gained along the row's own text, measured
    before any forward: for each of the row's last `positions` positions `i` whose next `length` tokens
    are known, how many of them the best continuation looked up in the `history` tokens before it
    matches (bounded, so that a long prompt costs the host milliseconds).

    The same as running an [`NgramIndex`] of `row[lo:i + 1]` (`lo` = `history` tokens before the first
    measured position) at every `i` and scoring its first continuation with [`chain_match`], done for all
    positions at once: for n = `DEFAULT_MAX_NGRAM` down to 1, the latest end `e <= i` of an earlier
    occurrence of the n tokens ending at `i`, found by a binary search over the occurrences sorted by
    (n-gram, end); its continuation `row[e:i + 1]` (at most `length` tokens) is compared with `row[i + 1:]`.
    """
    first = max(1, len(row) - length - positions)
    lo = max(0, first - history)
    if len(row) - length <= first:
        return []
    tokens = torch.tensor(row, dtype=torch.long)
    size = torch.arange(first, len(row) - length) + 1  # (P,) the text is known up to position i = size - 1
    ends = torch.arange(lo + 1, len(row) - length)  # (E,) ends (exclusive) of earlier n-grams
    # The n tokens before each end, and before each i + 1, as one number: digits are the tokens' ranks among
    # the row's distinct tokens, so that three digits fit in 64 bits for any vocabulary (and rows of up to
    # two million tokens; the estimate reads a few thousand).
    digits = torch.unique(tokens, return_inverse=True)[1] + 1
    base = int(digits.max()) + 1
    at = torch.cat([ends, size])
    keys = torch.zeros_like(at)
    stride = len(row) + 1  # an (n-gram, end) pair as one sortable number: rank of the n-gram * stride + end
    begin = torch.full_like(size, -1)
    for n in range(1, DEFAULT_MAX_NGRAM + 1):  # a longer n-gram's match overrides a shorter one's
        keys = keys * base + digits[(at - n).clamp(min=lo)]
        inside = ends >= lo + n  # n-grams of the indexed text only
        if not inside.any():
            break
        rank = torch.unique(keys, return_inverse=True)[1]
        occurrences = (rank[: len(ends)][inside] * stride + ends[inside]).sort().values
        wanted = rank[len(ends):] * stride + size  # the latest occurrence of the same n-gram ending before i + 1
        index = torch.searchsorted(occurrences, wanted) - 1
        found = occurrences[index.clamp(min=0)]
        hit = (index >= 0) & (found // stride == rank[len(ends):]) & (size - lo >= n)
        begin = torch.where(hit, found % stride, begin)
    offsets = torch.arange(length)
    proposed = tokens[(begin[:, None] + offsets).clamp(min=0, max=len(row) - 1)]
    actual = tokens[size[:, None] + offsets]
    known = (begin[:, None] >= 0) & (begin[:, None] + offsets < size[:, None])  # the chain ends where the text does
    return (proposed.eq(actual) & known).long().cumprod(dim=1).sum(dim=1).tolist()


def find_continuations(
    tokens: torch.Tensor,
    seq_len: torch.Tensor,
    pad_start: torch.Tensor,
    num_branches: int,
    length: int,
    max_ngram: int = DEFAULT_MAX_NGRAM,
    filler: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[`NgramIndex.continuations`] of every row of a token buffer, as tensors.

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
    rows = [row[start:end] for row, start, end in zip(tokens.tolist(), pad_start.tolist(), seq_len.tolist())]
    index = NgramIndex(rows, max_ngram)
    chains = torch.full((len(rows), num_branches, length), filler, dtype=tokens.dtype)
    found = torch.zeros(len(rows), num_branches, length, dtype=torch.bool)
    for row in range(len(rows)):
        for branch, chain in enumerate(index.continuations(row, num_branches, length)):
            chains[row, branch, : len(chain)] = torch.tensor(chain, dtype=tokens.dtype)
            found[row, branch, : len(chain)] = True
    return chains.to(tokens.device), found.to(tokens.device)


def chain_match(chains: list[list[int]], emitted: list[int]) -> int:
    """How many leading tokens the best of `chains` shares with `emitted` (the tokens a round emitted
    after its root): what that chain would have been accepted for, or a lower bound when it matched all."""
    best = 0
    for chain in chains:
        count = 0
        for proposed, actual in zip(chain, emitted):
            if proposed != actual:
                break
            count += 1
        best = max(best, count)
    return best


def best_leaf_suffix(tree: DraftTree, ngram: int = DEFAULT_MAX_NGRAM) -> tuple[torch.Tensor, torch.Tensor]:
    """The draft's most likely node of its deepest level, per row, and the last tokens of its path.

    Returns:
        `(leaf, suffix)`: `(B,)` node indices and `(B, n)` the tokens at depths `D - n + 1 .. D` of the
        leaf's path (`n = min(ngram, D + 1)`, the root counting as depth 0).
    """
    depth = tree.max_depth
    level = tree.level_slice(depth)
    leaf = level.start + tree.log_probs[:, level].argmax(dim=1)
    on_path = tree.ancestors.gather(1, leaf[:, None, None].expand(-1, 1, tree.num_nodes))[:, 0]
    suffix = [
        torch.where(on_path & (tree.depths == d)[None, :], tree.tokens, 0).sum(dim=1)
        for d in range(max(0, depth - ngram + 1), depth + 1)
    ]
    return leaf, torch.stack(suffix, dim=1)


def latest_continuation(
    tokens: torch.Tensor,
    seq_len: torch.Tensor,
    pad_start: torch.Tensor,
    suffix: torch.Tensor,
    length: int,
    filler: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What followed `suffix` where its longest tail last occurred in each row's text, on the device.

    The device counterpart of [`NgramIndex.continuations`] for one continuation of a suffix that is not
    on the host (it ends in draft tokens): every position of the token buffer is compared at once, with
    fixed shapes and no wait for the device, so it runs inside the verify graph.

    Args:
        tokens: `(B, S)` token buffer; row `b` is `tokens[b, pad_start[b]:seq_len[b]]`.
        seq_len, pad_start: `(B,)` row lengths and left padding.
        suffix: `(B, n)` the tokens to match, last one last.
        length: tokens per continuation (L).
        filler: token of the places where no continuation was found.

    Returns:
        `(chain, found)`, both `(B, L)`: the continuation (occurrences whose matched tail is longest win,
        then the latest one; it must be followed by at least one token), and which entries are real.
    """
    batch, size = tokens.shape
    ends = torch.arange(size, device=tokens.device)
    matching = torch.ones(batch, size, dtype=torch.bool, device=tokens.device)
    match_length = torch.zeros(batch, size, dtype=torch.long, device=tokens.device)
    for back in range(suffix.shape[1]):
        # Column e holds tokens[e - back]; it must be a token of the row.
        earlier = torch.cat([tokens.new_full((batch, back), -1), tokens[:, : size - back]], dim=1)
        in_text = (ends - back)[None, :] >= pad_start[:, None]
        matching = matching & in_text & (earlier == suffix[:, -1 - back, None])
        match_length += matching
    followed = ends[None, :] < (seq_len - 1)[:, None]
    score = torch.where(followed & (match_length > 0), match_length * size + ends[None, :], -1)
    best_score, best_end = score.max(dim=1)
    positions = best_end[:, None] + 1 + torch.arange(length, device=tokens.device)[None, :]
    found = (best_score >= 0)[:, None] & (positions < seq_len[:, None])
    chain = tokens.gather(1, positions.clamp(max=size - 1))
    return torch.where(found, chain, filler), found

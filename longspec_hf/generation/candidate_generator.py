"""The drafting side of LongSpec as a transformers `CandidateGenerator`.

[`LongSpecCandidateGenerator.propose_tree`] drafts a beam-style tree for every row of a batch. With a
chain of widths `[1] * k`, [`get_candidates`] also makes it a drop-in candidate generator for
transformers' own assisted-decoding loop (batch size 1).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from transformers import PreTrainedModel
from transformers.cache_utils import Cache
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.generation.logits_process import LogitsProcessorList

from ..modeling import LongSpecDraftModel, TargetKV
from .compiling import compile_fixed_shapes
from .tree import DraftTree, beam_level_sizes, expand_level, expand_level_greedy


def target_kv_from_cache(cache: Cache) -> TargetKV:
    """The last layer of a transformers cache (e.g. `DynamicCache`) as a [`TargetKV`] of batch size 1..B."""
    layer = cache.layers[-1] if len(cache.layers) else None
    keys = getattr(layer, "keys", None)
    if keys is None or keys.numel() == 0:
        raise LookupError("the target cache is still empty")
    batch, length = keys.shape[0], keys.shape[2]
    start = torch.zeros(batch, dtype=torch.long, device=keys.device)
    return TargetKV(key=keys, value=layer.values, start=start, end=start + length)


class LongSpecCandidateGenerator(CandidateGenerator):
    """Drafts trees with a [`LongSpecDraftModel`] that reads the target's last-layer KV cache.

    Args:
        draft: the draft (read only: it keeps no state of this generator's, so several generators, on
            one target or on several, can share it).
        target: the model being decoded; its embedding, rotary embedding and LM head are held in
            `target_parts` (by reference).
        tree_widths: nodes per tree level, e.g. `[4, 16, 16, 16, 16]`; `[1] * k` drafts a chain of `k`.
        batch_size: rows decoded together.
        target_kv: returns the target's committed last-layer K/V at the time of the call.
        max_length: total length (prompt included) that candidates never go past (chain mode).
        graph_pass: a post-grad pass for the compiled steps ([`fused_projections.projection_pass`]).
    """

    def __init__(
        self,
        draft: LongSpecDraftModel,
        target: PreTrainedModel,
        tree_widths: Sequence[int],
        batch_size: int,
        target_kv: Callable[[], TargetKV],
        max_length: int | None = None,
        graph_pass: CustomGraphPass | None = None,
    ):
        if any(int(w) < 1 for w in tree_widths):
            raise ValueError(f"tree_widths must be a list of positive integers, got {list(tree_widths)}")
        self.draft = draft
        self.tree_widths = [int(w) for w in tree_widths]
        self.target_kv = target_kv
        self.max_length = max_length
        self.graph_pass = graph_pass
        self.target_parts = draft.target_parts_of(target)
        self.cache = draft.new_cache(batch_size, max_tree_nodes=sum(self.tree_widths))
        self._compiled_passes: tuple[Callable, Callable] | None = None  # the steps compiled, unbound

    def _block_passes(self, compiled: bool) -> tuple[Callable, Callable]:
        """The draft's root step ([`_feed_ring_and_query_root`]) and level step ([`_fill_and_query_level`]),
        eager or through `torch.compile` (made once)."""
        if not compiled:
            return self._feed_ring_and_query_root, self._fill_and_query_level
        if self._compiled_passes is None:
            # Shapes are fixed per tree (one specialisation per level), except the target cache's
            # capacity, which `propose_tree` marks dynamic. Inductor fuses the block's norms, rotary
            # embeddings, masks and residuals, and the steps' index and tree bookkeeping, into a few
            # kernels. The functions are compiled unbound: compiled bound methods kept on `self` would
            # be a reference cycle, holding a dropped workspace's memory until the garbage collector runs.
            self._compiled_passes = (
                compile_fixed_shapes(type(self)._feed_ring_and_query_root, self.graph_pass),
                compile_fixed_shapes(type(self)._fill_and_query_level, self.graph_pass),
            )
        root_step, level_step = self._compiled_passes
        return functools.partial(root_step, self), functools.partial(level_step, self)

    def refresh(self) -> None:
        """Re-read what the draft takes from the target's LM head (its draft vocabulary's rows), in
        place, in case the head or the vocabulary changed since the last call."""
        self.draft.refresh_draft_head(self.target_parts)

    @torch.no_grad()
    def propose_tree(
        self,
        tokens: torch.Tensor,
        seq_len: torch.Tensor,
        pad_start: torch.Tensor,
        *,
        draft_warpers: LogitsProcessorList | None = None,
        sample_children: bool = False,
        new_tokens_bound: int | None = None,
        compiled: bool = False,
        num_levels: int | None = None,
    ) -> DraftTree:
        """Draft a tree rooted at each row's last token.

        Args:
            tokens: `(B, S)` token buffer; row `b` holds its sequence (left padding included) in
                `[0, seq_len[b])`.
            seq_len: `(B,)` current length of each row; the root is token `seq_len[b] - 1`.
            pad_start: `(B,)` left-padding length of each row.
            draft_warpers: sampling mode: scores-only warpers (temperature, top-k, ...) that turn the
                draft's logits into its distribution q = softmax(warpers(logits)); q at every non-leaf
                node is kept on the tree (`DraftTree.draft_log_probs`) for verification.
            sample_children: draw each node's children without replacement from q (Gumbel-top-k)
                instead of taking q's top tokens; the tree shape follows the same beam allocation.
            new_tokens_bound: an upper bound, known to the caller, on the tokens any row gained since
                the previous call (the root included). With it every shape is fixed and nothing waits
                for the device, so the call can be captured in a CUDA graph; without it the bound is
                read from the device.
            num_levels: draft only the first `num_levels` levels of `tree_widths` (default: all); the
                result is exactly the full tree cut at that depth.
            compiled: run the draft's root and level steps (the block with the ring and tree bookkeeping
                around it) through `torch.compile` (meant for calls that repeat one `new_tokens_bound`,
                as the graphed greedy loop does: each new shape compiles anew).

        Returns:
            A [`DraftTree`] with `1 + sum(tree_widths[:num_levels])` nodes; with no levels, just the roots
            (the draft does not run: verification then is plain one-token decoding through LongSpec's
            cache).
        """
        widths = self.tree_widths[:num_levels]
        if not widths:
            return DraftTree.root_only(tokens.gather(1, (seq_len - 1)[:, None])[:, 0])
        target_kv = self.target_kv()
        root_step, level_step = self._block_passes(compiled)
        if compiled:
            # The target cache's capacity changes with every prompt length: one compiled graph serves
            # them all instead of a recompilation per capacity (the compiled code never reads the
            # cache itself; the attention kernel takes the committed slots from the lengths). So does
            # the token buffer's.
            for tensor in (target_kv.key, target_kv.value):
                torch._dynamo.maybe_mark_dynamic(tensor, 2)
            torch._dynamo.maybe_mark_dynamic(tokens, 1)
        # Greedy trees need only each node's top children; sampling keeps every non-leaf q on the tree.
        # With a draft vocabulary the draft scores only its tokens, and q is zero on all others.
        greedy = draft_warpers is None and not sample_children
        vocab_ids = self.draft.draft_vocab_ids
        root_logits = self._consume_committed(tokens, seq_len, pad_start, target_kv, new_tokens_bound, root_step)
        root_tokens = tokens.gather(1, (seq_len - 1)[:, None])[:, 0]
        root_position = seq_len - 1 - pad_start
        tree = DraftTree.empty(root_tokens, beam_level_sizes(widths, root_logits.shape[-1]))
        logits = root_logits[:, None]  # (B, 1, V), or (B, 1, draft_vocab_size)
        for level, width in enumerate(widths, start=1):
            parents = tree.level_slice(level - 1)
            parent_scores = tree.log_probs[:, parents]
            if greedy:
                new_tokens, parent_local, scores = expand_level_greedy(logits, parent_scores, width, vocab_ids)
            else:
                log_probs = self._draft_log_probs(logits, draft_warpers, vocab_ids)
                tree.draft_log_probs.append(log_probs)
                new_tokens, parent_local, scores = expand_level(
                    log_probs, parent_scores, width, sample_children=sample_children
                )
            if level == len(widths):
                tree.fill_level(level, new_tokens, parent_local, scores)
                break
            logits = level_step(tree, level, new_tokens, parent_local, scores, root_position, target_kv)
        return tree

    @torch.no_grad()
    def consume_committed(
        self, tokens: torch.Tensor, seq_len: torch.Tensor, pad_start: torch.Tensor, new_tokens_bound: int | None = None
    ) -> None:
        """Feed the draft's ring the committed tokens it has not seen, without drafting a tree.

        A graphed [`propose_tree`] takes a fixed number of new tokens per call; this catches the ring up
        first when more came in (the prompt, rounds without drafting). Arguments as in `propose_tree`.
        """
        if self.tree_widths:
            self._consume_committed(
                tokens, seq_len, pad_start, self.target_kv(), new_tokens_bound, self._feed_ring_and_query_root
            )

    def _draft_log_probs(
        self, logits: torch.Tensor, draft_warpers: LogitsProcessorList | None, vocab_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """`(B, n, V)` float32 log q from `(B, n, V)` draft logits; warpers applied when given.

        With `vocab_ids` `(V',)` the logits `(B, n, V')` are over a draft vocabulary: q is their warped
        softmax on those tokens and zero (log q = -inf) on every other token of the target's `V`."""
        scores = logits.float()
        if draft_warpers:
            batch, count, vocab = scores.shape
            # Scores-only warpers ignore input_ids (and token ids: they work on any set of scores); they
            # get a placeholder of the right batch size.
            placeholder = torch.zeros(batch * count, 1, dtype=torch.long, device=scores.device)
            scores = draft_warpers(placeholder, scores.reshape(-1, vocab)).view(batch, count, vocab)
        log_probs = torch.log_softmax(scores, dim=-1)
        if vocab_ids is None:
            return log_probs
        full_vocab = self.target_parts.lm_head.weight.shape[0]
        full = log_probs.new_full((*log_probs.shape[:-1], full_vocab), float("-inf"))
        return full.scatter_(-1, vocab_ids.expand_as(log_probs), log_probs)

    def _consume_committed(
        self,
        tokens: torch.Tensor,
        seq_len: torch.Tensor,
        pad_start: torch.Tensor,
        target_kv: TargetKV,
        new_tokens_bound: int | None,
        root_step: Callable[..., torch.Tensor],
    ) -> torch.Tensor:
        """Feed each row's tokens the ring has not seen (at least the root); return the root's logits."""
        if new_tokens_bound is None:
            chunk = int((seq_len - self._first_unseen(seq_len, pad_start)).max())
        else:
            chunk = min(max(1, new_tokens_bound), self.cache.window)
        return root_step(tokens, seq_len, pad_start, target_kv, chunk)

    def _first_unseen(self, seq_len: torch.Tensor, pad_start: torch.Tensor) -> torch.Tensor:
        """`(B,)` each row's first token the ring has not seen (within the window, past the padding)."""
        cache = self.cache
        first = torch.maximum(torch.minimum(cache.seen_len, seq_len - 1), (seq_len - cache.window).clamp(min=0))
        return torch.maximum(first, pad_start)

    def _feed_ring_and_query_root(
        self, tokens: torch.Tensor, seq_len: torch.Tensor, pad_start: torch.Tensor, target_kv: TargetKV, chunk: int
    ) -> torch.Tensor:
        """Feed the last `chunk` tokens of every row to the ring (those it has seen already are padding);
        `(B, V)` logits of each row's root (`V`: the draft vocabulary's size when the draft has one).
        Shapes depend only on `chunk`: compiled as one piece."""
        first = self._first_unseen(seq_len, pad_start)
        # The chunk ends at each row's root; entries before the row's first unseen token are padding.
        slots = (seq_len - chunk)[:, None] + torch.arange(chunk, device=tokens.device)
        valid = slots >= first[:, None]
        slots = torch.maximum(slots, first[:, None])
        logits = self.draft.append_and_query_root(
            tokens.gather(1, slots), slots - pad_start[:, None], valid, self.cache, target_kv, self.target_parts
        )
        self.cache.seen_len.copy_(seq_len)
        return logits

    def _fill_and_query_level(
        self,
        tree: DraftTree,
        level: int,
        tokens: torch.Tensor,
        parent_local: torch.Tensor,
        scores: torch.Tensor,
        root_position: torch.Tensor,
        target_kv: TargetKV,
    ) -> torch.Tensor:
        """Write level `level` into `tree` (see `DraftTree.fill_level`) and run the draft block over its
        nodes at their positions below each row's root (`root_position`, `(B,)`): `(B, n, V)` logits."""
        tree.fill_level(level, tokens, parent_local, scores)
        nodes = tree.level_slice(level)
        # Scratch slot of node i is i - 1 (the root lives in the ring).
        visible = tree.ancestors[:, nodes, 1 : nodes.stop]
        positions = (root_position[:, None] + level).expand_as(tokens)
        return self.draft.query_tree_level(
            tokens, positions, nodes.start - 1, visible, self.cache, target_kv, self.target_parts
        )

    # ----- transformers CandidateGenerator API (batch size 1, chains) --------------------------------------
    def get_candidates(self, input_ids: torch.LongTensor, **kwargs) -> tuple[torch.LongTensor, None]:
        """Extend `input_ids` `(1, S)` with the draft's chain (the first path of the tree)."""
        if input_ids.shape[0] != 1:
            raise ValueError("transformers' assisted decoding loop runs batch size 1")
        length = input_ids.shape[1]
        seq_len = torch.full((1,), length, device=input_ids.device, dtype=torch.long)
        pad_start = torch.zeros_like(seq_len)
        try:
            tree = self.propose_tree(input_ids, seq_len, pad_start)
        except LookupError:  # the target has not run yet: its first forward verifies no candidates
            return input_ids, None
        # The best leaf's path: with widths [1]*k this is the whole chain.
        path = [int(tree.log_probs[0, tree.level_slice(tree.max_depth)].argmax()) + tree.level_slice(tree.max_depth).start]
        while path[-1] != 0:
            path.append(int(tree.parents[0, path[-1]]))
        chain = tree.tokens[0, list(reversed(path))[1:]]
        if self.max_length is not None:
            chain = chain[: max(self.max_length - length - 1, 0)]
        return torch.cat([input_ids, chain[None].to(input_ids.dtype)], dim=1), None

    @property
    def num_drafting_tokens(self) -> int:
        """Tokens drafted per round: the tree's depth, the most `get_candidates` ever proposes (transformers'
        assisted loop reads it to size what a recurrent target cache keeps for rolling back)."""
        return len(self.tree_widths)

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, num_matches: int):
        """The tree shape is fixed per call; nothing to adapt."""

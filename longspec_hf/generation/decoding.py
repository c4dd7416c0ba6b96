"""The LongSpec decoding loop: draft a tree, verify it in one target forward, keep the longest match.

[`decode`] builds a [`DecodingSession`] for one `generate` call and runs it. The session owns what
lives across rounds (the workspace's cache, token buffer and draft state, the graphs, the lookup index,
the planner, the statistics); its steps are chosen once, when it is built: eager, graphed or compiled
proposal and verification, greedy or sampled acceptance. A round (`DecodingSession.round`) reads top to
bottom:

1. propose: the draft's tree per row from the row's last token (the root); the tree launched ahead,
   behind the previous round's commit, when there is one,
2. verify: prompt-lookup chains hung under the root, one target forward over root + tree nodes
   (hybrid prefix/tree attention, K/V into scratch), the target's logits processed at every node as
   transformers would at that point of the sequence,
3. accept: the deepest node whose path equals the target's choices, plus the target's bonus token
   (sampling: a lossless rule of `sampling.py` picks the path and draws the bonus token),
4. commit: the accepted path's K/V compacted into the committed cache of every layer and the new
   tokens appended to the token buffer, on the device; then one wait for what the host needs,
5. emit: the new tokens handed to the output, which applies max length, EOS and stopping criteria per
   token, and the round recorded.

Rows advance at their own pace; every buffer has explicit per-row lengths (`seq_len`, the cache's
`committed_len`, `pad_start`). A row that ends inside a round (EOS, max length) is done: it rides along
with nothing gained from then on, and the output keeps only the tokens it took.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..modeling import LongSpecDraftModel, cache_keyword
from . import _compat
from .adaptive import Plan, RoundPlanner, row_outcomes
from .attention import LongSpecAttentionInputs, longspec_attention
from .compiling import call_model, collect_after_compiling
from .cuda_graphs import GraphedCall
from .options import LongSpecOptions
from .output import OutputCollector
from .processing import SCORES_ONLY_PROCESSORS, tree_scores
from .retrieval import NgramIndex
from .returned_cache import returned_past_key_values
from .running_prior import RoundsSeen, record_call
from .sampling import resolve_sampling_rule
from .stats import LongSpecStats
from .tree import ChainLayout, DraftTree, GreedyAcceptance, accept_greedy
from .verify import merge_positions_verify
from .workspace import DecodingWorkspace, claim_workspace


# Prompt tokens (over the batch) of one prefill forward, unless the generation config's
# `prefill_chunk_size` says otherwise.
PREFILL_CHUNK_TOKENS = 8192


def left_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """`(B,)` number of leading zeros of each row; raises unless every row is `0...0 1...1`."""
    mask = attention_mask.bool()
    pad_start = (~mask).long().cumprod(dim=1).sum(dim=1)
    slots = torch.arange(mask.shape[1], device=mask.device)
    if not bool((mask == (slots[None, :] >= pad_start[:, None])).all()):
        raise ValueError(
            "LongSpec decoding needs left padding: every attention_mask row must be zeros followed by ones. "
            "Tokenize with padding_side='left'."
        )
    if bool((pad_start == mask.shape[1]).any()):
        raise ValueError(
            "attention_mask has a row of zeros only: every row needs at least one prompt token. Drop the empty "
            "rows from the batch."
        )
    return pad_start


@torch.no_grad()
def decode(
    target: PreTrainedModel,
    draft: LongSpecDraftModel,
    input_ids: torch.Tensor,
    options: LongSpecOptions,
    *,
    generation_config: GenerationConfig,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    streamer=None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor | GenerateDecoderOnlyOutput:
    """LongSpec tree decoding; returns what `target.generate` returns for the same arguments.

    Greedy (`do_sample=False`) gives the same tokens; sampling draws from the same distribution. The
    arguments are those transformers prepares for a decoding method, plus the call's `options`.
    """
    pad_start = left_padding(attention_mask if attention_mask is not None else torch.ones_like(input_ids))
    max_new_tokens = generation_config.max_length - input_ids.shape[1]
    output = _output_collector(input_ids.shape[0], max_new_tokens, generation_config, stopping_criteria, streamer)
    if max_new_tokens <= 0:
        return output.finish(input_ids, generation_config.return_dict_in_generate)
    accept_in_graph = not generation_config.do_sample and len(logits_processor) == 0
    with collect_after_compiling(), claim_workspace(
        target, draft, input_ids, options, max_new_tokens, accept_in_graph=accept_in_graph, do_sample=generation_config.do_sample
    ) as workspace:
        session = DecodingSession(target, workspace, input_ids, pad_start, options, generation_config, logits_processor, output)
        seen = RoundsSeen.of(session.stats)
        with longspec_attention(target):
            session.prefill()
            while not output.all_done:
                session.round()
        session.stats.draft_cache_nbytes = workspace.drafter.cache.nbytes()
        if not generation_config.do_sample:
            record_call(draft, session.stats, seen)
        cache = returned_past_key_values(target, draft, workspace, input_ids.shape[1], output, generation_config)
    return output.finish(input_ids, generation_config.return_dict_in_generate, cache)


def _output_collector(
    batch_size: int, max_new_tokens: int, generation_config: GenerationConfig, stopping_criteria: StoppingCriteriaList, streamer
) -> OutputCollector:
    """The call's output, which applies max length, EOS ids and the other stopping criteria per token."""
    eos_token_ids = _compat.eos_token_ids(generation_config)
    pad = _compat.pad_token_id(generation_config)
    return_dict = generation_config.return_dict_in_generate
    return OutputCollector(
        batch_size,
        max_new_tokens,
        eos_token_ids,
        StoppingCriteriaList([c for c in stopping_criteria if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))]),
        keep_scores=return_dict and generation_config.output_scores,
        keep_logits=return_dict and generation_config.output_logits,
        streamer=streamer,
        pad_token_id=pad if pad is not None else (min(eos_token_ids) if eos_token_ids else 0),
    )


@dataclass
class Proposal:
    """A round's draft tree, the plan it was drafted for, and whether its tensors are a draft graph's
    outputs (fixed addresses, which the verify graph reads in place)."""

    plan: Plan
    tree: DraftTree
    static: bool


@dataclass
class Verified:
    """A round's verified tree, the target's logits at its nodes, the processed scores where they were
    needed, the acceptance, and the lookup chains that were looked up for it (verified or not)."""

    tree: DraftTree
    logits: torch.Tensor
    scores: torch.Tensor | None
    acceptance: GreedyAcceptance
    proposals: list | None


class DecodingSession:
    """One LongSpec `generate` call: its buffers (from a claimed [`DecodingWorkspace`]), its steps and
    its per-round state. Build it, call `prefill()`, then `round()` until `output.all_done`.

    Tensors: `tokens` `(B, capacity)` holds row `b`'s sequence in `[0, seq_len[b])`, left padding in
    `[0, pad_start[b])`; `cache` holds the committed K/V of `[0, seq_len[b] - 1)` (the root, each row's
    last token, is verified with the next tree).
    """

    def __init__(
        self,
        target: PreTrainedModel,
        workspace: DecodingWorkspace,
        input_ids: torch.Tensor,
        pad_start: torch.Tensor,
        options: LongSpecOptions,
        generation_config: GenerationConfig,
        logits_processor: LogitsProcessorList,
        output: OutputCollector,
    ):
        self.target, self.workspace, self.input_ids, self.options = target, workspace, input_ids, options
        self.batch_size, self.prompt_len = input_ids.shape
        self.device = input_ids.device
        self.max_new_tokens = generation_config.max_length - self.prompt_len
        # Prompt tokens per prefill forward: the activations of a forward grow with its tokens, and a
        # chunk bounds them (about 1 GiB for an 8B target) however long the prompt.
        self.prefill_chunk = generation_config.prefill_chunk_size or max(256, PREFILL_CHUNK_TOKENS // self.batch_size)
        self.stats = options.stats if options.stats is not None else LongSpecStats()
        self.stats.tree_widths = options.tree_widths
        self.stats.prompt_lookup = (options.prompt_lookup_branches, options.chain_length)
        self.logits_processor = logits_processor
        self.output = output
        self.pad_token_id = output.pad_token_id
        workspace.start(input_ids, pad_start, self.pad_token_id)
        workspace.drafter.refresh()
        self.cache, self.tokens, self.seq_len = workspace.cache, workspace.tokens, workspace.seq_len
        self.pad_start, self.drafter = workspace.pad_start, workspace.drafter
        self._choose_steps(generation_config)
        # Per-round state. The draft ring's lag: at most how many tokens a row gained since the draft
        # last ran (the prompt and the first token before the first round); known on the host, so no
        # sync is needed. `seq_len_host` mirrors `seq_len` (the cache's committed_len is one less: the
        # root is not committed yet).
        self.ring_lag = self.prompt_len + 1
        self.round_gain_limit = options.max_depth + 1
        self.seq_len_host = [self.prompt_len + 1] * self.batch_size
        self.active_rows = [True] * self.batch_size
        self.active = torch.ones(self.batch_size, dtype=torch.bool, device=self.device)
        self.lookup: NgramIndex | None = None
        self.chain_layouts: dict[tuple[int, ...], ChainLayout] = {}
        self.full_plan = Plan(len(options.tree_widths), options.prompt_lookup_branches > 0)
        self.planner = None
        if options.adaptive and self.full_plan != Plan(0, False):
            self.planner = RoundPlanner(self.full_plan.depth, self.full_plan.chains, workspace.plan_costs)
        self.ahead: Proposal | None = None
        self.round_end = time.perf_counter()

    def _choose_steps(self, generation_config: GenerationConfig) -> None:
        """Pick the eager, graphed or sampled version of each step, once for the call."""
        do_sample = bool(generation_config.do_sample)
        graphed = self.options.cuda_graphs
        self.rule = resolve_sampling_rule(self.options.sampling_rule) if do_sample else None
        # Steps are stored as plain functions, not bound methods, so that the session holds no reference
        # cycle (which would keep its workspace's memory until the garbage collector runs).
        self._sampling = {}
        if do_sample:
            # The draft's q: its softmax after the target's scores-only warpers (temperature, top-k, ...).
            warpers = LogitsProcessorList([p for p in self.logits_processor if isinstance(p, SCORES_ONLY_PROCESSORS)])
            self._sampling = dict(draft_warpers=warpers, sample_children=self.rule.sample_children)
        self._propose_tree = DecodingSession._propose_graphed if graphed and not do_sample else DecodingSession._propose_eager
        self._run_target = self.workspace.verify if graphed else _eager_verify(self.target, self.cache, self.seq_len, self.pad_start, self.tokens)
        # A greedy graphed draft reads only device state, so the next round's tree can be launched before
        # the host emits this round's tokens, and the two overlap.
        self.draft_ahead = graphed and not do_sample and bool(self.options.tree_widths)

    # ----- prefill --------------------------------------------------------------------------------------
    def prefill(self) -> None:
        """The prompt's K/V become the committed prefix, chunk by chunk; its last logits give the first token."""
        input_ids, prompt_len = self.input_ids, self.prompt_len
        positions = (torch.arange(prompt_len, device=self.device)[None, :] - self.pad_start[:, None]).clamp(min=0)
        for start in range(0, prompt_len, self.prefill_chunk):
            end = min(start + self.prefill_chunk, prompt_len)
            logits = self._prefill_chunk(input_ids[:, start:end], positions[:, start:end], start)
        self.cache.end_prefill(prompt_len)
        logits = logits[:, -1:].float()
        scores = self.logits_processor(input_ids, logits[:, 0].clone())[:, None]
        if self.rule is not None:
            first = torch.multinomial(torch.softmax(scores[:, 0], dim=-1), 1)
        else:
            first = scores.argmax(dim=-1)
        self.tokens[:, prompt_len] = first[:, 0]
        first_tokens = first.tolist()
        self.output.add(first_tokens, [1] * self.batch_size, self.tokens, [prompt_len] * self.batch_size, scores, logits)
        self.seq_len += 1
        if self.options.prompt_lookup_branches > 0:
            # Prompt lookup: every row's n-grams on the host, extended with each round's tokens.
            prompts = [row[start:] for row, start in zip(input_ids.tolist(), self.pad_start.tolist())]
            self.lookup = NgramIndex([prompt + first_row for prompt, first_row in zip(prompts, first_tokens)])

    def _prefill_chunk(self, input_ids: torch.Tensor, positions: torch.Tensor, start: int) -> torch.Tensor:
        """One target forward over prompt slots `[start, start + T)`; returns its last logits `(B, 1, V)`.

        The first chunk attends causally to itself; a later one also to the committed slots before it
        (`attention.py`: FlashAttention where it applies, else the tree kernel with a causal mask). The prefill runs eagerly also with `compile_target`:
        tracing the target's whole forward once more (for a dynamic prompt length) would double the
        first call's compilation, and the prefill's launches are a small part of its work except on
        tiny targets.
        """
        length = input_ids.shape[1]
        self.cache.begin_prefill(start, start + length)
        left_padded = bool(self.pad_start.any())
        if start == 0:
            longspec = LongSpecAttentionInputs(self.cache, left_padded=left_padded)
        else:
            slots = torch.arange(start, start + length, device=self.device)
            causal = (slots[None, :] <= slots[:, None])[None] & (slots[None, None, :] >= self.pad_start[:, None, None])
            # Padding queries see themselves only (their outputs are never used), so no row is empty.
            tree_mask = causal | torch.eye(length, dtype=torch.bool, device=self.device)[None]
            longspec = LongSpecAttentionInputs(self.cache, tree_mask=tree_mask, left_padded=left_padded,
                                               chunk_depths=slots - start, chunk_start=start)
        return call_model(
            self.target,
            input_ids=input_ids,
            position_ids=positions,
            attention_mask=self.cache.mask_placeholder,
            **{cache_keyword(self.target): self.cache},
            use_cache=True,
            logits_to_keep=1,
            longspec=longspec,
        ).logits

    # ----- one round ------------------------------------------------------------------------------------
    def round(self) -> None:
        """Propose, verify, accept, commit, emit."""
        proposal = self.propose()
        verified = self.verify(proposal)
        host_rows = self.commit(verified)
        self.emit(proposal.plan, verified, host_rows)

    def propose(self) -> Proposal:
        """This round's tree: the one launched ahead behind the last commit, else drafted now."""
        if self.ahead is not None:
            proposal, self.ahead = self.ahead, None
            return proposal
        return self._draft(self._next_plan(), self.ring_lag)

    def verify(self, proposal: Proposal) -> Verified:
        """Hang the lookup chains under the root, run the target over the tree, accept a path."""
        plan, tree = proposal.plan, proposal.tree
        # The chains are looked up every round: unverified, they still tell the planner what they would
        # have matched.
        proposals = self.lookup.chains(self.options.prompt_lookup_branches, self.options.chain_length, filler=self.pad_token_id) if self.lookup else None
        chains = layout = None
        num_nodes = tree.num_nodes
        if plan.chains:
            layout = self._chain_layout(tree.level_sizes)
            chains = _to_device(proposals, self.device)
            num_nodes = layout.num_nodes
        self.cache.begin_tree(num_nodes)
        verified, logits, acceptance = self._run_target(tree, chains, layout, adopt=proposal.static)
        # A graph's tree holds the structure; sampling also needs the draft's distributions.
        tree = dataclasses.replace(verified, draft_log_probs=list(tree.draft_log_probs))
        scores = None
        if acceptance is None or self.output.scores is not None:
            scores = tree_scores(logits, self.logits_processor, self.tokens, self.seq_len, tree)
        if acceptance is None:
            acceptance = self.rule.verify(tree, scores) if self.rule is not None else accept_greedy(tree, scores.argmax(dim=-1))
        return Verified(tree, logits, scores, acceptance, proposals)

    def commit(self, verified: Verified) -> list[list[int]]:
        """Commit the accepted paths on the device, launch the next draft when it can go ahead, and wait
        for what the host needs: per row `[gained, *new_tokens, (from_chains)]`."""
        tree, acceptance = verified.tree, verified.acceptance
        if [not d for d in self.output.done] != self.active_rows:  # rows finish rarely: refresh the mask then
            self.active_rows = [not d for d in self.output.done]
            self.active = torch.tensor(self.active_rows, device=self.device)
        gained = torch.where(self.active, acceptance.num_accepted + 1, 0)
        path_width = acceptance.new_tokens.shape[1]
        to_host = [gained[:, None], acceptance.new_tokens]
        if tree.retrieval is not None:
            on_path = tree.retrieval.gather(1, acceptance.path)[:, 1:]
            within = torch.arange(on_path.shape[1], device=self.device)[None, :] < acceptance.num_accepted[:, None]
            to_host.append((on_path & within).sum(dim=1, keepdim=True))
        # A row that ends inside this path (EOS, max length, a stopping criterion) still advances by all
        # it gained: it is done, and the output keeps only what it took. Compaction writes a whole path
        # past each row's committed slots.
        if max(self.seq_len_host) - 1 + path_width > self.cache.capacity:
            raise RuntimeError("LongSpecCache capacity exceeded")
        self.cache.compact(acceptance.path, gained)
        write = self.seq_len[:, None] + torch.arange(path_width, device=self.device)
        self.tokens.scatter_(1, write, acceptance.new_tokens)
        self.seq_len += gained
        # The round's one wait for the device is for what the host needs to emit tokens and keep
        # statistics; the copy is queued before the next draft, so the wait ends before it.
        wait_for_host_rows = _copy_to_host(torch.cat(to_host, dim=1))
        if self.draft_ahead and self.planner is None and path_width <= self.round_gain_limit:
            # The next tree needs nothing from this round's results on the host (a fixed plan, and no
            # row can gain more than the graph feeds the ring): launched before the host waits, the
            # device goes from this round's commit straight into the next draft while the host emits
            # this round's tokens and launches the next verify forward behind it.
            self.ahead = self._draft(self.full_plan, path_width)
        return wait_for_host_rows()

    def emit(self, plan: Plan, verified: Verified, host_rows: list[list[int]]) -> None:
        """Hand the new tokens to the output and record the round (statistics, plan costs)."""
        round_start, self.round_end = self.round_end, time.perf_counter()
        path_width = verified.acceptance.new_tokens.shape[1]
        gained_host = [row[0] for row in host_rows]
        lengths_before, self.seq_len_host = self.seq_len_host, [s + g for s, g in zip(self.seq_len_host, gained_host)]
        self.ring_lag = (0 if plan.depth > 0 else self.ring_lag) + max(gained_host)
        new_tokens_host = [row[1 : 1 + path_width] for row in host_rows]
        from_chains = [row[-1] if verified.tree.retrieval is not None else 0 for row in host_rows]
        if self.draft_ahead and self.ahead is None:
            # Planned from the rounds before this one: this round is recorded below, while the next tree
            # is drafted on the device.
            self.ahead = self._draft(self._next_plan(), self.ring_lag)
        # Every plan's round costs are kept with the workspace, so that a later adaptive call knows which
        # plans have their graphs captured already. The processes of a tensor-parallel target plan alike
        # from the slowest one's times (their forwards must match): measured only when a planner reads them.
        sharding = self.workspace.sharding
        if self.planner is None:
            if sharding is None:
                self.workspace.plan_costs.record(plan, self.round_end - round_start)
        else:
            outcomes = row_outcomes(plan, gained_host, from_chains, verified.proposals, new_tokens_host, self.active_rows)
            seconds = self.round_end - round_start
            self.planner.record(plan, seconds if sharding is None else sharding.slowest(seconds, self.device), outcomes)
        path = verified.acceptance.path
        node_scores = _at_path(verified.scores, path) if self.output.scores is not None else None
        node_logits = _at_path(verified.logits, path) if self.output.logits is not None else None
        taken = self.output.add(new_tokens_host, gained_host, self.tokens, lengths_before, node_scores, node_logits)
        if self.lookup is not None:
            for row, (row_tokens, count) in enumerate(zip(new_tokens_host, taken)):
                self.lookup.extend(row, row_tokens[:count])
        self._record(plan, gained_host, from_chains)

    # ----- the steps' variants and helpers ------------------------------------------------------------------
    def _next_plan(self) -> Plan:
        """The full tree, or with `adaptive` the plan the planner expects to be fastest now."""
        if self.planner is None:
            return self.full_plan
        generated = min((n for n, a in zip(self.seq_len_host, self.active_rows) if a), default=self.prompt_len)
        return self.planner.choose(remaining_tokens=self.max_new_tokens - (generated - self.prompt_len))

    def _draft(self, plan: Plan, ring_lag: int) -> Proposal:
        """The tree of `plan.depth` levels (the root alone when the draft does not run)."""
        if plan.depth == 0:
            return Proposal(plan, DraftTree.root_only(self.tokens.gather(1, (self.seq_len - 1)[:, None])[:, 0]), False)
        return self._propose_tree(self, plan, ring_lag)

    def _propose_eager(self, plan: Plan, ring_lag: int) -> Proposal:
        tree = self.drafter.propose_tree(
            self.tokens, self.seq_len, self.pad_start, new_tokens_bound=ring_lag, num_levels=plan.depth, **self._sampling
        )
        return Proposal(plan, tree, False)

    def _propose_graphed(self, plan: Plan, ring_lag: int) -> Proposal:
        """Greedy: the draft graph of `plan.depth` levels (captured on first use), fed a fixed number of
        new tokens per round."""
        if ring_lag > self.round_gain_limit:
            # The graph feeds the ring a fixed number of tokens: catch up on the rest first.
            self.drafter.consume_committed(self.tokens, self.seq_len, self.pad_start, new_tokens_bound=ring_lag)
        graphs = self.workspace.draft_graphs
        if plan.depth not in graphs:
            graphs[plan.depth] = GraphedCall(
                functools.partial(
                    self.drafter.propose_tree,
                    self.tokens,
                    self.seq_len,
                    self.pad_start,
                    new_tokens_bound=self.round_gain_limit,
                    compiled=self.workspace.key.compile_draft,
                    num_levels=plan.depth,
                ),
                self.workspace.key.capture,
            )
        return Proposal(plan, graphs[plan.depth](), True)

    def _chain_layout(self, level_sizes: list[int]) -> ChainLayout:
        """Where the lookup chains go in a tree of these draft levels (made once per shape)."""
        shape = tuple(level_sizes)  # the draft's tree, or the root alone (adaptive)
        if shape not in self.chain_layouts:
            options = self.options
            self.chain_layouts[shape] = ChainLayout.build(
                level_sizes,
                options.prompt_lookup_branches,
                options.chain_length,
                self.device,
                leaf_length=options.leaf_length if level_sizes else 0,
            )
        return self.chain_layouts[shape]

    def _record(self, plan: Plan, gained_host: list[int], from_chains: list[int]) -> None:
        stats, active = self.stats, self.active_rows
        stats.rounds += 1
        stats.drafted_rounds += int(plan.depth > 0)
        stats.accepted_lengths.extend(g for g, a in zip(gained_host, active) if a)
        stats.retrieval_accepted.extend(c for c, a in zip(from_chains, active) if a)


def _eager_verify(target, cache, seq_len, pad_start, tokens) -> Callable:
    """The verify step of the plain eager loop (`cuda_graphs=False`): the target's logits at every node;
    acceptance follows from the processed scores."""

    def verify(tree: DraftTree, chains, layout, adopt: bool = False):
        return merge_positions_verify(target, cache, seq_len, pad_start, tree, chains, layout, accept=False, tokens=tokens)

    return verify


def _copy_to_host(values: torch.Tensor) -> Callable[[], list]:
    """Queues a copy of `values` to the host; the returned function waits for that copy alone (not for
    work queued after it, unlike `values.tolist()`) and returns the values as nested lists."""
    if values.device.type != "cuda":
        return values.tolist
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> list:
        copied.synchronize()
        return host.tolist()

    return wait


def _to_device(values: list, device: torch.device) -> torch.Tensor:
    """A tensor of host values on `device`, copied without waiting for the device's queued work."""
    tensor = torch.tensor(values)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _at_path(values: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
    """`(B, P, V)` rows of `values` `(B, 1 + N, V)` at the path's nodes."""
    return values.gather(1, path[..., None].expand(-1, -1, values.shape[-1])).float()

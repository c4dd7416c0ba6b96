"""The LongSpec decoding loop: draft a tree, verify it in one target forward, keep the longest match.

Read top to bottom: `longspec_decode` prefills the target, then runs rounds until every row is done.
Each round

1. drafts a tree per row from the row's last token (the root), and with prompt lookup on hangs the
   row's n-gram continuations under the root as extra chains (`retrieval.py`),
2. runs the target once over root + tree nodes (hybrid prefix/tree attention, K/V into scratch),
3. processes the target's logits at every node as transformers would at that point of the sequence,
4. accepts the deepest node whose path equals the target's choices, plus the target's bonus token
   (sampling: a lossless rule of `sampling.py` picks the path and draws the bonus token),
5. compacts the accepted path's K/V into the committed cache of every layer and appends the new
   tokens to the token buffer, on the device, then waits once for the commit to reach the host,
6. hands the new tokens to the output, which applies max length, EOS and stopping criteria per token
   (greedy with CUDA graphs: while the next round's draft tree, queued behind the commit, is running).

Rows advance at their own pace; every buffer has explicit per-row lengths (`seq_len`, the cache's
`committed_len`, `pad_start`). A row that ends inside a round (EOS, max length) is done: it rides along
with nothing gained from then on, and the output keeps only the tokens it took.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..modeling import LongSpecDraftModel, cache_keyword
from .adaptive import Plan, RoundPlanner, row_outcomes
from .attention import LongSpecAttentionInputs, longspec_attention
from .cuda_graphs import GraphedCall
from .output import OutputCollector
from .processing import SCORES_ONLY_PROCESSORS, tree_scores
from .retrieval import NgramIndex, branch_length
from .sampling import resolve_sampling_rule
from .tree import ChainLayout, DraftTree, accept_greedy
from .verify import merge_positions_verify
from .workspace import acquire_workspace


@dataclass
class LongSpecStats:
    """Statistics of one LongSpec `generate` call.

    Attributes:
        rounds: draft-and-verify rounds (target forwards after the prefill).
        accepted_lengths: tokens each active row gained in each round (accepted draft tokens + 1).
        retrieval_accepted: for the same rows and rounds, how many of the accepted tokens came from
            prompt-lookup chains (0 when prompt lookup is off).
        drafted_rounds: rounds in which the draft ran (all rounds with a draft, unless `adaptive`
            paused it).
    """

    rounds: int = 0
    accepted_lengths: list[int] = field(default_factory=list)
    retrieval_accepted: list[int] = field(default_factory=list)
    drafted_rounds: int = 0

    @property
    def mean_accepted_length(self) -> float:
        """Mean tokens gained per row per round (tau); 0.0 when no round ran."""
        return sum(self.accepted_lengths) / len(self.accepted_lengths) if self.accepted_lengths else 0.0

    @property
    def mean_retrieval_accepted(self) -> float:
        """Mean tokens per row per round accepted from prompt-lookup chains."""
        return sum(self.retrieval_accepted) / len(self.retrieval_accepted) if self.retrieval_accepted else 0.0

    def reset(self) -> None:
        self.rounds = 0
        self.drafted_rounds = 0
        self.accepted_lengths.clear()
        self.retrieval_accepted.clear()


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
        raise ValueError("attention_mask has a row without any token")
    return pad_start


@torch.no_grad()
def longspec_decode(
    target: PreTrainedModel,
    input_ids: torch.Tensor,
    draft: LongSpecDraftModel,
    *,
    tree_widths: Sequence[int],
    generation_config: GenerationConfig,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    streamer=None,
    attention_mask: torch.Tensor | None = None,
    stats: LongSpecStats | None = None,
    sampling_rule: str | None = None,
    prompt_lookup_branches: int = 0,
    prompt_lookup_length: int | None = None,
    prompt_lookup_under_draft: bool = False,
    adaptive: bool = False,
    cuda_graphs: bool = True,
    compile_draft: bool = False,
    compile_target: bool = False,
) -> torch.Tensor | GenerateDecoderOnlyOutput:
    """LongSpec tree decoding; returns what `target.generate` returns for the same arguments.

    Greedy (`do_sample=False`) gives the same tokens; sampling draws from the same distribution, with
    `sampling_rule` (see `sampling.py`) verifying the trees.

    `prompt_lookup_branches=K` adds K chains of `prompt_lookup_length` tokens (default
    `branch_length(len(tree_widths))`) continuing the row's suffix where it occurred before
    (`retrieval.py`): the tree then has `1 + sum(tree_widths) + K * prompt_lookup_length` nodes, dummies
    included, in every round. `prompt_lookup_under_draft` adds one more such chain under the
    draft's most likely deepest node, continuing its path where the path's tail last occurred (found on
    the device, inside the verify step). `adaptive` plans
    each round instead: how many of the tree's levels to draft (none: plain decoding) and whether to
    hang the chains, whichever gives the most tokens per second measured so far (`adaptive.py`).
    `cuda_graphs` replays the verify forward and the greedy draft from CUDA graphs on a CUDA target
    (`cuda_graphs.py`), kept on the draft for later calls of the same shape (`workspace.py`); elsewhere
    the same fixed-shape steps run eagerly.
    `cuda_graphs=False` runs the plain eager loop with fresh buffers. `compile_draft` runs the draft
    block of that greedy graph through `torch.compile` (fewer, fused kernels per tree level; the first
    call of a process compiles for a few seconds). `compile_target` likewise runs the target's verify
    forward through `torch.compile` inside its graph, and the prefill through the same compiled forward
    (all modes).
    """
    batch_size, prompt_len = input_ids.shape
    device = input_ids.device
    max_new_tokens = generation_config.max_length - prompt_len
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    pad_start = left_padding(attention_mask)
    stats = stats if stats is not None else LongSpecStats()
    eos = generation_config._eos_token_tensor
    eos_token_ids = set(eos.reshape(-1).tolist()) if eos is not None else set()
    pad = generation_config._pad_token_tensor
    pad_token_id = int(pad) if pad is not None else (min(eos_token_ids) if eos_token_ids else 0)
    extra_criteria = StoppingCriteriaList(
        [c for c in stopping_criteria if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))]
    )
    return_dict = generation_config.return_dict_in_generate
    output = OutputCollector(
        batch_size,
        max_new_tokens,
        eos_token_ids,
        extra_criteria,
        keep_scores=return_dict and generation_config.output_scores,
        keep_logits=return_dict and generation_config.output_logits,
        streamer=streamer,
        pad_token_id=pad_token_id,
    )
    do_sample = bool(generation_config.do_sample)
    rule = resolve_sampling_rule(sampling_rule) if do_sample else None
    # The draft's q: its softmax after the target's scores-only warpers (temperature, top-k, ...).
    draft_warpers = (
        LogitsProcessorList([p for p in logits_processor if isinstance(p, SCORES_ONLY_PROCESSORS)])
        if do_sample
        else None
    )
    if max_new_tokens <= 0:
        return output.finish(input_ids, return_dict)

    chain_length = 0
    if prompt_lookup_branches > 0:
        chain_length = prompt_lookup_length or branch_length(len(tree_widths))
    leaf_length = chain_length if prompt_lookup_under_draft and tree_widths else 0
    num_tree_nodes = 1 + sum(tree_widths) + prompt_lookup_branches * chain_length + leaf_length
    max_depth = max(len(tree_widths) + leaf_length, chain_length)
    # Finished rows keep riding along in the batch: leave room for one more path past the last token.
    capacity = prompt_len + max_new_tokens + 2 * (max_depth + 1)
    # Off CUDA the same fixed-shape steps run eagerly (GraphedCall(capture=False)).
    use_graphs, capture = cuda_graphs, device.type == "cuda"
    # Greedy decoding without logits processors accepts inside the verify graph too.
    accept_in_graph = not do_sample and len(logits_processor) == 0
    # Buffers and graphs at fixed addresses, kept on the draft for the next call of this shape.
    workspace = acquire_workspace(
        target,
        draft,
        input_ids,
        tree_widths=list(tree_widths),
        max_tree_nodes=num_tree_nodes,
        capacity=capacity,
        accept_in_graph=accept_in_graph,
        capture=capture,
        compile_draft=compile_draft and use_graphs and not do_sample,
        compile_target=compile_target and use_graphs,
        keep=use_graphs,
    )
    workspace.start(input_ids, pad_start, pad_token_id)
    cache, tokens, seq_len, pad_start = workspace.cache, workspace.tokens, workspace.seq_len, workspace.pad_start
    drafter = workspace.drafter
    draft.attach_target(target)

    with workspace.claim(), longspec_attention(target):
        # Prefill: the prompt's K/V become the committed prefix; its last logits give the first token.
        cache.begin_prefill(prompt_len)
        positions = (torch.arange(prompt_len, device=device)[None, :] - pad_start[:, None]).clamp(min=0)
        prefill = target
        if use_graphs and workspace.verify.forward is not None:
            # The compiled target: an eager forward launches each of its small kernels from Python, which
            # costs more than the GPU work of a prompt of thousands of tokens. The prompt length is a
            # dynamic dimension, so one compiled graph serves every length.
            prefill = workspace.verify.forward
            for tensor in (input_ids, positions):
                torch._dynamo.maybe_mark_dynamic(tensor, 1)
        logits = prefill(
            input_ids=input_ids,
            position_ids=positions,
            **{cache_keyword(target): cache},
            use_cache=True,
            logits_to_keep=1,
            longspec=LongSpecAttentionInputs(cache, left_padded=bool(pad_start.any())),
        ).logits[:, -1:].float()
        scores = logits_processor(input_ids, logits[:, 0].clone())[:, None]
        if do_sample:
            first = torch.multinomial(torch.softmax(scores[:, 0], dim=-1), 1)
        else:
            first = scores.argmax(dim=-1)
        tokens[:, prompt_len] = first[:, 0]
        first_tokens = first.tolist()
        output.add(first_tokens, [1] * batch_size, tokens, [prompt_len] * batch_size, scores, logits)
        seq_len += 1

        verify = workspace.verify if use_graphs else None
        # The draft ring's lag: at most how many tokens a row gained since the draft last ran (the
        # prompt and the first token before the first round). Known on the host, so no sync is needed.
        ring_lag = prompt_len + 1
        round_gain_limit = max_depth + 1
        # Host mirror of seq_len (the cache's committed_len is one less: the root is not committed yet).
        seq_len_host = [prompt_len + 1] * batch_size
        active_rows = [True] * batch_size
        active = torch.ones(batch_size, dtype=torch.bool, device=device)
        # Prompt lookup: every row's n-grams on the host, extended with each round's tokens.
        lookup = None
        chain_layouts: dict[tuple[int, ...], ChainLayout] = {}
        if prompt_lookup_branches > 0:
            prompts = [row[start:] for row, start in zip(input_ids.tolist(), pad_start.tolist())]
            lookup = NgramIndex([prompt + first_row for prompt, first_row in zip(prompts, first_tokens)])
        # Every round verifies the full tree and the chains, unless `adaptive` plans each round.
        full_plan = Plan(len(tree_widths), lookup is not None)
        planner = None
        if adaptive and full_plan != Plan(0, False):
            planner = RoundPlanner(full_plan.depth, full_plan.chains, workspace.plan_costs)

        def next_plan() -> Plan:
            if planner is None:
                return full_plan
            generated = min((n for n, a in zip(seq_len_host, active_rows) if a), default=prompt_len) - prompt_len
            return planner.choose(remaining_tokens=max_new_tokens - generated)

        def propose(plan: Plan, ring_lag: int) -> tuple[DraftTree, bool]:
            """This round's draft tree of `plan.depth` levels (the root alone when the draft does not
            run), and whether its tensors are a draft graph's outputs (fixed addresses)."""
            if plan.depth == 0:
                return DraftTree.root_only(tokens.gather(1, (seq_len - 1)[:, None])[:, 0]), False
            if do_sample:
                tree = drafter.propose_tree(
                    tokens,
                    seq_len,
                    pad_start,
                    draft_warpers=draft_warpers,
                    sample_children=rule.sample_children,
                    new_tokens_bound=ring_lag,
                    num_levels=plan.depth,
                )
                return tree, False
            if not use_graphs:
                tree = drafter.propose_tree(tokens, seq_len, pad_start, new_tokens_bound=ring_lag, num_levels=plan.depth)
                return tree, False
            if ring_lag > round_gain_limit:
                # The graph feeds the ring a fixed number of tokens: catch up on the rest first.
                drafter.consume_committed(tokens, seq_len, pad_start, new_tokens_bound=ring_lag)
            if plan.depth not in workspace.draft_graphs:
                workspace.draft_graphs[plan.depth] = GraphedCall(
                    functools.partial(
                        drafter.propose_tree,
                        tokens,
                        seq_len,
                        pad_start,
                        new_tokens_bound=round_gain_limit,
                        compiled=workspace.key.compile_draft,
                        num_levels=plan.depth,
                    ),
                    capture,
                )
            return workspace.draft_graphs[plan.depth](), True

        # A greedy graphed draft reads only device state, so the next round's tree can be launched
        # before the host emits this round's tokens, and the two overlap.
        draft_ahead = use_graphs and not do_sample and bool(tree_widths)
        ahead: tuple[Plan, DraftTree, bool] | None = None
        round_end = time.perf_counter()
        while not output.all_done:
            if ahead is not None:
                (plan, tree, static_tree), ahead = ahead, None
            else:
                plan = next_plan()
                tree, static_tree = propose(plan, ring_lag)
            drafted = plan.depth > 0
            chains = layout = None
            num_nodes = tree.num_nodes
            # The chains are looked up every round: unverified, they still tell the planner what they
            # would have matched.
            proposals = None
            if lookup is not None:
                proposals = lookup.chains(prompt_lookup_branches, chain_length, filler=pad_token_id)
            if plan.chains:
                shape = tuple(tree.level_sizes)  # the draft's tree, or the root alone (adaptive)
                if shape not in chain_layouts:
                    chain_layouts[shape] = ChainLayout.build(
                        tree.level_sizes,
                        prompt_lookup_branches,
                        chain_length,
                        device,
                        leaf_length=leaf_length if tree.level_sizes else 0,
                    )
                layout = chain_layouts[shape]
                chains = _to_device(proposals, device)
                num_nodes = layout.num_nodes
            cache.begin_tree(num_nodes)
            if verify is not None:
                verified, logits, acceptance = verify(tree, chains, layout, adopt=static_tree)
                # The graph's tree holds the structure; sampling also needs the draft's distributions.
                tree = dataclasses.replace(verified, draft_log_probs=list(tree.draft_log_probs))
            else:
                tree, logits, acceptance = merge_positions_verify(
                    target, cache, seq_len, pad_start, tree, chains, layout, accept=False, tokens=tokens
                )
            scores = None
            if acceptance is None or output.scores is not None:
                scores = tree_scores(logits, logits_processor, tokens, seq_len, tree)
            if acceptance is None:
                if do_sample:
                    acceptance = rule.verify(tree, scores)
                else:
                    acceptance = accept_greedy(tree, scores.argmax(dim=-1))

            if [not d for d in output.done] != active_rows:  # rows finish rarely: refresh the mask then
                active_rows = [not d for d in output.done]
                active = torch.tensor(active_rows, device=device)
            gained = torch.where(active, acceptance.num_accepted + 1, 0)
            path_width = acceptance.new_tokens.shape[1]
            to_host = [gained[:, None], acceptance.new_tokens]
            if tree.retrieval is not None:
                on_path = tree.retrieval.gather(1, acceptance.path)[:, 1:]
                within = torch.arange(on_path.shape[1], device=device)[None, :] < acceptance.num_accepted[:, None]
                to_host.append((on_path & within).sum(dim=1, keepdim=True))
            to_host = torch.cat(to_host, dim=1)
            node_scores = _at_path(scores, acceptance.path) if output.scores is not None else None
            node_logits = _at_path(logits, acceptance.path) if output.logits is not None else None
            # Commit on the device first. A row that ends inside this path (EOS, max length, a stopping
            # criterion) still advances by all it gained: it is done, and the output keeps only what
            # it took.
            # Compaction writes a whole path past each row's committed slots.
            if max(seq_len_host) - 1 + path_width > cache.capacity:
                raise RuntimeError("LongSpecCache capacity exceeded")
            cache.compact(acceptance.path, gained)
            write = seq_len[:, None] + torch.arange(path_width, device=device)
            tokens.scatter_(1, write, acceptance.new_tokens)
            seq_len += gained
            # The round's one wait for the device is for what the host needs to emit tokens and keep
            # statistics; the copy is queued before the next draft, so the wait ends before it.
            wait_for_host_rows = _copy_to_host(to_host)
            if draft_ahead and planner is None and path_width <= round_gain_limit:
                # The next tree needs nothing from this round's results on the host (a fixed plan, and
                # no row can gain more than the graph feeds the ring): launched before the host waits,
                # the device goes from this round's commit straight into the next draft while the host
                # emits this round's tokens and launches the next verify forward behind it.
                ahead = (full_plan, *propose(full_plan, path_width))
            host_rows = wait_for_host_rows()
            round_start, round_end = round_end, time.perf_counter()
            gained_host = [row[0] for row in host_rows]
            lengths_before, seq_len_host = seq_len_host, [s + g for s, g in zip(seq_len_host, gained_host)]
            ring_lag = (0 if drafted else ring_lag) + max(gained_host)
            gained_active = [g for g, a in zip(gained_host, active_rows) if a]
            new_tokens_host = [row[1 : 1 + path_width] for row in host_rows]
            if draft_ahead and ahead is None:
                # Planned from the rounds before this one: this round is recorded below, while the
                # next tree is drafted on the device.
                next_round = next_plan()
                ahead = (next_round, *propose(next_round, ring_lag))
            # Every plan's round costs are kept with the workspace, so that a later adaptive call knows
            # which plans have their graphs captured already.
            if planner is None:
                workspace.plan_costs.record(plan, round_end - round_start)
            else:
                from_chains = [row[-1] if tree.retrieval is not None else 0 for row in host_rows]
                outcomes = row_outcomes(plan, gained_host, from_chains, proposals, new_tokens_host, active_rows)
                planner.record(plan, round_end - round_start, outcomes)

            taken = output.add(new_tokens_host, gained_host, tokens, lengths_before, node_scores, node_logits)
            if lookup is not None:
                for row, (row_tokens, count) in enumerate(zip(new_tokens_host, taken)):
                    lookup.extend(row, row_tokens[:count])
            stats.rounds += 1
            stats.drafted_rounds += int(drafted)
            stats.accepted_lengths.extend(gained_active)
            if tree.retrieval is not None:
                stats.retrieval_accepted.extend(row[-1] for row, a in zip(host_rows, active_rows) if a)
            else:
                stats.retrieval_accepted.extend([0] * len(gained_active))
    draft.last_stats = stats
    draft.last_draft_cache_nbytes = drafter.cache.nbytes()
    return output.finish(input_ids, return_dict)


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

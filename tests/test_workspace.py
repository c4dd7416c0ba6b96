"""The decoding workspace kept on the draft between generate calls: reused only when it fits, reset
completely between calls (outputs equal plain generate whatever ran before), rebuilt when weights move."""

from __future__ import annotations

import copy
import pickle
import random

import pytest
import torch

from longspec_hf import release_workspace
from longspec_hf.generation.workspace import ATTRIBUTE

from .conftest import make_draft, make_target
from .test_equality import random_batch

# A tiny target's automatic tree drafts nothing (a draft level costs more than its whole forward); these
# tests are about the draft's state, so they name a tree.
DRAFTING_TREE = [4, 16, 16, 16, 16]


def kept(draft):
    return draft.__dict__.get(ATTRIBUTE)


def test_consecutive_calls_reuse_the_workspace_and_match_plain_generate():
    rng = random.Random("workspace")
    target = make_target("llama", seed=11)
    draft = make_draft(target, seed=12)
    # The longest call first: every later one fits in its workspace.
    longest = torch.randint(3, target.config.vocab_size, (2, 60))
    target.generate(longest, assistant_model=draft, max_new_tokens=60, do_sample=False)
    first = kept(draft)
    for case in range(12):
        # Same batch size and tree: one workspace serves prompts of different lengths and paddings.
        ids, mask = random_batch(rng, target.config.vocab_size, 2, rng.randrange(20, 60))
        kwargs = dict(attention_mask=mask, max_new_tokens=rng.choice([5, 30, 60]), do_sample=False)
        reference = target.generate(ids, **kwargs)
        output = target.generate(ids, assistant_model=draft, **kwargs)
        assert torch.equal(reference, output), case
        assert kept(draft) is first, case


def test_workspace_is_rebuilt_for_another_shape_or_moved_weights():
    target = make_target("llama", seed=13)
    draft = make_draft(target, seed=14)
    ids = torch.randint(3, target.config.vocab_size, (1, 40))
    target.generate(ids, assistant_model=draft, max_new_tokens=20, do_sample=False)
    workspace = kept(draft)
    assert workspace is not None

    # A much shorter call gets a smaller workspace instead of holding the large one.
    long_ids = torch.randint(3, target.config.vocab_size, (1, 700))
    target.generate(long_ids, assistant_model=draft, max_new_tokens=5, do_sample=False)
    assert kept(draft).capacity >= 700 + 5
    target.generate(ids, assistant_model=draft, max_new_tokens=20, do_sample=False)
    assert kept(draft).capacity < 700

    # Other tree widths, another batch size: new buffers.
    workspace = kept(draft)
    target.generate(ids, assistant_model=draft, max_new_tokens=20, do_sample=False, tree_widths=[2, 2])
    assert kept(draft) is not workspace
    workspace = kept(draft)
    target.generate(ids.repeat(2, 1), assistant_model=draft, max_new_tokens=20, do_sample=False, tree_widths=[2, 2])
    assert kept(draft) is not workspace

    # Weights replaced (as .to(...) or loading would): the graphs' addresses are stale, so rebuild,
    # and the output follows the new weights.
    workspace = kept(draft)
    with torch.no_grad():
        draft.mlp.down_proj.weight = torch.nn.Parameter(draft.mlp.down_proj.weight * 0.5)
        target.lm_head.weight = torch.nn.Parameter(target.lm_head.weight.flip(0))
    reference = target.generate(ids.repeat(2, 1), max_new_tokens=20, do_sample=False)
    output = target.generate(ids.repeat(2, 1), assistant_model=draft, max_new_tokens=20, do_sample=False, tree_widths=[2, 2])
    assert kept(draft) is not workspace
    assert torch.equal(reference, output)


def test_eager_calls_keep_nothing_and_copies_start_without_a_workspace():
    target = make_target("llama", seed=15)
    draft = make_draft(target, seed=16)
    ids = torch.randint(3, target.config.vocab_size, (1, 30))
    target.generate(ids, assistant_model=draft, max_new_tokens=10, do_sample=False, cuda_graphs=False)
    assert kept(draft) is None

    target.generate(ids, assistant_model=draft, max_new_tokens=10, do_sample=False)
    assert kept(draft) is not None
    assert kept(copy.deepcopy(draft)) is None
    assert kept(pickle.loads(pickle.dumps(draft))) is None
    release_workspace(draft)
    assert kept(draft) is None
    # Still usable after the release.
    reference = target.generate(ids, max_new_tokens=10, do_sample=False)
    assert torch.equal(target.generate(ids, assistant_model=draft, max_new_tokens=10, do_sample=False), reference)


def test_sampling_after_greedy_reuses_nothing_stale():
    """Greedy (acceptance in the verify graph) and sampling (acceptance outside) differ in what the
    workspace holds; alternating them keeps each reproducible under the same seed."""
    target = make_target("llama", seed=17)
    draft = make_draft(target, seed=18)
    ids = torch.randint(3, target.config.vocab_size, (1, 30))
    sample = dict(assistant_model=draft, max_new_tokens=25, do_sample=True, temperature=0.8)
    torch.manual_seed(3)
    first = target.generate(ids, **sample)
    target.generate(ids, assistant_model=draft, max_new_tokens=25, do_sample=False)
    torch.manual_seed(3)
    assert torch.equal(target.generate(ids, **sample), first)


def test_a_reused_workspace_drafts_exactly_like_a_fresh_one():
    """Equal outputs would hide a stale draft ring (the output is lossless anyway); equal per-round
    acceptance shows the reused workspace starts from the same state as a new one."""
    from longspec_hf import LongSpecStats

    target = make_target("llama", seed=19)
    draft = make_draft(target, seed=20, sliding_window=8)
    # The draft's self-attention over its ring dominates its block, so its proposals depend on what
    # the ring holds.
    with torch.no_grad():
        draft.mlp.down_proj.weight.zero_()
        draft.cross_attn.o_proj.weight.zero_()
        draft.self_attn.o_proj.weight.mul_(4.0)
    before = torch.randint(3, target.config.vocab_size, (1, 50))
    ids = torch.randint(3, target.config.vocab_size, (1, 45))

    def accepted(prompt):
        stats = LongSpecStats()
        target.generate(
            prompt, assistant_model=draft, tree_widths=DRAFTING_TREE, max_new_tokens=40, do_sample=False,
            longspec_stats=stats,
        )
        return stats.accepted_lengths

    accepted(before)
    reused = accepted(ids)
    release_workspace(draft)
    fresh = accepted(ids)
    assert reused == fresh
    assert max(fresh) > 1


def test_a_workspace_in_use_is_neither_shared_nor_replaced():
    """A call made while another decodes with the kept workspace (another thread) gets its own buffers."""
    target = make_target("llama", seed=23)
    draft = make_draft(target, seed=24)
    ids = torch.randint(3, target.config.vocab_size, (1, 30))
    reference = target.generate(ids, max_new_tokens=12, do_sample=False)
    target.generate(ids, assistant_model=draft, max_new_tokens=12, do_sample=False)
    workspace = kept(draft)
    workspace.in_use = True  # as while a call on another thread decodes with it
    output = target.generate(ids, assistant_model=draft, max_new_tokens=12, do_sample=False)
    assert kept(draft) is workspace and workspace.in_use
    workspace.in_use = False
    assert torch.equal(output, reference)
    # Released when an error escapes the decoding loop too.
    from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

    class Failing(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            assert kept(draft).in_use
            raise RuntimeError("criterion failed")

    with pytest.raises(RuntimeError, match="criterion failed"):
        target.generate(
            ids, assistant_model=draft, max_new_tokens=12, do_sample=False,
            stopping_criteria=StoppingCriteriaList([Failing()]),
        )
    assert not kept(draft).in_use


def test_calls_inside_and_outside_inference_mode_do_not_share_a_workspace():
    target = make_target("llama", seed=25)
    draft = make_draft(target, seed=26)
    ids = torch.randint(3, target.config.vocab_size, (1, 30))
    reference = target.generate(ids, max_new_tokens=10, do_sample=False)
    for inference in (True, False, True, False):
        with torch.inference_mode(inference):
            output = target.generate(ids, assistant_model=draft, max_new_tokens=10, do_sample=False)
        assert torch.equal(output, reference)
        assert kept(draft).key.inference_mode == inference


def test_compiled_draft_drafts_like_the_eager_one_in_its_own_workspace():
    """`compile_draft=True` runs the draft block through torch.compile: the same proposals round by round
    (Inductor fuses the block's pointwise work; the few ulps it may change do not flip a draft token
    here), outputs equal plain generate, and the compiled graph lives in a workspace of its own."""
    from longspec_hf import LongSpecStats

    target = make_target("llama", seed=29)
    draft = make_draft(target, seed=30)
    ids = torch.randint(3, target.config.vocab_size, (1, 45))
    reference = target.generate(ids, max_new_tokens=30, do_sample=False)

    def run(**kwargs):
        stats = LongSpecStats()
        out = target.generate(
            ids, assistant_model=draft, tree_widths=DRAFTING_TREE, max_new_tokens=30, do_sample=False,
            longspec_stats=stats, **kwargs
        )
        return out, stats.accepted_lengths, kept(draft)

    eager_out, eager_accepted, eager_workspace = run()
    compiled_out, compiled_accepted, compiled_workspace = run(compile_draft=True)
    assert torch.equal(eager_out, reference) and torch.equal(compiled_out, reference)
    assert compiled_accepted == eager_accepted
    assert max(compiled_accepted) > 1
    assert compiled_workspace is not eager_workspace and compiled_workspace.key.compile_draft
    assert compiled_workspace.drafter._compiled_passes is not None

    # Another prompt length is another cache capacity: the compiled draft serves it without recompiling.
    from torch._dynamo.utils import counters

    compiled_frames = counters["frames"]["ok"]
    longer = torch.randint(3, target.config.vocab_size, (1, 400))
    output = target.generate(longer, assistant_model=draft, max_new_tokens=30, do_sample=False, compile_draft=True)
    assert torch.equal(output, target.generate(longer, max_new_tokens=30, do_sample=False))
    assert kept(draft) is not compiled_workspace
    assert counters["frames"]["ok"] == compiled_frames


def test_compiled_target_verifies_like_the_eager_one(monkeypatch):
    """`compile_target=True` runs the target's verify forwards through torch.compile: outputs
    equal plain generate (a padded batch, greedy), the same tokens accepted round by round as eagerly,
    sampling draws the same tokens for the same seed, and another prompt length compiles nothing new."""
    from torch._dynamo.utils import counters

    from longspec_hf import LongSpecStats
    from longspec_hf.generation.compiling import call_model

    rng = random.Random("compiled target")
    target = make_target("llama", seed=31)
    draft = make_draft(target, seed=32)
    ids, mask = random_batch(rng, target.config.vocab_size, 2, 40)
    kwargs = dict(attention_mask=mask, max_new_tokens=30, do_sample=False)
    reference = target.generate(ids, **kwargs)

    def run(**options):
        stats = LongSpecStats()
        out = target.generate(
            ids, assistant_model=draft, tree_widths=DRAFTING_TREE, longspec_stats=stats, **kwargs, **options
        )
        return out, stats.accepted_lengths

    eager_out, eager_accepted = run()
    compiled_out, compiled_accepted = run(compile_target=True)
    assert torch.equal(eager_out, reference) and torch.equal(compiled_out, reference)
    assert compiled_accepted == eager_accepted and max(compiled_accepted) > 1
    assert kept(draft).key.compile_target and kept(draft).verify.forward is not None
    assert kept(draft).verify.acceptance is not None  # the greedy acceptance compiles with the forward
    # The prefill runs eagerly (tracing the forward again for it would double the first call's compile).
    from longspec_hf.generation import decoding

    eager_lengths = []
    monkeypatch.setattr(
        decoding, "call_model", lambda model, **inputs: eager_lengths.append(inputs["input_ids"].shape[1]) or call_model(model, **inputs)
    )
    assert torch.equal(run(compile_target=True)[0], reference)
    monkeypatch.undo()
    assert eager_lengths == [ids.shape[1]]

    # The cache capacity is a dynamic dimension of the compiled verify: new prompt lengths, padded or not,
    # compile nothing.
    for length in (300, 170):
        compiled_frames = counters["frames"]["ok"]
        longer = torch.randint(3, target.config.vocab_size, (2, length))
        longer_mask = torch.ones_like(longer)
        longer_mask[1, : length // 3] = 0
        for mask_or_none in (None, longer_mask):
            kwargs = dict(attention_mask=mask_or_none, max_new_tokens=20, do_sample=False)
            output = target.generate(longer, assistant_model=draft, compile_target=True, **kwargs)
            assert torch.equal(output, target.generate(longer, **kwargs))
    assert counters["frames"]["ok"] == compiled_frames

    sampled = []
    for options in ({}, {"compile_target": True}):
        torch.manual_seed(7)
        sampled.append(target.generate(ids, assistant_model=draft, attention_mask=mask, max_new_tokens=20,
                                       do_sample=True, **options))
    assert torch.equal(sampled[0], sampled[1])


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
def test_compiled_target_of_every_supported_architecture(arch):
    """The compiled verify forward traces each supported architecture's modeling code (Qwen3's q/k norms,
    biases, Mistral's windowless attention) and keeps outputs equal to plain generate."""
    rng = random.Random(f"compiled {arch}")
    target = make_target(arch, seed=3)
    draft = make_draft(target, seed=4)
    ids, mask = random_batch(rng, target.config.vocab_size, 2, 30)
    kwargs = dict(attention_mask=mask, max_new_tokens=20, do_sample=False)
    reference = target.generate(ids, **kwargs)
    output = target.generate(ids, assistant_model=draft, compile_target=True, prompt_lookup_branches=1, **kwargs)
    assert torch.equal(output, reference)
    assert kept(draft).verify.forward is not None


def test_compiled_draft_compiles_every_level_of_a_deep_tree():
    """A compiled draft specialises its level step once per level (and tree shape); a tree deeper than
    dynamo's default limit of specialisations (8) still compiles every level instead of running the
    deepest ones eagerly, also after other trees were compiled in the same process."""
    from torch._dynamo.utils import counters

    target = make_target("llama", seed=31)
    draft = make_draft(target, seed=32)
    ids = torch.randint(3, target.config.vocab_size, (1, 40))
    frames = dict(counters["frames"])
    output = target.generate(
        ids, assistant_model=draft, tree_widths=[1] * 11, compile_draft=True, max_new_tokens=24, do_sample=False
    )
    assert torch.equal(output, target.generate(ids, max_new_tokens=24, do_sample=False))
    compiled = counters["frames"]["ok"] - frames.get("ok", 0)
    attempted = counters["frames"]["total"] - frames.get("total", 0)
    assert compiled == attempted >= 10  # ten levels (and the root step, unless this shape was compiled before)
    assert torch._dynamo.config.recompile_limit == 8  # the global setting is left alone


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_graphed_steps_read_nothing_on_the_host(arch, monkeypatch):
    """Everything a CUDA graph captures (the greedy draft's tree proposal with a fixed number of new
    tokens; the verify forward with lookup chains, a chain under the draft's leaf and greedy acceptance)
    runs on meta tensors, which have no values: so none of it waits for a device value on the host, which
    a capture refuses. The torch reference attention reads the longest row's length on the host to skip
    unused slots; under compilation it takes the whole cache instead, as the Triton kernels do: that is
    the mode used here."""
    from longspec_hf.generation.attention import longspec_attention
    from longspec_hf.generation.tree import ChainLayout
    from longspec_hf.generation.options import LongSpecOptions
    from longspec_hf.generation.workspace import claim_workspace

    target = make_target(arch, seed=41)
    draft = make_draft(target, seed=42)
    target.to("meta")
    draft.to("meta")
    draft.attach_target(target)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    meta = torch.device("meta")
    widths, chains, length = [4, 16, 16], 2, 6
    ids = torch.empty(2, 30, dtype=torch.long, device=meta)
    options = LongSpecOptions(
        tree_widths=tuple(widths), prompt_lookup_branches=chains, prompt_lookup_length=length,
        prompt_lookup_under_draft=True, cuda_graphs=False,
    )
    assert options.max_tree_nodes == 1 + sum(widths) + (chains + 1) * length
    with claim_workspace(target, draft, ids, options, 20, accept_in_graph=True, do_sample=False) as workspace:
        pass
    workspace.start(ids, torch.empty(2, dtype=torch.long, device=meta), pad_token_id=0)
    tree = workspace.drafter.propose_tree(workspace.tokens, workspace.seq_len, workspace.pad_start, new_tokens_bound=4)
    assert tree.level_sizes == widths
    layout = ChainLayout.build(widths, chains, length, meta, leaf_length=length)
    for chain_tokens, chain_layout in ((None, None), (torch.empty(2, chains, length, dtype=torch.long, device=meta), layout)):
        nodes = tree.num_nodes if chain_layout is None else chain_layout.num_nodes
        workspace.cache.begin_tree(nodes)
        with longspec_attention(target):
            verified, logits, acceptance = workspace.verify(tree, chain_tokens, chain_layout)
        assert logits.shape[:2] == (2, nodes) and acceptance.new_tokens.shape == (2, 1 + verified.max_depth)


def test_drafting_the_next_tree_before_the_host_reads_the_round_changes_no_proposal():
    """The graph-ready loop launches the next draft before the host has read the round's results (the
    draft reads only device state); the plain loop drafts after. Both must propose the same trees, so the
    same tokens are accepted round by round, for a padded batch and for a tree whose path is as long as
    the ring feed allows."""
    from longspec_hf import LongSpecStats

    rng = random.Random("draft ahead")
    target = make_target("llama", seed=29)
    draft = make_draft(target, seed=30)
    ids, mask = random_batch(rng, target.config.vocab_size, 2, 33)
    for widths in ([2, 2, 2], [1] * 6):
        kwargs = dict(attention_mask=mask, max_new_tokens=40, do_sample=False, tree_widths=widths)
        reference = target.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
        accepted = []
        for graphs in (True, False):
            stats = LongSpecStats()
            out = target.generate(ids, assistant_model=draft, cuda_graphs=graphs, longspec_stats=stats, **kwargs)
            assert torch.equal(out, reference)
            accepted.append(stats.accepted_lengths)
        assert accepted[0] == accepted[1] and max(accepted[0]) > 1, widths


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_replaced_or_released_workspace_is_freed_without_the_garbage_collector(compiled):
    """No reference cycle holds a workspace: with the collector off, the cache of a workspace that a call
    of another shape replaced (or that release_workspace dropped) is gone at once. Compiled: neither the
    compiled draft steps nor what dynamo's tracing of the target's forward keeps of its inputs."""
    import gc
    import weakref

    from longspec_hf import release_workspace

    target = make_target("llama", seed=25)
    draft = make_draft(target, seed=26)
    ids = torch.randint(3, target.config.vocab_size, (1, 20))
    collecting = gc.isenabled()
    gc.disable()
    try:
        options = dict(compile_draft=True, compile_target=True) if compiled else {}
        target.generate(ids, assistant_model=draft, max_new_tokens=8, do_sample=False, tree_widths=[2, 2], **options)
        first = weakref.ref(kept(draft).cache.kv)
        target.generate(ids, assistant_model=draft, max_new_tokens=8, do_sample=False, tree_widths=[3], **options)
        assert first() is None, "the replaced workspace's K/V is still alive"
        second = weakref.ref(kept(draft).cache.kv)
        release_workspace(draft)
        assert second() is None, "the released workspace's K/V is still alive"
    finally:
        if collecting:
            gc.enable()


def test_the_kept_workspace_does_not_keep_its_target_alive():
    """The draft keeps buffers between calls, but not the target: once the user drops the target, it is
    deleted, and the buffers kept for it (its cache) go with it."""
    import gc
    import weakref

    target = make_target("llama", seed=27)
    draft = make_draft(target, seed=28)
    ids = torch.randint(3, target.config.vocab_size, (1, 20))
    target.generate(ids, assistant_model=draft, max_new_tokens=8, do_sample=False)
    assert kept(draft) is not None
    target_ref, cache_ref = weakref.ref(target), weakref.ref(kept(draft).cache.kv)
    del target
    gc.collect()
    assert target_ref() is None, "the kept workspace keeps the target alive"
    assert kept(draft) is None and cache_ref() is None

"""Several threads calling generate() at once: every output equals plain generate (greedy, fp32).

transformers' own `generate` can be called from several threads on one model; a LongSpec call must be
just as safe. Each thread runs several calls of different prompt lengths, batch sizes and trees, with
the kept workspace and the attention installation shared between them.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch

from .conftest import make_draft, make_target

THREADS = 10
CALLS_PER_THREAD = 3


def _prompts(seed: int, vocab_size: int) -> list[tuple[torch.Tensor, torch.Tensor, int, list[int]]]:
    rng = random.Random(seed)
    calls = []
    for _ in range(CALLS_PER_THREAD):
        batch, length = rng.choice([1, 1, 2]), rng.randrange(3, 30)
        ids = torch.tensor([[rng.randrange(3, vocab_size) for _ in range(length)] for _ in range(batch)])
        mask = torch.ones_like(ids)
        if batch > 1:
            pad = rng.randrange(0, length - 1)
            ids[1, :pad], mask[1, :pad] = 0, 0
        calls.append((ids, mask, rng.choice([5, 17, 33]), rng.choice([[2, 3], [4, 16, 16, 16, 16], [1, 1, 1]])))
    return calls


def _run_threads(jobs) -> list:
    """Run `jobs` (callables) in threads started together; re-raise the first error."""
    barrier = threading.Barrier(len(jobs))
    results: list = [None] * len(jobs)
    errors: list[BaseException] = []

    def run(index, job):
        barrier.wait()
        try:
            results[index] = job()
        except BaseException as error:  # noqa: BLE001  (reported below)
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def _check(pairs: list) -> None:
    """`pairs[i]` = (target, draft) of thread i; every call of every thread must equal plain generate."""
    work = [_prompts(seed=i, vocab_size=target.config.vocab_size) for i, (target, _) in enumerate(pairs)]
    expected = [
        [target.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False) for ids, mask, n, _ in calls]
        for (target, _), calls in zip(pairs, work)
    ]

    def job(target, draft, calls):
        return lambda: [
            target.generate(
                ids, attention_mask=mask, max_new_tokens=n, do_sample=False, assistant_model=draft, tree_widths=widths
            )
            for ids, mask, n, widths in calls
        ]

    outputs = _run_threads([job(target, draft, calls) for (target, draft), calls in zip(pairs, work)])
    for thread, (want, got) in enumerate(zip(expected, outputs)):
        for call, (a, b) in enumerate(zip(want, got)):
            assert torch.equal(a, b), f"thread {thread} call {call}: {a.tolist()} != {b.tolist()}"


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_threads_on_one_target_with_one_draft(cuda_graphs):
    target = make_target("llama", seed=11)
    draft = make_draft(target, seed=12)
    pairs = [(target, draft)] * THREADS
    if not cuda_graphs:
        # The same check through the plain loop: threads share the target and the attention setting only.
        original = target.generate

        def generate(*args, **kwargs):
            if "assistant_model" in kwargs:
                kwargs["cuda_graphs"] = False
            return original(*args, **kwargs)

        target.generate = generate
    _check(pairs)


def test_threads_on_one_target_with_two_drafts():
    target = make_target("qwen2", seed=13)
    drafts = [make_draft(target, seed=14), make_draft(target, seed=15, sliding_window=8)]
    _check([(target, drafts[i % 2]) for i in range(THREADS)])


def test_threads_on_two_targets_sharing_one_draft():
    targets = [make_target("llama", seed=16), make_target("llama", seed=17)]
    draft = make_draft(targets[0], seed=18)
    _check([(targets[i % 2], draft) for i in range(THREADS)])


def test_the_attention_setting_is_the_users_again_after_threads():
    target = make_target("llama", seed=19)
    draft = make_draft(target, seed=20)
    before = target.config._attn_implementation
    _check([(target, draft)] * 4)
    assert target.config._attn_implementation == before


@pytest.mark.gpu
def test_threads_on_one_cuda_target_with_graphs():
    """The same on a CUDA target in fp32: CUDA graphs captured and replayed while other threads decode."""
    target = make_target("llama", seed=21).cuda()
    draft = make_draft(target, seed=22).cuda()

    def on_cuda(target, draft):
        original = target.generate

        def generate(ids, attention_mask=None, **kwargs):
            return original(ids.cuda(), attention_mask=attention_mask.cuda(), **kwargs).cpu()

        return generate

    wrapped = on_cuda(target, draft)
    target.generate = wrapped
    _check([(target, draft)] * THREADS)

"""Tensor-parallel targets (transformers' `tp_plan`) on two CPU processes (gloo): LongSpec decodes the same
tokens as plain greedy generate, on every process, and what it cannot serve is refused before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from longspec_hf.generation._compat import cache_output_field

from .conftest import make_draft, make_target

NEW_TOKENS = 24
# (architecture, how the processes load it): both the DistributedConfig form and the older tp_plan="auto".
TARGETS = {"llama": "distributed_config", "qwen3": "tp_plan"}


def _prompts() -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """A prompt longer than the draft's window and the prefill chunks below, and a left-padded batch of two."""
    generator = torch.Generator().manual_seed(5)
    single = torch.randint(3, 96, (1, 21), generator=generator)
    batch = torch.randint(3, 96, (2, 19), generator=generator)
    mask = torch.ones_like(batch)
    batch[0, :6], mask[0, :6] = 0, 0
    return {"single": (single, None), "padded": (batch, mask)}


def _plain(target, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return target.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)


def _load(folder: str, how: str):
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    kwargs = dict(tp_plan="auto") if how == "tp_plan" else dict(distributed_config=DistributedConfig(tp_size=2))
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


def _same_on_every_process(tensor: torch.Tensor) -> bool:
    gathered = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, tensor.contiguous())
    return all(torch.equal(other, gathered[0]) for other in gathered)


def _decode_on_this_process(folder: str) -> None:
    """One process's share: every case of every target, checked here; a result file when all passed."""
    import pytest
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from longspec_hf import LongSpecStats
    from longspec_hf.generation.placement import head_sharding

    torch.set_num_threads(1)  # two processes on a two-core machine
    references = torch.load(os.path.join(folder, "references.pt"))
    passed, longest = [], 1
    for arch, how in TARGETS.items():
        target = _load(os.path.join(folder, arch), how)  # the first load starts the process group
        rank = torch.distributed.get_rank()
        weight = target.model.layers[0].self_attn.k_proj.weight
        assert isinstance(weight, DTensor) and weight.to_local().shape[0] * 2 == weight.shape[0]
        sharding = head_sharding(target)
        assert sharding is not None and (sharding.local_heads, sharding.num_heads) == (1, 2)
        draft = make_draft(target)  # seeded: the same draft on both processes
        for name, (ids, mask) in _prompts().items():
            reference = references[arch][name]
            plain = _plain(target, ids, mask)
            assert torch.equal(plain, reference), (arch, name, "plain generate under tensor parallelism")
            cases = {
                "tree": dict(tree_widths=[2, 2]),
                "chunked-prefill": dict(tree_widths=[2, 2], prefill_chunk_size=8),
                "automatic-tree": dict(),
                "adaptive": dict(tree_widths=[2, 2], adaptive=True),
                "lookup": dict(tree_widths=[2], prompt_lookup_branches=2),
            }
            for case, keywords in cases.items():
                stats = LongSpecStats()
                out = target.generate(
                    ids, attention_mask=mask, assistant_model=draft, max_new_tokens=NEW_TOKENS, do_sample=False,
                    longspec_stats=stats, **keywords,
                )
                assert torch.equal(out, plain), (arch, name, case, out.tolist(), plain.tolist())
                assert _same_on_every_process(out), (arch, name, case)
                assert stats.rounds > 0 and min(stats.accepted_lengths) >= 1, (arch, name, case)
                longest = max(longest, *stats.accepted_lengths)
                passed.append(f"{arch}/{name}/{case}")
                if (name, case) == ("single", "lookup"):
                    # The draft reads every head of the last layer, gathered in head order: as one process has them.
                    target_kv = draft._longspec_workspace.cache.target_kv()
                    key, value = references[arch]["last_layer"]
                    length = key.shape[2]
                    assert target_kv.key.shape[1] == 2 and int(target_kv.end[0]) >= length
                    torch.testing.assert_close(target_kv.key[:, :, :length], key, rtol=1e-4, atol=1e-5)
                    torch.testing.assert_close(target_kv.value[:, :, :length], value, rtol=1e-4, atol=1e-5)
        ids, mask = _prompts()["single"]
        # A draft vocabulary takes rows of the sharded LM head, gathered whole.
        draft.set_draft_vocabulary(torch.arange(3, 80))
        out = target.generate(ids, assistant_model=draft, tree_widths=[2, 2], max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(out, references[arch]["single"]), (arch, "draft vocabulary")
        draft.set_draft_vocabulary(None)
        passed.append(f"{arch}/draft-vocabulary")
        # Sampling: processes seeded alike draw the same tokens, round after round (as plain sampling under
        # tensor parallelism needs).
        torch.manual_seed(3)
        sampled = target.generate(
            ids, assistant_model=draft, tree_widths=[2, 2], max_new_tokens=NEW_TOKENS, do_sample=True, top_k=20
        )
        assert sampled.shape[1] > ids.shape[1] and _same_on_every_process(sampled), (arch, "sampling")
        passed.append(f"{arch}/sampling-in-step")
        # The returned cache holds this process's heads, as plain generate's does.
        out = target.generate(
            ids, assistant_model=draft, tree_widths=[2, 2], max_new_tokens=NEW_TOKENS, do_sample=False,
            return_dict_in_generate=True,
        )
        plain = target.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
        field = cache_output_field()
        for ours, theirs in zip(getattr(out, field).layers, getattr(plain, field).layers):
            assert ours.keys.shape == theirs.keys.shape and ours.keys.shape[1] == 1
            torch.testing.assert_close(ours.keys, theirs.keys, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ours.values, theirs.values, rtol=1e-4, atol=1e-5)
        passed.append(f"{arch}/returned-cache")
        # Compiling is refused before the first forward.
        forwards = []
        hook = target.register_forward_hook(lambda *args: forwards.append(1))
        for keyword in ("compile_target", "compile_draft"):
            with pytest.raises(ValueError, match="not supported for a tensor-parallel target"):
                target.generate(ids, assistant_model=draft, max_new_tokens=4, do_sample=False, **{keyword: True})
        # So is a K/V projection split otherwise than by heads.
        projection = target.model.layers[-1].self_attn.k_proj
        projection.weight = torch.nn.Parameter(distribute_tensor(weight.detach().full_tensor(), weight.device_mesh, [Shard(1)]))
        with pytest.raises(ValueError, match=r"split by heads \(Shard\(0\)"):
            target.generate(ids, assistant_model=draft, max_new_tokens=4, do_sample=False)
        hook.remove()
        assert forwards == []
        passed.append(f"{arch}/compile-and-other-splits-refused")
    with open(os.path.join(folder, f"result_rank{rank}.json"), "w") as handle:
        json.dump({"passed": passed, "longest_accepted": longest}, handle)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_tensor_parallel_targets_match_plain_greedy_generate(tmp_path):
    references = {}
    for seed, arch in enumerate(TARGETS):
        target = make_target(arch, seed=11 + seed)
        target.save_pretrained(tmp_path / arch)
        references[arch] = {name: _plain(target, ids, mask) for name, (ids, mask) in _prompts().items()}
        ids, _ = _prompts()["single"]
        last = target.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
        last_layer = getattr(last, cache_output_field()).layers[-1]
        references[arch]["last_layer"] = (last_layer.keys, last_layer.values)
    torch.save(references, tmp_path / "references.pt")
    # A fresh interpreter launches the processes: forking this pytest process, whose earlier tests started
    # thread pools, can deadlock them.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "tests.test_tensor_parallel", str(tmp_path),
    ]
    subprocess.run(command, cwd=root, check=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    results = [json.loads((tmp_path / f"result_rank{rank}.json").read_text()) for rank in range(2)]
    assert results[0] == results[1]
    assert len(results[0]["passed"]) == len(TARGETS) * (2 * 5 + 4)
    # Some round committed a path of several tokens (through the lookup chains), so compaction moved them.
    assert results[0]["longest_accepted"] > 1


if __name__ == "__main__":
    _decode_on_this_process(sys.argv[1])

"""LongSpec decoding: target cache, tree attention hook, tree drafting and verification, the loop."""

from .attention import LongSpecAttentionInputs, longspec_attention
from .cache import LongSpecCache
from .candidate_generator import LongSpecCandidateGenerator, target_kv_from_cache
from .decoding import LongSpecStats, longspec_decode
from .tree import DraftTree, accept_greedy
from .workspace import release_workspace

__all__ = [
    "DraftTree",
    "LongSpecAttentionInputs",
    "LongSpecCache",
    "LongSpecCandidateGenerator",
    "LongSpecStats",
    "accept_greedy",
    "longspec_attention",
    "longspec_decode",
    "release_workspace",
    "target_kv_from_cache",
]

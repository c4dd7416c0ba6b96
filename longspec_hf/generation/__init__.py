"""LongSpec decoding: target cache, tree attention, tree drafting and verification, the loop."""

from .attention import LongSpecAttentionInputs, longspec_attention
from .cache import LongSpecCache
from .candidate_generator import LongSpecCandidateGenerator, target_kv_from_cache
from .decoding import DecodingSession, decode
from .entry import generate
from .options import LongSpecOptions
from .running_prior import forget_acceptance
from .stats import LongSpecStats
from .tree import DraftTree, accept_greedy
from .workspace import release_workspace

__all__ = [
    "DecodingSession",
    "DraftTree",
    "LongSpecAttentionInputs",
    "LongSpecCache",
    "LongSpecCandidateGenerator",
    "LongSpecOptions",
    "LongSpecStats",
    "forget_acceptance",
    "accept_greedy",
    "decode",
    "generate",
    "longspec_attention",
    "release_workspace",
    "target_kv_from_cache",
]

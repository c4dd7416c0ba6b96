"""Attention and cache kernels. Each Triton kernel sits beside the pure-torch reference in `reference.py`.

This subpackage imports neither `generation` nor `modeling`.
"""

from .reference import attention_with_lse, compact_kv, merge_attention, prefix_tree_attention, prefix_visibility

__all__ = ["attention_with_lse", "compact_kv", "merge_attention", "prefix_tree_attention", "prefix_visibility"]

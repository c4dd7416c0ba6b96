"""The LongSpec draft model and its configuration. Never imports `generation` or `training`."""

from .cache_keyword import cache_keyword, output_cache
from .configuration_longspec import (
    DEFAULT_TREE_WIDTHS,
    SUPPORTED_TARGET_TYPES,
    LongSpecDraftConfig,
    check_supported_target,
)
from .modeling_longspec import DraftCache, LongSpecDraftModel, TargetKV, TargetParts, is_longspec_draft, local_tensor

__all__ = [
    "DEFAULT_TREE_WIDTHS",
    "SUPPORTED_TARGET_TYPES",
    "DraftCache",
    "LongSpecDraftConfig",
    "LongSpecDraftModel",
    "TargetKV",
    "TargetParts",
    "cache_keyword",
    "check_supported_target",
    "is_longspec_draft",
    "local_tensor",
    "output_cache",
]

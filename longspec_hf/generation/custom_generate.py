"""LongSpec decoding as the `custom_generate/generate.py` of a folder or Hub repository.

`target.generate(**inputs, custom_generate="org/repo", trust_remote_code=True, assistant_model=draft)`
loads `custom_generate/generate.py` of that folder or repository and calls its `generate` with
`generate`'s own arguments as the caller passed them (`model` in place of `self`), before any preparation.
[`generate`] hands them back to transformers' `generate` with the LongSpec method as its
`custom_generate=` callable ([`entry.route_generate`]), so the generation config, logits processors and
stopping criteria are prepared as for any other call.

`longspec export-generate DIR` (`longspec_hf.export.write_custom_generate`) writes this module as
`DIR/custom_generate/generate.py`, beside flat copies of the package modules it needs, for processes
where longspec-hf is not installed. There the draft is usually a copy of [`LongSpecDraftModel`] loaded
with `trust_remote_code=True`: it is recognised by its config's model_type, not by its class.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from ..modeling import LongSpecDraftConfig, is_longspec_draft
from .entry import route_generate


def generate(model: PreTrainedModel, *args, assistant_model=None, **kwargs):
    """`model.generate(*args, assistant_model=assistant_model, **kwargs)` decoded with LongSpec.

    Returns what `model.generate` returns without a draft (the same tokens when greedy, the same
    distribution when sampling). `assistant_model` must be a LongSpec draft (config model_type
    `"longspec_draft"`); the LongSpec keywords of `longspec_hf.generate` (`tree_widths`,
    `prompt_lookup_branches`, ...) are accepted as keywords.
    """
    if not is_longspec_draft(assistant_model):
        raise ValueError(
            "This custom_generate decodes with a LongSpec draft: pass assistant_model=<a LongSpec draft>, e.g. "
            "AutoModel.from_pretrained(draft_repo, trust_remote_code=True) (a model whose config has model_type "
            f"'{LongSpecDraftConfig.model_type}'); got {type(assistant_model).__name__}."
        )
    return route_generate(model, *args, assistant_model=assistant_model, **kwargs)

"""longspec-hf: lossless long-context speculative decoding (LongSpec) for Hugging Face Transformers.

Importing the package registers `LongSpecDraftConfig`/`LongSpecDraftModel` with `AutoConfig`/`AutoModel`
and routes `generate(..., assistant_model=<LongSpecDraftModel>)` to LongSpec tree decoding. `generate` is
also transformers' `custom_generate=` form of it.
"""

from transformers import AutoConfig, AutoModel

from .generation import LongSpecCandidateGenerator, LongSpecOptions, LongSpecStats, forget_acceptance, generate, release_workspace
from .generation.entry import install as _install_generate_route
from .modeling import LongSpecDraftConfig, LongSpecDraftModel

__version__ = "0.1.0"

AutoConfig.register(LongSpecDraftConfig.model_type, LongSpecDraftConfig, exist_ok=True)
AutoModel.register(LongSpecDraftConfig, LongSpecDraftModel, exist_ok=True)
_install_generate_route()

__all__ = [
    "LongSpecCandidateGenerator",
    "LongSpecDraftConfig",
    "LongSpecDraftModel",
    "LongSpecOptions",
    "LongSpecStats",
    "__version__",
    "forget_acceptance",
    "generate",
    "release_workspace",
]

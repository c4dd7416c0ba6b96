"""longspec-hf: lossless long-context speculative decoding (LongSpec) for Hugging Face Transformers.

Importing the package registers `LongSpecDraftConfig`/`LongSpecDraftModel` with `AutoConfig`/`AutoModel`
and routes `generate(..., assistant_model=<LongSpecDraftModel>)` to LongSpec tree decoding.
"""

from transformers import AutoConfig, AutoModel

from .generation import LongSpecCandidateGenerator, LongSpecStats, release_workspace
from .generation.hook import install as _install_generate_hook
from .modeling import LongSpecDraftConfig, LongSpecDraftModel

__version__ = "0.1.0"

AutoConfig.register(LongSpecDraftConfig.model_type, LongSpecDraftConfig, exist_ok=True)
AutoModel.register(LongSpecDraftConfig, LongSpecDraftModel, exist_ok=True)
_install_generate_hook()

__all__ = [
    "LongSpecCandidateGenerator",
    "LongSpecDraftConfig",
    "LongSpecDraftModel",
    "LongSpecStats",
    "__version__",
    "release_workspace",
]

"""Configuration of the LongSpec draft block."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

SUPPORTED_TARGET_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Nodes per level of the draft's tree when neither the call nor a generation config says otherwise
# (69 nodes with the root; the paper's default).
DEFAULT_TREE_WIDTHS = (4, 16, 16, 16, 16)


class LongSpecDraftConfig(PretrainedConfig):
    """Configuration of [`LongSpecDraftModel`]: one transformer block that drafts for a given target model.

    The block has its own sliding-window self-attention (`num_attention_heads` query heads and
    `num_key_value_heads` K/V heads of size `head_dim`), a cross-attention whose keys and values are the
    target's last-layer KV cache (so its query heads are grouped over `target_num_key_value_heads`),
    and a SwiGLU MLP. Embedding, rotary embedding and LM head are the target's and are not stored.

    The `target_*` fields record what target the draft was made for; `generate` refuses a target that
    does not match them.

    Args:
        hidden_size: width of the residual stream; equals the target's hidden size.
        intermediate_size: width of the MLP.
        num_attention_heads: query heads of both attentions.
        num_key_value_heads: K/V heads of the draft's self-attention.
        head_dim: size of one head; equals the target's head dim (cross-attention reads its cache).
        sliding_window: how many of the draft's own most recent tokens its self-attention sees (the
            size of its ring cache).
        attention_bias: whether q/k/v projections have biases (the published checkpoints do).
        rms_norm_eps: epsilon of the RMS norms.
        hidden_act: activation of the gated MLP.
        target_vocab_size, target_hidden_size, target_num_attention_heads, target_num_key_value_heads,
        target_head_dim, target_max_position_embeddings, target_rope_parameters, target_model_type,
        target_name_or_path: the target this draft was made for.
        tree_widths: default number of nodes per tree level.
        draft_vocab_size: when set, the draft scores only this many of the target's tokens (the
            model's `draft_vocab_ids`, e.g. the most frequent ones): a smaller slice of the LM head to read
            and to rank per tree level. Verification is unchanged, so outputs (greedy) and their
            distribution (sampling, where q is zero on the other tokens) are too. See
            [`LongSpecDraftModel.set_draft_vocabulary`].
    """

    model_type = "longspec_draft"

    def __init__(
        self,
        hidden_size: int = 576,
        intermediate_size: int = 1536,
        num_attention_heads: int = 9,
        num_key_value_heads: int = 3,
        head_dim: int | None = None,
        sliding_window: int = 512,
        attention_bias: bool = True,
        rms_norm_eps: float = 1e-5,
        hidden_act: str = "silu",
        initializer_range: float = 0.02,
        target_vocab_size: int | None = None,
        target_hidden_size: int | None = None,
        target_num_attention_heads: int | None = None,
        target_num_key_value_heads: int | None = None,
        target_head_dim: int | None = None,
        target_max_position_embeddings: int | None = None,
        target_rope_parameters: dict[str, Any] | None = None,
        target_model_type: str | None = None,
        target_name_or_path: str | None = None,
        tree_widths: list[int] | None = None,
        draft_vocab_size: int | None = None,
        **kwargs: Any,
    ):
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.sliding_window = sliding_window
        self.attention_bias = attention_bias
        self.rms_norm_eps = rms_norm_eps
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.target_vocab_size = target_vocab_size
        self.target_hidden_size = target_hidden_size if target_hidden_size is not None else hidden_size
        self.target_num_attention_heads = target_num_attention_heads
        self.target_num_key_value_heads = (
            target_num_key_value_heads if target_num_key_value_heads is not None else num_key_value_heads
        )
        self.target_head_dim = target_head_dim if target_head_dim is not None else self.head_dim
        self.target_max_position_embeddings = target_max_position_embeddings
        self.target_rope_parameters = target_rope_parameters
        self.target_model_type = target_model_type
        self.target_name_or_path = target_name_or_path
        self.tree_widths = list(tree_widths) if tree_widths is not None else list(DEFAULT_TREE_WIDTHS)
        # The draft proposes only these many tokens (the model's `draft_vocab_ids`); None: all.
        self.draft_vocab_size = draft_vocab_size
        # The draft predicts tokens of the target's vocabulary (transformers compares assistants by this).
        self.vocab_size = target_vocab_size
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @classmethod
    def from_target_config(cls, target_config: PretrainedConfig, **overrides: Any) -> "LongSpecDraftConfig":
        """A fresh draft configuration matched to `target_config` (a Llama, Mistral, Qwen2 or Qwen3 config).

        The block copies the target's width, head layout, MLP width and norm epsilon; any field can be
        overridden, e.g. `sliding_window=1024`.
        """
        text_config = target_config.get_text_config()
        check_supported_target(text_config)
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        num_kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
        fields: dict[str, Any] = dict(
            hidden_size=text_config.hidden_size,
            intermediate_size=text_config.intermediate_size,
            num_attention_heads=text_config.num_attention_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=text_config.rms_norm_eps,
            hidden_act=getattr(text_config, "hidden_act", "silu"),
            target_vocab_size=text_config.vocab_size,
            target_hidden_size=text_config.hidden_size,
            target_num_attention_heads=text_config.num_attention_heads,
            target_num_key_value_heads=num_kv_heads,
            target_head_dim=head_dim,
            target_max_position_embeddings=text_config.max_position_embeddings,
            target_rope_parameters=_rope_parameters(text_config),
            target_model_type=text_config.model_type,
            target_name_or_path=getattr(target_config, "_name_or_path", None) or None,
        )
        fields.update(overrides)
        return cls(**fields)


def _rope_parameters(text_config: PretrainedConfig) -> dict[str, Any] | None:
    params = getattr(text_config, "rope_parameters", None)
    if params is None and getattr(text_config, "rope_theta", None) is not None:
        params = {"rope_type": "default", "rope_theta": text_config.rope_theta}
    return dict(params) if params is not None else None


def check_supported_target(text_config: PretrainedConfig) -> None:
    """Raise a ValueError naming the supported architectures if `text_config` is not one of them."""
    model_type = getattr(text_config, "model_type", None)
    if model_type not in SUPPORTED_TARGET_TYPES:
        raise ValueError(
            f"LongSpec drafts support targets of the architectures {', '.join(SUPPORTED_TARGET_TYPES)}; "
            f"got a target of model_type {model_type!r}. Use one of the supported architectures, or call "
            "generate() without assistant_model."
        )

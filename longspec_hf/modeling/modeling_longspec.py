"""The LongSpec draft: one transformer block on top of the target's embedding, rotary embedding and LM head.

For a token `x` at absolute position `t` the block computes

    h = embed(x)
    h = h + SelfAttn(norm1(h))    # causal, over the draft's own last `sliding_window` tokens
    h = h + CrossAttn(norm2(h))   # keys/values = the target's last-layer KV cache, committed slots only
    h = h + MLP(norm3(h))         # SwiGLU
    logits = lm_head(h)           # the target's head, no final norm (when drafting, optionally only
                                  # the rows of a draft vocabulary, `draft_vocab_ids`)

Because the self-attention key/value of a token depend only on the token and its position, the
draft's cache is a ring of `sliding_window` slots plus scratch slots for the tree being drafted: its
size does not depend on the context length. The cross-attention needs no cache of its own.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers.activations import ACT2FN

from .. import kernels
from ..kernels import attention_with_lse
from .configuration_longspec import LongSpecDraftConfig


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a parameter of a tensor-parallel model), else `tensor` itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a DTensor, gathered from every process of its mesh (a collective), else `tensor`."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else tensor


class TargetParts:
    """The modules the draft borrows from its target: token embedding, rotary embedding and LM head.

    Held by weak reference: a draft and the buffers decoding keeps for it never keep a dropped target
    (or its embeddings) alive; reading a part of a target that is gone raises a ReferenceError.

    `draft_head`: with a draft vocabulary, the LM head's rows (weight, and bias if any) for the draft's
    `draft_vocab_ids`, kept at one address (CUDA graphs of the draft read it) and refreshed in place by
    [`LongSpecDraftModel.refresh_draft_head`]; `draft_head_source` says what they were taken from.
    """

    def __init__(self, embed_tokens: nn.Module, rotary_emb: nn.Module, lm_head: nn.Module):
        self._modules = tuple(weakref.ref(module) for module in (embed_tokens, rotary_emb, lm_head))
        self.draft_head: tuple[torch.Tensor, ...] | None = None
        self.draft_head_source: tuple[int, ...] | None = None

    def _part(self, index: int) -> nn.Module:
        module = self._modules[index]()
        if module is None:
            raise ReferenceError("the target this draft was decoding for has been deleted")
        return module

    @property
    def embed_tokens(self) -> nn.Module:
        return self._part(0)

    @property
    def rotary_emb(self) -> nn.Module:
        return self._part(1)

    @property
    def lm_head(self) -> nn.Module:
        return self._part(2)

    def same_modules(self, other: "TargetParts") -> bool:
        return all(a() is b() for a, b in zip(self._modules, other._modules))


@dataclass
class TargetKV:
    """A view of the target's last-layer KV cache for the draft's cross-attention.

    `key`/`value` are `(B, Hkv, S, D)` (already rotated); row `b` may read slots `[start[b], end[b])`.
    """

    key: torch.Tensor
    value: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor


class DraftCache:
    """The draft's constant-size cache: a ring of the last `window` committed tokens and tree scratch.

    Attributes:
        key_slots, value_slots: `(B, Hkv, window + max_tree_nodes, D)`: the ring, then the tree scratch,
            so that a tree level attends to both without concatenating them.
        key_ring, value_ring: `(B, Hkv, window, D)` views; the token at position `p` lives in slot `p % window`.
        ring_positions: `(B, window)` absolute position held by each ring slot, `-1` when empty.
        key_tree, value_tree: `(B, Hkv, max_tree_nodes, D)` views, K/V of the nodes of the tree being drafted.
        seen_len: `(B,)` how many slots of the row's token buffer the ring has consumed.
    """

    def __init__(
        self,
        batch_size: int,
        config: LongSpecDraftConfig,
        max_tree_nodes: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.window = config.sliding_window
        # Zeros, not empty: attention kernels read masked slots too (with probability 0), so they must be finite.
        shape = (batch_size, config.num_key_value_heads, self.window + max_tree_nodes, config.head_dim)
        self.key_slots = torch.zeros(shape, device=device, dtype=dtype)
        self.value_slots = torch.zeros(shape, device=device, dtype=dtype)
        self.key_ring, self.key_tree = self.key_slots.split([self.window, max_tree_nodes], dim=2)
        self.value_ring, self.value_tree = self.value_slots.split([self.window, max_tree_nodes], dim=2)
        self.ring_positions = torch.full((batch_size, self.window), -1, device=device, dtype=torch.long)
        self.seen_len = torch.zeros(batch_size, device=device, dtype=torch.long)

    @property
    def max_tree_nodes(self) -> int:
        return self.key_tree.shape[2]

    def reset(self) -> None:
        """Forget every row's tokens (in place: the tensors keep their addresses)."""
        self.ring_positions.fill_(-1)
        self.seen_len.zero_()

    def nbytes(self) -> int:
        """Bytes held by the cache tensors (constant for a given batch size and tree budget)."""
        tensors = (self.key_slots, self.value_slots, self.ring_positions, self.seen_len)
        return sum(t.numel() * t.element_size() for t in tensors)


class LongSpecRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype == self.weight.dtype:
            # torch's rms_norm is one fused kernel on CUDA (it computes in float32 for half inputs);
            # a drafted tree runs the block six times per round, where launches dominate.
            return F.rms_norm(hidden_states, self.weight.shape, self.weight, self.eps)
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(hidden_states.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (half-split convention) of `x` `(B, H, T, D)` with `cos`/`sin` `(B, T, D)`."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class LongSpecSelfAttention(nn.Module):
    """Sliding-window self-attention over the draft's own tokens (ring cache + tree scratch)."""

    def __init__(self, config: LongSpecDraftConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def _heads(self, x: torch.Tensor, num_heads: int) -> torch.Tensor:
        return x.view(*x.shape[:2], num_heads, self.head_dim).transpose(1, 2)

    def key_value(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated keys and values `(B, Hkv, T, D)` of normed hidden states `(B, T, hidden)`."""
        key = rotate(self._heads(self.k_proj(hidden), self.num_kv_heads), cos, sin)
        return key, self._heads(self.v_proj(hidden), self.num_kv_heads)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        visible: torch.Tensor,
        differentiable: bool = True,
    ) -> torch.Tensor:
        """Queries from `hidden` `(B, Q, hidden)` over `key`/`value` `(B, Hkv, S, D)` where `visible` `(B, Q, S)`.

        Every query sees at least itself, so no row is empty. `differentiable=False` (inference on CUDA)
        takes the masked-attention kernel: one launch over a few hundred keys, against SDPA's mask path.
        """
        query = rotate(self._heads(self.q_proj(hidden), self.num_heads), cos, sin)
        if differentiable or not query.is_cuda:
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=visible[:, None], scale=self.scale, enable_gqa=True
            )
        else:
            out, _ = kernels.masked_attention(query, key, value, visible, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(*hidden.shape[:2], -1))


class LongSpecCrossAttention(nn.Module):
    """Attention from draft queries to the target's last-layer KV cache (no key/value projections).

    The published checkpoints also carry unused `k_proj`/`v_proj` weights here; they are dropped on load.
    """

    def __init__(self, config: LongSpecDraftConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, target_kv: TargetKV) -> torch.Tensor:
        """Every query of row `b` reads the target slots `[target_kv.start[b], target_kv.end[b])`."""
        batch, num_queries, _ = hidden.shape
        query = self.q_proj(hidden).view(batch, num_queries, self.num_heads, self.head_dim).transpose(1, 2)
        query = rotate(query, cos, sin)
        key, value = target_kv.key, target_kv.value
        if key.dtype != query.dtype:
            key, value = key.to(query.dtype), value.to(query.dtype)
        # At inference every row has committed slots, so no query sees an empty set. The lengths stay
        # on the device (no host sync), so a CUDA graph can replay this while the target cache grows.
        out, _ = kernels.prefix_attention(query, key, value, target_kv.start, target_kv.end, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(batch, num_queries, -1))


class LongSpecMLP(nn.Module):
    def __init__(self, config: LongSpecDraftConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def is_longspec_draft(model) -> bool:
    """Whether `model` is a LongSpec draft: a [`LongSpecDraftModel`] of this package or of a copy of its code
    loaded with `trust_remote_code=True` (another class of the same name), told apart by its config's
    model_type."""
    config = getattr(model, "config", None)
    return isinstance(model, PreTrainedModel) and getattr(config, "model_type", None) == LongSpecDraftConfig.model_type


class LongSpecPreTrainedModel(PreTrainedModel):
    config_class = LongSpecDraftConfig
    config: LongSpecDraftConfig
    base_model_prefix = "longspec"
    _no_split_modules = ["LongSpecDraftModel"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, LongSpecRMSNorm):
            nn.init.ones_(module.weight)


class LongSpecDraftModel(LongSpecPreTrainedModel):
    """One-block LongSpec draft over a target's embedding, rotary embedding and LM head.

    The inference entry points take the target's parts ([`target_parts_of`]) explicitly; [`forward`]
    (training) reads those of the target given to [`attach_target`].

    Two entry points serve inference, both of which read and write a [`DraftCache`]:

    - [`append_and_query_root`] consumes committed tokens into the ring and returns the logits at each
      row's last committed token (the root of the next tree).
    - [`query_tree_level`] writes one level of tree nodes into the tree scratch and returns their logits.

    [`forward`] runs the block over whole sequences (training), with an explicit cross-attention lag.
    """

    def __init__(self, config: LongSpecDraftConfig):
        super().__init__(config)
        self.input_layernorm = LongSpecRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LongSpecSelfAttention(config)
        self.post_self_attention_layernorm = LongSpecRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.cross_attn = LongSpecCrossAttention(config)
        self.post_cross_attention_layernorm = LongSpecRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LongSpecMLP(config)
        self._target: TargetParts | None = None
        # Token ids drafting scores (sorted), saved with the weights; None: the whole vocabulary.
        self.register_buffer("draft_vocab_ids", None)
        if config.draft_vocab_size is not None:
            self.register_buffer("draft_vocab_ids", torch.arange(config.draft_vocab_size))
        # The draft's decoding defaults (tree widths) travel in generation_config.json beside its weights.
        self.generation_config = GenerationConfig(tree_widths=list(config.tree_widths))
        self.post_init()

    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, remote_code: bool = False, **kwargs):
        """Save weights and config as transformers does, plus `generation_config.json` (tree widths).

        With `remote_code=True` the folder also gets the draft's code as self-contained files
        (`configuration_longspec.py`, `modeling_longspec.py` and the flat modules they import, written from
        the package's sources by `longspec_hf.export`) and config.json an `auto_map` naming them, so that
        `AutoModel.from_pretrained(folder, trust_remote_code=True)` loads the draft where longspec-hf is not
        installed.
        """
        if not remote_code:
            super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        else:
            from ..export import AUTO_MAP, write_remote_code

            if is_main_process:
                write_remote_code(save_directory)  # first: a source that cannot be exported writes nothing else
            had_auto_map, kept = hasattr(self.config, "auto_map"), getattr(self.config, "auto_map", None)
            self.config.auto_map = dict(AUTO_MAP)
            try:
                super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
            finally:
                if had_auto_map:
                    self.config.auto_map = kept
                else:
                    del self.config.auto_map
        if is_main_process:
            self.generation_config.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load as transformers does, then the draft's `generation_config.json` when there is one.

        Also accepts a checkpoint in the published LongSpec layout (the target's Llama/Qwen2 config beside
        the block's weights): it is converted on load, with a logged warning (pass `sliding_window=` to
        set the window, 512 by default). Raises a ValueError/OSError naming the problem for folders with
        missing or mis-shaped weights or a config of another model type.
        """
        from .conversion import HUB_KWARGS, OLD_LAYOUT_MODEL_TYPES, is_old_layout, load_old_layout

        hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        config = kwargs.get("config")
        if not isinstance(config, LongSpecDraftConfig):
            config_dict = cls._checkpoint_config_dict(pretrained_model_name_or_path, hub_kwargs)
            model_type = config_dict.get("model_type")
            if model_type is None:
                raise OSError(
                    f"{pretrained_model_name_or_path} has no usable config.json (missing, or without a model_type). "
                    "A LongSpec draft needs config.json (a LongSpecDraftConfig) beside its weights; re-download or re-save it."
                )
            if model_type != LongSpecDraftConfig.model_type:
                if is_old_layout(config_dict):
                    return load_old_layout(
                        pretrained_model_name_or_path,
                        model_class=cls,
                        sliding_window=kwargs.get("sliding_window"),
                        dtype=kwargs.get("dtype", kwargs.get("torch_dtype")),
                        **hub_kwargs,
                    )
                raise ValueError(
                    f"{pretrained_model_name_or_path} holds a config of model_type {model_type!r}, not a LongSpec draft "
                    f"('{LongSpecDraftConfig.model_type}') nor the published LongSpec layout "
                    f"({', '.join(OLD_LAYOUT_MODEL_TYPES)}). Pass the folder or repo of a LongSpec draft."
                )
        kwargs.pop("sliding_window", None)
        wants_info = kwargs.pop("output_loading_info", False)
        tolerate_mismatch = kwargs.setdefault("ignore_mismatched_sizes", False)
        kwargs["ignore_mismatched_sizes"] = True  # report mismatches below, with their shapes
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        except SafetensorError as error:
            raise OSError(
                f"The weights of the draft at {pretrained_model_name_or_path} cannot be read ({error}): the "
                "safetensors file is corrupt or incomplete. Re-download or re-save the draft."
            ) from error
        missing = sorted(info.get("missing_keys") or [])
        mismatched = [] if tolerate_mismatch else list(info.get("mismatched_keys") or [])
        if missing:
            raise ValueError(
                f"The checkpoint {pretrained_model_name_or_path} is incomplete: it lacks the draft weights "
                f"{', '.join(missing)}. Re-download or re-save the draft."
            )
        if mismatched:
            described = "; ".join(str(item) for item in mismatched)
            raise ValueError(
                f"The checkpoint {pretrained_model_name_or_path} has weights of the wrong shape for its config ({described}). "
                "Fix config.json or use the checkpoint it belongs to."
            )
        try:
            generation_kwargs = {k: v for k, v in hub_kwargs.items() if k in ("cache_dir", "revision", "token", "local_files_only", "subfolder")}
            model.generation_config = GenerationConfig.from_pretrained(pretrained_model_name_or_path, **generation_kwargs)
        except OSError:
            pass
        return (model, info) if wants_info else model

    @staticmethod
    def _checkpoint_config_dict(pretrained_model_name_or_path, hub_kwargs) -> dict:
        from transformers import PretrainedConfig

        try:
            config_dict, _ = PretrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub_kwargs)
        except OSError as error:
            raise OSError(
                f"Could not read config.json of {pretrained_model_name_or_path}: {error}. A LongSpec draft needs config.json "
                "beside its weights; check the path or repo id (and the Hub cache when offline)."
            ) from error
        return config_dict

    def push_to_hub(
        self,
        repo_id: str,
        *,
        metrics: dict | None = None,
        card_template: str | None = None,
        base_model: str | None = None,
        license: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str = "Upload LongSpec draft",
        revision: str | None = None,
        create_pr: bool = False,
        save_to: str | None = None,
        **_unused,
    ):
        """Upload the draft (weights, config, generation config, the training log beside the weights it was
        loaded from) and its model card to the Hub, with the code that runs it on transformers alone: the
        draft's classes for `trust_remote_code=True` and `custom_generate/` (see `longspec_hf.export`).

        The card comes from `card_template`, else `hub_configs/<repo name>/README.md` of the installed
        package, else a generic one, with `{{ name }}` placeholders filled from `metrics` (e.g.
        `mean_accepted_length`, `speedup`). Its `base_model` is `base_model`, else the target named in the
        draft's config; a ValueError asks for a Hub id when that is a local path. With `save_to` the files
        are written to that folder and nothing is uploaded (a dry run); the folder path is returned.
        Otherwise returns the commit info of the upload.
        """
        import tempfile

        from huggingface_hub import HfApi

        from .conversion import write_hub_folder

        def write(folder):
            return write_hub_folder(
                self, folder, repo_id, card_template=card_template, metrics=metrics, base_model=base_model, license=license
            )

        if save_to is not None:
            return write(save_to)
        with tempfile.TemporaryDirectory() as folder:
            write(folder)  # a card that cannot be written is refused before the repository is created
            api = HfApi(token=token if isinstance(token, str) else None)
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message,
                revision=revision,
                create_pr=create_pr,
                repo_type="model",
            )

    # ----- target parts ------------------------------------------------------------------------------
    def target_parts_of(self, target: PreTrainedModel) -> TargetParts:
        """`target`'s token embedding, rotary embedding and LM head as the draft reads them (by reference),
        with the draft vocabulary's head rows taken. Each decoding call holds its own: the draft itself
        keeps no per-target state, so calls on different targets can share one draft."""
        base = target.get_decoder() if hasattr(target, "get_decoder") else target.model
        parts = TargetParts(
            embed_tokens=target.get_input_embeddings(), rotary_emb=base.rotary_emb, lm_head=target.get_output_embeddings()
        )
        self.refresh_draft_head(parts)
        return parts

    def attach_target(self, target: PreTrainedModel) -> None:
        """Make `target`'s parts the default of the entry points that take no `target` (training's
        `forward`, direct calls). Decoding passes its own [`target_parts_of`] and never attaches."""
        parts = self.target_parts_of(target)
        kept = self._target
        if kept is not None and kept.same_modules(parts):
            self.refresh_draft_head(kept)  # the same target again: its head rows stay at their address
        else:
            self._target = parts

    def set_draft_vocabulary(self, token_ids: Sequence[int] | torch.Tensor | None) -> None:
        """Make drafting score only `token_ids` (None: the whole vocabulary again).

        Each tree level then multiplies by those rows of the target's LM head and ranks only them: with
        a 128k-token vocabulary most of a level's memory traffic is the head. Outputs do not change (the
        target verifies every proposal; when sampling, the draft's q is zero outside the set, which the
        verification rules allow for); acceptance drops only when the target's choice is outside the
        set, so take the tokens that are frequent in the text the draft will see. The ids are saved with
        the draft (`draft_vocab_ids`, config `draft_vocab_size`).
        """
        if token_ids is None:
            self.config.draft_vocab_size = None
            self.register_buffer("draft_vocab_ids", None)
        else:
            ids = torch.as_tensor(token_ids, dtype=torch.long).flatten().unique()  # sorted
            vocab_size = self.config.target_vocab_size
            if ids.numel() == 0 or int(ids[0]) < 0 or (vocab_size is not None and int(ids[-1]) >= vocab_size):
                raise ValueError(
                    f"A draft vocabulary needs at least one token id, all in [0, {vocab_size}) (the target's "
                    f"vocabulary); got {ids.numel()} ids" + (f" from {int(ids[0])} to {int(ids[-1])}" if ids.numel() else "")
                )
            self.config.draft_vocab_size = ids.numel()
            self.register_buffer("draft_vocab_ids", ids.to(self.device))
        if self._target is not None:
            self.refresh_draft_head(self._target)

    def refresh_draft_head(self, parts: TargetParts) -> None:
        """Take the LM head's rows for `draft_vocab_ids` into `parts.draft_head`.

        Kept between calls at one address, which CUDA graphs of the draft read: made anew only for
        another head or vocabulary, refreshed in place when the head's weights changed in place."""
        ids = self.draft_vocab_ids
        if ids is None:
            parts.draft_head = parts.draft_head_source = None
            return
        lm_head = parts.lm_head
        weight = getattr(lm_head, "weight", None)
        bias = getattr(lm_head, "bias", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(
                "This draft has a draft vocabulary (config draft_vocab_size), which needs a target whose output "
                f"embedding holds a 2-D weight; {type(lm_head).__name__} does not. Call "
                "draft.set_draft_vocabulary(None) to draft over the whole vocabulary."
            )
        if weight.device.type == "meta":
            raise ValueError(
                "The target's LM head is offloaded (its weight is loaded only for its own forwards), so this draft "
                "cannot take its rows for the draft vocabulary. Keep lm_head on a device in the device_map, or call "
                "draft.set_draft_vocabulary(None) to draft over the whole vocabulary."
            )
        # (A tensor-parallel head's weight is a DTensor: its local shard tells what changed.)
        source = (local_tensor(weight).data_ptr(), local_tensor(weight)._version, ids.data_ptr(), ids._version)
        source += (local_tensor(bias).data_ptr(), local_tensor(bias)._version) if bias is not None else ()
        if source == parts.draft_head_source:
            return
        if ids.dim() != 1 or not bool((ids[1:] > ids[:-1]).all()) or int(ids[0]) < 0 or int(ids[-1]) >= weight.shape[0]:
            raise ValueError(
                f"draft_vocab_ids must be increasing token ids below the target's vocabulary size {weight.shape[0]}; "
                "the checkpoint is corrupt or made for another target. Re-save it, or call "
                "draft.set_draft_vocabulary(None)."
            )
        rows = ids.to(weight.device)
        # On the draft's device: a target spread over devices may compute its head elsewhere. A head split
        # over processes (tensor parallelism) is gathered whole first, on every process alike.
        head = tuple(_whole(t.detach()).index_select(0, rows).to(self.device) for t in (weight, bias) if t is not None)
        kept = parts.draft_head
        if kept is not None and [(t.shape, t.dtype, t.device) for t in kept] == [(t.shape, t.dtype, t.device) for t in head]:
            for old, new in zip(kept, head):
                old.copy_(new)
        else:
            parts.draft_head = head
        parts.draft_head_source = source

    def _parts(self, target: TargetParts | None) -> TargetParts:
        if target is not None:
            return target
        if self._target is None:
            raise RuntimeError(
                "This LongSpecDraftModel has no target: pass it to target.generate(assistant_model=draft), pass "
                "target=draft.target_parts_of(target), or call draft.attach_target(target) first."
            )
        return self._target

    def new_cache(self, batch_size: int, max_tree_nodes: int) -> DraftCache:
        return DraftCache(batch_size, self.config, max_tree_nodes, self.device, self.dtype)

    # ----- pieces of the block -----------------------------------------------------------------------
    def _embed(self, input_ids: torch.Tensor, target: TargetParts) -> torch.Tensor:
        # (`.to` is free on one device; a target spread over devices returns its embedding's device.)
        return target.embed_tokens(input_ids).to(device=self.device, dtype=self.dtype)

    def _rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor, target: TargetParts) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = target.rotary_emb(hidden, position_ids=position_ids.clamp(min=0))
        return cos.to(hidden.device), sin.to(hidden.device)

    def _logits(self, hidden: torch.Tensor, target: TargetParts | None = None, draft_vocabulary: bool = False) -> torch.Tensor:
        """Logits over the target's vocabulary, or with `draft_vocabulary` over `draft_vocab_ids` when the
        draft has them (drafting; training scores the whole vocabulary)."""
        target = self._parts(target)
        if draft_vocabulary and self.draft_vocab_ids is not None:
            if target.draft_head is None:
                self.refresh_draft_head(target)
            weight_and_bias = target.draft_head
            return F.linear(hidden.to(weight_and_bias[0].dtype), *weight_and_bias)
        lm_head = target.lm_head
        return lm_head(hidden.to(lm_head.weight.dtype)).to(hidden.device)

    def _finish_block(
        self, hidden: torch.Tensor, self_attn_out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, target_kv: TargetKV
    ) -> torch.Tensor:
        hidden = hidden + self_attn_out
        hidden = hidden + self.cross_attn(self.post_self_attention_layernorm(hidden), cos, sin, target_kv)
        return hidden + self.mlp(self.post_cross_attention_layernorm(hidden))

    # ----- inference ---------------------------------------------------------------------------------
    @torch.no_grad()
    def append_and_query_root(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        valid: torch.Tensor,
        cache: DraftCache,
        target_kv: TargetKV,
        target: TargetParts | None = None,
    ) -> torch.Tensor:
        """Write committed tokens into the ring and return the logits of each row's last valid token.

        Args:
            input_ids, position_ids, valid: `(B, C)`; `valid` marks real tokens (rows may be ragged and
                padded anywhere; every row needs at least one valid token). `C` must not exceed the window.
            cache: the draft cache, updated in place.
            target_kv: the target's committed last-layer cache; the returned root at position `t` reads
                positions `< t`, which must be exactly the committed slots.
            target: the target's parts ([`target_parts_of`]); default: the attached target's.

        Returns:
            `(B, vocab)` logits at each row's last valid token; with a draft vocabulary `(B,
            draft_vocab_size)`, over `draft_vocab_ids`.
        """
        batch, chunk = input_ids.shape
        if chunk > cache.window:
            raise ValueError(f"at most {cache.window} tokens can be appended at once, got {chunk}")
        target = self._parts(target)
        hidden = self._embed(input_ids, target)
        cos, sin = self._rotary(hidden, position_ids, target)
        key, value = self.self_attn.key_value(self.input_layernorm(hidden), cos, sin)
        # Only the root's query matters: take each row's last valid token.
        last = (valid.long() * torch.arange(1, chunk + 1, device=valid.device)).argmax(dim=1, keepdim=True)
        # Invalid entries repeat the row's last valid one, so every entry can be written without a
        # data-dependent shape (no host sync): duplicates store the very same values in the same slot.
        source = torch.where(valid, torch.arange(chunk, device=valid.device), last)
        rows = torch.arange(batch, device=input_ids.device)[:, None].expand(batch, chunk)
        write_positions = position_ids.gather(1, source)
        slots = write_positions.clamp(min=0) % cache.window
        cache.key_ring[rows, :, slots] = key.transpose(1, 2)[rows, source]
        cache.value_ring[rows, :, slots] = value.transpose(1, 2)[rows, source]
        cache.ring_positions[rows, slots] = write_positions

        root_hidden = hidden.gather(1, last[..., None].expand(-1, -1, hidden.shape[-1]))
        root_pos = position_ids.gather(1, last)
        root_cos, root_sin = cos.gather(1, last[..., None].expand(-1, -1, cos.shape[-1])), sin.gather(
            1, last[..., None].expand(-1, -1, sin.shape[-1])
        )
        visible = self._ring_visibility(cache, root_pos)
        attn = self.self_attn(
            self.input_layernorm(root_hidden),
            root_cos,
            root_sin,
            cache.key_ring,
            cache.value_ring,
            visible,
            differentiable=False,
        )
        hidden = self._finish_block(root_hidden, attn, root_cos, root_sin, target_kv)
        return self._logits(hidden, target, draft_vocabulary=True)[:, 0]

    @torch.no_grad()
    def query_tree_level(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        scratch_start: int,
        tree_visible: torch.Tensor,
        cache: DraftCache,
        target_kv: TargetKV,
        target: TargetParts | None = None,
    ) -> torch.Tensor:
        """Draft one tree level: store its K/V in scratch slots `[scratch_start, scratch_start + n)`.

        Args:
            input_ids, position_ids: `(B, n)` tokens and absolute positions of the level's nodes.
            tree_visible: `(B, n, scratch_start + n)` boolean; True where a node sees a scratch node
                (its ancestors below the root, and itself).
            cache, target_kv, target: as in [`append_and_query_root`]; the ring must hold the root.

        Returns:
            `(B, n, vocab)` logits; with a draft vocabulary `(B, n, draft_vocab_size)`.
        """
        num_nodes = input_ids.shape[1]
        target = self._parts(target)
        hidden = self._embed(input_ids, target)
        cos, sin = self._rotary(hidden, position_ids, target)
        normed = self.input_layernorm(hidden)
        key, value = self.self_attn.key_value(normed, cos, sin)
        end = scratch_start + num_nodes
        cache.key_tree[:, :, scratch_start:end] = key
        cache.value_tree[:, :, scratch_start:end] = value
        # The ring and the first `end` scratch slots are contiguous in the cache: no copy.
        key_all = cache.key_slots[:, :, : cache.window + end]
        value_all = cache.value_slots[:, :, : cache.window + end]
        visible = torch.cat([self._ring_visibility(cache, position_ids), tree_visible], dim=2)
        attn = self.self_attn(normed, cos, sin, key_all, value_all, visible, differentiable=False)
        return self._logits(self._finish_block(hidden, attn, cos, sin, target_kv), target, draft_vocabulary=True)

    @staticmethod
    def _ring_visibility(cache: DraftCache, query_positions: torch.Tensor) -> torch.Tensor:
        """`(B, Q, window)`: ring slot visible iff its position is in `(q - window, q]`."""
        ring = cache.ring_positions[:, None, :]
        query = query_positions[:, :, None]
        return (ring >= 0) & (ring <= query) & (ring > query - cache.window)

    # ----- training ----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        target_key: torch.Tensor,
        target_value: torch.Tensor,
        cross_lag: torch.Tensor | int = 1,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the block over whole sequences, as during training.

        Args:
            input_ids, position_ids: `(B, T)`.
            target_key, target_value: `(B, Hkv, T, D)`, the target's last-layer K/V of the same tokens at
                the same positions.
            cross_lag: `(B,)` or int; the query at index `i` reads target K/V at indices `<= i - lag`
                (lag 1 = strictly earlier tokens, as at the start of an inference round).
            attention_mask: optional `(B, T)`, 0 on padding.

        Returns:
            `(B, T, vocab)` logits.
        """
        batch, length = input_ids.shape
        device = input_ids.device
        target = self._parts(None)
        hidden = self._embed(input_ids, target)
        cos, sin = self._rotary(hidden, position_ids, target)
        normed = self.input_layernorm(hidden)
        key, value = self.self_attn.key_value(normed, cos, sin)
        index = torch.arange(length, device=device)
        valid = attention_mask.bool() if attention_mask is not None else torch.ones(batch, length, dtype=torch.bool, device=device)
        causal = (index[None, :] <= index[:, None]) & (index[None, :] > index[:, None] - self.config.sliding_window)
        self_visible = causal[None] & valid[:, None, :]
        self_visible = self_visible | torch.eye(length, dtype=torch.bool, device=device)[None]
        hidden = hidden + self.self_attn(normed, cos, sin, key, value, self_visible)

        lag = torch.as_tensor(cross_lag, device=device).reshape(-1, 1, 1)
        cross_visible = (index[None, None, :] <= index[None, :, None] - lag) & valid[:, None, :]
        normed = self.post_self_attention_layernorm(hidden)
        query = rotate(
            self.cross_attn.q_proj(normed).view(batch, length, -1, self.config.head_dim).transpose(1, 2), cos, sin
        )
        out, _ = attention_with_lse(query, target_key.to(query.dtype), target_value.to(query.dtype), cross_visible, self.cross_attn.scale)
        hidden = hidden + self.cross_attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
        hidden = hidden + self.mlp(self.post_cross_attention_layernorm(hidden))
        return self._logits(hidden, target)

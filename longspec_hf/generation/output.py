"""The generated tokens of a LongSpec `generate` call, as transformers' loop would emit them.

Rounds hand over up to `1 + depth` tokens per row; [`OutputCollector`] takes them one at a time, so that
`max_new_tokens`, EOS ids and stopping criteria end each row exactly where one-token decoding would, and
the streamer sees each token once, in order.
"""

from __future__ import annotations

import torch
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from . import _compat


class OutputCollector:
    """Collects each row's generated tokens and applies max length, EOS and stopping criteria per token."""

    def __init__(
        self,
        batch_size: int,
        max_new_tokens: int,
        eos_token_ids: set[int],
        stopping_criteria: StoppingCriteriaList,
        keep_scores: bool,
        keep_logits: bool,
        streamer,
        pad_token_id: int,
    ):
        self.max_new_tokens = max_new_tokens
        self.eos_token_ids = eos_token_ids
        self.stopping_criteria = stopping_criteria
        self.tokens: list[list[int]] = [[] for _ in range(batch_size)]
        self.scores: list[list[torch.Tensor]] | None = [[] for _ in range(batch_size)] if keep_scores else None
        self.logits: list[list[torch.Tensor]] | None = [[] for _ in range(batch_size)] if keep_logits else None
        self.done = [False] * batch_size
        self.streamer = streamer
        self.pad_token_id = pad_token_id
        self.streamed = 0

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def add(
        self,
        new_tokens: list[list[int]],
        counts: list[int],
        buffer: torch.Tensor,
        lengths: list[int],
        scores: torch.Tensor | None,
        logits: torch.Tensor | None,
    ) -> list[int]:
        """Take up to `counts[b]` tokens of `new_tokens[b]` for every row not done; return how many each took.

        Row `b` of `buffer` holds its sequence in `[0, lengths[b])` followed by the new tokens (stopping
        criteria read the sequence).
        `scores`/`logits` are `(B, P, V)`, the values at which each new token was chosen.
        """
        taken = [0] * len(self.tokens)
        for row, (row_tokens, count) in enumerate(zip(new_tokens, counts)):
            for j in range(count if not self.done[row] else 0):
                token = row_tokens[j]
                self.tokens[row].append(token)
                taken[row] += 1
                if self.scores is not None:
                    self.scores[row].append(scores[row, j])
                if self.logits is not None:
                    self.logits[row].append(logits[row, j])
                if token in self.eos_token_ids or len(self.tokens[row]) >= self.max_new_tokens:
                    self.done[row] = True
                elif len(self.stopping_criteria) > 0:
                    length = lengths[row] + j + 1
                    row_scores = scores[row, j][None] if scores is not None else None
                    if bool(self.stopping_criteria(buffer[row : row + 1, :length], row_scores).any()):
                        self.done[row] = True
                if self.done[row]:
                    break
        self._stream()
        return taken

    def _stream(self, final: bool = False) -> None:
        """Give the streamer every token position that all rows have reached (in order, once).

        Batches go out one `(B,)` column per step, as transformers' own loop sends them; a finished row
        contributes its padding.
        """
        if self.streamer is None:
            return
        if len(self.tokens) == 1:
            fresh = self.tokens[0][self.streamed :]
            if fresh:
                self.streamer.put(torch.tensor(fresh))
                self.streamed += len(fresh)
            return
        longest = max(len(t) for t in self.tokens)
        ready = longest if final else min(len(t) if not d else longest for t, d in zip(self.tokens, self.done))
        while self.streamed < ready:
            column = [t[self.streamed] if self.streamed < len(t) else self.pad_token_id for t in self.tokens]
            self.streamer.put(torch.tensor(column))
            self.streamed += 1

    def sequences(self, input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
        width = max(len(t) for t in self.tokens)
        generated = torch.full((len(self.tokens), width), pad_token_id, dtype=input_ids.dtype)
        for row, row_tokens in enumerate(self.tokens):
            generated[row, : len(row_tokens)] = torch.tensor(row_tokens, dtype=input_ids.dtype)
        return torch.cat([input_ids, generated.to(input_ids.device)], dim=1)

    @staticmethod
    def per_step(rows: list[list[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        """Per-row lists of `(V,)` tensors -> one `(B, V)` tensor per step; rows already finished get zeros."""
        width = max(len(r) for r in rows)
        reference = next(r[0] for r in rows if r)
        steps = []
        for step in range(width):
            steps.append(
                torch.stack([r[step] if step < len(r) else torch.zeros_like(reference) for r in rows])
            )
        return tuple(steps)

    def finish(
        self, input_ids: torch.Tensor, return_dict: bool, past_key_values=None
    ) -> torch.Tensor | GenerateDecoderOnlyOutput:
        """What `generate` returns: the sequences, or with `return_dict` also per-step scores/logits and the
        target's cache `past_key_values` (`returned_cache.committed_cache`)."""
        if self.streamer is not None:
            self._stream(final=True)
            self.streamer.end()
        sequences = self.sequences(input_ids, self.pad_token_id)
        if not return_dict:
            return sequences
        scores = self.per_step(self.scores) if self.scores else None
        logits = self.per_step(self.logits) if self.logits else None
        cache = {_compat.cache_output_field(): past_key_values}
        return GenerateDecoderOnlyOutput(sequences=sequences, scores=scores, logits=logits, **cache)

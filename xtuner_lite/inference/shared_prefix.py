"""Prompts that several running rows continue (a GRPO group, OpenAI's ``n``): their keys and
values held once and read once per decode step by all those rows (cascade attention).

Without this, a prompt given G times is prefilled once and its keys and values copied into G
rows of the dense cache, so every decode step reads them G times, and retiring a row or
growing the cache copies them G times. Here a row's own cache holds only what it generated;
each decode step attends each row's queries to its own columns and, as one batch per prompt
(the G rows' queries standing in for query positions), to the prompt's columns, and merges the
two by their log-sum-exp: the same softmax over the concatenated columns, in two parts.
Decided when rows are admitted (``worth_sharing``): the merge and the gathers cost a fixed
few kernels per layer, which pays only when enough duplicated columns are saved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xtuner_lite.inference.kv_cache import first_used_column

# duplicated prompt columns (summed over an admission's repeated prompts, one fewer than each is
# repeated) from which holding them once pays for the merge: about where this module's attention
# and the dense cache's break even (bench_rollout.py --context-tokens, docs/benchmarks.md)
SHARE_MIN_COLUMNS = 1024


def worth_sharing(lengths: list[int], counts: list[int], min_columns: int) -> bool:
    """Whether prompts of ``lengths``, each given ``counts`` times, save enough columns
    (``min_columns`` 0: never share)."""
    saved = sum(n * (c - 1) for n, c in zip(lengths, counts))
    return min_columns > 0 and saved >= min_columns


@dataclass
class StepLayout:
    """Where each shared row's queries go in the per-prompt batch of one decode step."""

    rows: torch.Tensor | None  # (k,) the rows that have a prompt here (None: every row)
    slot_rows: torch.Tensor  # (prompts * width,) the row whose queries fill each slot
    row_slots: torch.Tensor  # (k,) each shared row's slot
    width: int  # slots per prompt: the most rows any prompt has
    additive: torch.Tensor  # (prompts, 1, 1, columns): 0 at real columns, -inf at padding


class SharedPrefixes:
    """Per layer a (prompts, kv heads, columns, head dim) key and value buffer, left-padded;
    ``mask`` (prompts, columns) marks real columns; ``owner`` (rows,) is each running row's
    prompt here, or -1 for a row whose prompt is in its own cache."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor,
                 owner: torch.Tensor):  # fmt: skip
        self.keys, self.values, self.mask, self.owner = keys, values, mask, owner
        # what every decode step reads, made once: a change of rows makes a new instance
        self._row_lengths: torch.Tensor | None = None
        self._layout: StepLayout | None = None

    @property
    def lengths(self) -> torch.Tensor:
        """Real columns of each prompt."""
        return self.mask.sum(-1)

    def row_lengths(self) -> torch.Tensor:
        """(rows,) how many of each row's tokens are held here (0 without a prompt here)."""
        if self._row_lengths is None:
            lengths = self.lengths
            self._row_lengths = torch.where(self.owner >= 0, lengths[self.owner.clamp(min=0)], 0)
        return self._row_lengths

    def row_kv(self, row: int) -> torch.Tensor | None:
        """Row ``row``'s prompt keys and values, (layers, 2, kv heads, columns, dim), or None."""
        p = int(self.owner[row])
        if p < 0:
            return None
        columns = self.mask[p].nonzero()[:, 0]
        return torch.stack(
            [
                torch.stack([k[p].index_select(1, columns), v[p].index_select(1, columns)])
                for k, v in zip(self.keys, self.values)
            ]  # fmt: skip
        )

    def select(self, keep: torch.Tensor) -> SharedPrefixes | None:
        """Only rows ``keep``; prompts no kept row continues are dropped (None: none left)."""
        owner = self.owner[keep]
        used = owner[owner >= 0].unique()
        if used.numel() == 0:
            return None
        renumber = torch.full((self.mask.shape[0],), -1, dtype=torch.long, device=owner.device)
        renumber[used] = torch.arange(used.numel(), device=owner.device)
        mask = self.mask[used]
        first = first_used_column(mask)
        return SharedPrefixes(
            [k[used][:, :, first:] for k in self.keys],
            [v[used][:, :, first:] for v in self.values],
            mask[:, first:],
            torch.where(owner >= 0, renumber[owner.clamp(min=0)], -1),
        )

    def layout(self, dtype: torch.dtype) -> StepLayout:
        """The decode step's slots and prompt mask in ``dtype`` (for every layer; made once)."""
        if self._layout is None or self._layout.additive.dtype != dtype:
            self._layout = self._make_layout(dtype)
        return self._layout

    def _make_layout(self, dtype: torch.dtype) -> StepLayout:
        owner = self.owner.tolist()
        shared = [r for r, p in enumerate(owner) if p >= 0]
        members: list[list[int]] = [[] for _ in range(self.mask.shape[0])]
        for r in shared:
            members[owner[r]].append(r)
        width = max(len(m) for m in members)
        slot_rows, row_slots = [], {}
        for p, rows in enumerate(members):
            for j, r in enumerate(rows):
                row_slots[r] = p * width + j
            # an unused slot repeats a member's queries; its output is never read
            slot_rows += rows + [rows[0]] * (width - len(rows))
        device = self.owner.device
        # slots index the shared rows' positions among the shared rows
        position = {r: i for i, r in enumerate(shared)}
        additive = torch.zeros(self.mask.shape, dtype=dtype, device=device)
        return StepLayout(
            rows=None if len(shared) == len(owner) else torch.tensor(shared, device=device),
            slot_rows=torch.tensor([position[r] for r in slot_rows], device=device),
            row_slots=torch.tensor([row_slots[r] for r in shared], device=device),
            width=width,
            additive=additive.masked_fill_(self.mask == 0, float("-inf"))[:, None, None, :],
        )

    def attend(self, layer: int, q: torch.Tensor, own: torch.Tensor, own_lse: torch.Tensor,
               layout: StepLayout, scale: float) -> torch.Tensor:  # fmt: skip
        """Merge ``own`` attention (rows, kv heads, query heads per kv head, dim), with its
        log-sum-exp ``own_lse``, with the shared rows' attention to their prompts."""
        if layout.rows is not None:
            q = q.index_select(0, layout.rows)
        prompts, kv_heads, per_kv, dim = self.mask.shape[0], *q.shape[1:]
        # (prompts, kv heads, slots x query heads per kv head, dim): a prompt's rows' queries
        # stand in for query positions, so its keys and values are read once for all of them
        queries = q.index_select(0, layout.slot_rows)
        queries = queries.view(prompts, layout.width, kv_heads, per_kv, dim).transpose(1, 2)
        queries = queries.reshape(prompts, kv_heads, layout.width * per_kv, dim)
        out, lse = attention_with_lse(
            queries, self.keys[layer], self.values[layer], layout.additive, scale
        )
        out = out.view(prompts, kv_heads, layout.width, per_kv, dim).transpose(1, 2)
        out = out.reshape(-1, kv_heads, per_kv, dim).index_select(0, layout.row_slots)
        lse = lse.view(prompts, kv_heads, layout.width, per_kv).transpose(1, 2)
        lse = lse.reshape(-1, kv_heads, per_kv).index_select(0, layout.row_slots)
        mine = own if layout.rows is None else own.index_select(0, layout.rows)
        mine_lse = own_lse if layout.rows is None else own_lse.index_select(0, layout.rows)
        # softmax over [own | prompt] columns = the two parts weighted by their shares of the
        # total exp-sum: the prompt's share is sigmoid(lse_prompt - lse_own)
        weight = torch.sigmoid(lse - mine_lse).unsqueeze(-1).to(mine.dtype)
        merged = torch.lerp(mine, out, weight)
        return merged if layout.rows is None else own.index_copy(0, layout.rows, merged)


def stack_rows(first: SharedPrefixes | None, first_rows: int, second: SharedPrefixes | None,
               second_rows: int) -> SharedPrefixes | None:  # fmt: skip
    """The prompts of a batch of ``first_rows`` rows followed by one of ``second_rows`` rows
    (either may have none here: None)."""
    if first is None and second is None:
        return None
    if second is None:
        return SharedPrefixes(first.keys, first.values, first.mask,
                              F.pad(first.owner, (0, second_rows), value=-1))  # fmt: skip
    if first is None:
        return SharedPrefixes(second.keys, second.values, second.mask,
                              F.pad(second.owner, (first_rows, 0), value=-1))  # fmt: skip
    width = max(first.mask.shape[1], second.mask.shape[1])
    owner = torch.where(second.owner >= 0, second.owner + first.mask.shape[0], -1)

    def stack(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat([_pad(a, width, dim), _pad(b, width, dim)])

    return SharedPrefixes(
        [stack(a, b, 2) for a, b in zip(first.keys, second.keys)],
        [stack(a, b, 2) for a, b in zip(first.values, second.values)],
        stack(first.mask, second.mask, 1),
        torch.cat([first.owner, owner]),
    )


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Scaled dot-product attention with an additive ``mask``, and the fp32 log-sum-exp of each
    query's scores; on CPU torch's flash kernel, which ``scaled_dot_product_attention`` runs
    there too (the same output), returns it; elsewhere the scores are written out."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, attn_mask=mask, scale=scale
        )[:2]
        return out, lse
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale + mask.float()
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse.unsqueeze(-1)).to(v.dtype)
    return torch.matmul(weights, v), lse


def _pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Left-pad ``t`` with zeros along ``dim`` up to ``width``."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [missing, 0]
    return F.pad(t, pad)


__all__ = [
    "SHARE_MIN_COLUMNS",
    "SharedPrefixes",
    "StepLayout",
    "attention_with_lse",
    "stack_rows",
    "worth_sharing",
]

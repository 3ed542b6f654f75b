"""The video's visual tokens as pruning sees them: features, grid coordinates, positions and
provenance (`VisualTokens`), and the row-merging arithmetic every stage shares.

This module sits below both `vidqa.models` (adapters build VisualTokens from the encoder) and
`vidqa.pruning` (stages select and merge them), so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class VisualTokens:
    """The video's prunable visual tokens for one request (batch size 1).

    features: (num_tokens, hidden) projected features, as the LLM will receive them.
    frame, row, col: (num_tokens,) grid coordinates of each token (frame = sampled-frame index;
        for Qwen2.5-VL, which encodes two frames as one temporal patch, the temporal-patch index).
    seq_index: (num_tokens,) index of each token in the full (unpruned) prompt.
    fixed_features: (num_fixed, hidden) visual-span rows that are never pruned (LLaVA-OneVision's
        image_newline after the video), fed back unchanged.
    deepstack: (layers, num_tokens, hidden) or None: features of the SAME tokens that the LLM
        receives elsewhere (Qwen3-VL's DeepStack features, added to the first layers' hidden
        states at the visual rows). Row i belongs to token i; `select`, `merge` and `concatenate`
        apply every row operation to them exactly as to `features`, so a stage that changes rows
        only through those methods keeps them aligned without knowing they exist.
    origin: (num_original,) long or None: provenance, for every token of the unpruned video
        (frame-major over `grid`), the row of these tokens that stands for it now, or -1 once it is
        dropped; several original tokens share a row after a merge. `select`, `merge` and
        `concatenate` keep it up to date, so every stage built on them is tracked for free; a
        stage that merges rows some other way records it with `merged_from`.
    """

    features: torch.Tensor
    frame: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    seq_index: torch.Tensor
    grid: tuple[int, int, int]  # (frames, rows, cols) of the unpruned video
    fixed_features: torch.Tensor | None = None
    # per-token annotations added by stages (e.g. PruneVid's segment id and static flag), each (num_tokens, ...);
    # "vision_attention" (num_tokens,) and "vision_keys" (num_tokens, head_dim) when a stage asked for
    # vision-encoder attention (models/vision_attention.py)
    meta: dict[str, torch.Tensor] = field(default_factory=dict)
    vision_layer: int | None = None  # absolute encoder layer the vision_* meta came from
    deepstack: torch.Tensor | None = None
    origin: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.features.shape[0]

    @classmethod
    def from_grid(
        cls,
        features: torch.Tensor,
        grid: tuple[int, int, int],
        seq_index: torch.Tensor,
        fixed_features: torch.Tensor | None = None,
        deepstack: torch.Tensor | None = None,
    ) -> "VisualTokens":
        """Tokens laid out frame-major then row-major over `grid` = (frames, rows, cols), the
        order every supported family's encoder emits them in."""
        num_frames, rows, cols = grid
        per_frame = rows * cols
        token = torch.arange(num_frames * per_frame, device=features.device)
        if fixed_features is None:
            fixed_features = features.new_zeros((0, features.shape[1]))
        return cls(
            features=features,
            frame=token // per_frame,
            row=(token % per_frame) // cols,
            col=token % cols,
            seq_index=seq_index.to(features.device),
            grid=grid,
            fixed_features=fixed_features,
            deepstack=deepstack,
            origin=token,
        )

    def select(self, index: torch.Tensor) -> "VisualTokens":
        """A subset of rows (index: (k,) long), keeping the grid of the unpruned video."""
        return VisualTokens(
            features=self.features[index],
            frame=self.frame[index],
            row=self.row[index],
            col=self.col[index],
            seq_index=self.seq_index[index],
            grid=self.grid,
            fixed_features=self.fixed_features,
            meta={name: values[index] for name, values in self.meta.items()},
            vision_layer=self.vision_layer,
            deepstack=None if self.deepstack is None else self.deepstack[:, index.to(self.deepstack.device)],
            origin=self._origin_after(_rows_of_selection(index, len(self))),
        )

    def merge(
        self,
        rows: torch.Tensor,
        num_rows: int,
        features: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        coefficients: torch.Tensor | None = None,
        representatives: torch.Tensor | None = None,
        members: torch.Tensor | None = None,
    ) -> "VisualTokens":
        """Merge tokens into `num_rows` new rows.

        rows: (num_tokens,) long, the output row of each token in [0, num_rows), or -1 for a
            token that is dropped. Every output row must have at least one member.
        weights: (num_tokens,) float or None (plain means): row m is
            sum_i w_i x_i / sum_i w_i over its members i.
        coefficients: (num_tokens,) float, instead of weights: row m is sum_i c_i x_i over its
            members, NOT normalised (an affine combination, e.g. VisionZip's target + mean of its
            joiners: 1 on the target, 1/n on each joiner).
        members: (E,) long or None, with coefficients: the same sum in entry form, for a token
            that feeds several rows (FastVID): entry e adds coefficients[e] * x[members[e]] to
            row rows[e] (rows and coefficients are then (E,) too).
        features: (num_rows, hidden) the merged features when the stage computed them itself
            (e.g. a mean of means, to keep its exact arithmetic); None computes them here.
        representatives: (num_rows,) long or None: the member token whose grid coordinates,
            sequence index (hence position) and meta each row takes; None: its EARLIEST member
            (smallest token index). Stages add their own meta afterwards.
        Every other per-token feature (`deepstack`) is merged here with the same weights or
        coefficients, so it follows the merge exactly as the features do.
        One host sync: reading the check that every row has a member (its representative).
        """
        if members is not None and coefficients is None:
            raise ValueError("VisualTokens.merge: members= (entry form) needs coefficients=")
        if weights is not None and coefficients is not None:
            raise ValueError("VisualTokens.merge: give weights (a weighted mean) or coefficients (a sum), not both")
        rows = rows.to(self.features.device)
        token = torch.arange(len(self), device=rows.device) if members is None else members.to(rows.device)
        member = rows >= 0
        # non-members go to a spare last row, so no step needs a data-dependent shape (a host sync)
        target = torch.where(member, rows, num_rows)
        if representatives is None:
            representatives = torch.full((num_rows + 1,), len(self), dtype=torch.long, device=rows.device)
            representatives = representatives.scatter_reduce_(0, target, token, reduce="amin")[:num_rows]
            valid = representatives < len(self)
            problem = "every output row needs at least one member"
        else:
            representatives = representatives.to(rows.device)
            if len(representatives) != num_rows:
                raise ValueError("VisualTokens.merge: each row's representative must be one of its members")
            # entry e hits when its token is its row's representative; a row is valid with a hit
            own = torch.cat([representatives, representatives.new_full((1,), -1)])[target]
            hits = torch.zeros(num_rows + 1, dtype=torch.long, device=rows.device)
            valid = hits.index_add_(0, target, (member & (token == own)).long())[:num_rows] > 0
            problem = "each row's representative must be one of its members"
        if num_rows and not bool(valid.all()):  # the merge's only host sync
            raise ValueError(f"VisualTokens.merge: {problem}")
        merged = self.select(representatives)

        def combine(x: torch.Tensor) -> torch.Tensor:
            if coefficients is not None:
                return affine_row_sums(x, rows, num_rows, coefficients, members)
            return weighted_row_means(x, rows, num_rows, weights)

        if features is None:
            features = combine(self.features)
        deepstack = None
        if self.deepstack is not None:
            deepstack = torch.stack([combine(layer) for layer in self.deepstack])
        return merged.replace(features=features, deepstack=deepstack, origin=self._origin_after(self._row_of_each_token(rows, members, representatives)))

    def _row_of_each_token(self, rows: torch.Tensor, members: torch.Tensor | None,
                           representatives: torch.Tensor) -> torch.Tensor:
        """(num_tokens,) the output row of each token, for provenance. In entry form (a token
        feeding several rows) a row's representative belongs to its own row and any other token
        to the row of its first entry, the group a provenance picture shows it in."""
        if members is None:
            return rows
        members = members.to(rows.device)
        entry = torch.arange(len(rows), device=rows.device)
        # entries of dropped rows go to a spare last token (no bool-mask indexing: no host sync)
        first = torch.full((len(self) + 1,), len(rows), dtype=torch.long, device=rows.device)
        first.scatter_reduce_(0, torch.where(rows >= 0, members, len(self)), entry, reduce="amin")
        first = first[:len(self)]
        token_row = torch.cat([rows, rows.new_full((1,), -1)])[first]
        token_row[representatives] = torch.arange(len(representatives), device=rows.device)
        return token_row

    def merged_from(self, source: "VisualTokens", rows: torch.Tensor) -> "VisualTokens":
        """These tokens, with the provenance of a merge a stage did without `merge` (e.g. a
        `select` of the representatives, then their merged features): source token i went into
        row rows[i] of these tokens, or was dropped (-1). rows: (len(source),) long."""
        return replace(self, origin=source._origin_after(rows.to(self.features.device)))

    def _origin_after(self, rows: torch.Tensor) -> torch.Tensor | None:
        """`origin` once every current row i has moved to row rows[i] (-1: dropped)."""
        if self.origin is None:
            return None
        origin = self.origin.to(rows.device)
        moved = rows[origin.clamp(min=0)]
        return torch.where(origin >= 0, moved, torch.full_like(moved, -1))

    @staticmethod
    def concatenate(pieces: list["VisualTokens"]) -> "VisualTokens":
        """The rows of `pieces` one after another (same video: grid and fixed rows of the first)."""
        first = pieces[0]
        deepstack = None if first.deepstack is None else torch.cat([p.deepstack for p in pieces], dim=1)
        return replace(
            first,
            features=torch.cat([p.features for p in pieces]),
            frame=torch.cat([p.frame for p in pieces]),
            row=torch.cat([p.row for p in pieces]),
            col=torch.cat([p.col for p in pieces]),
            seq_index=torch.cat([p.seq_index for p in pieces]),
            meta={name: torch.cat([p.meta[name] for p in pieces]) for name in first.meta},
            deepstack=deepstack,
            origin=_concatenated_origin(pieces),
        )

    def replace(self, **changes) -> "VisualTokens":
        """A copy with some fields replaced (new coordinates, meta...).

        Replacing `features` on tokens that carry DeepStack rows without replacing those too is
        refused: it is how a merge would leave them describing other tokens. Merge with `merge`.
        """
        if "features" in changes and self.deepstack is not None and "deepstack" not in changes:
            raise ValueError(
                "VisualTokens.replace(features=...) on tokens with DeepStack features would leave them "
                "misaligned; merge rows with VisualTokens.merge (or pass deepstack= as well)"
            )
        return replace(self, **changes)


def _rows_of_selection(index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """(num_rows,) the position in `index` of each current row (its first, if repeated), -1 if absent."""
    if index.dtype == torch.bool:  # a mask: kept rows are numbered in order (no nonzero, no host sync)
        return torch.where(index, index.long().cumsum(0) - 1, -1)
    index = index.flatten().long()
    position = torch.arange(len(index), device=index.device)
    rows = torch.full((num_rows,), len(index), dtype=torch.long, device=index.device)
    rows.scatter_reduce_(0, index, position, reduce="amin")
    return torch.where(rows < len(index), rows, torch.full_like(rows, -1))


def _concatenated_origin(pieces: list[VisualTokens]) -> torch.Tensor | None:
    """Provenance of `concatenate(pieces)`: each piece's rows shifted by the rows before it. The
    pieces come from the same video; a token claimed by two pieces goes to the first."""
    if any(piece.origin is None for piece in pieces):
        return None
    origin = torch.full_like(pieces[0].origin, -1)
    offset = 0
    for piece in pieces:
        mine = (piece.origin >= 0) & (origin < 0)
        origin = torch.where(mine, piece.origin + offset, origin)
        offset += len(piece)
    return origin


def weighted_row_means(
    x: torch.Tensor, rows: torch.Tensor, num_rows: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """(num_rows, C) weighted mean of the rows of x (N, C) assigned to each output row.

    rows: (N,) long in [0, num_rows) or -1 (ignored); weights: (N,) or None (plain means).
    Accumulated in float32, returned in x.dtype.
    """
    rows = rows.to(x.device)
    # ignored rows add into a spare last row: every member still adds in token order, as a
    # bool-mask selection would, without its host sync
    target = torch.where(rows >= 0, rows, num_rows)
    values = x.float()
    weight = torch.ones(values.shape[0], device=x.device) if weights is None else weights.float().to(x.device)
    sums = torch.zeros(num_rows + 1, x.shape[1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, target, values * weight[:, None])
    totals = torch.zeros(num_rows + 1, dtype=torch.float32, device=x.device).index_add_(0, target, weight)
    return (sums[:num_rows] / totals[:num_rows].clamp(min=torch.finfo(torch.float32).tiny)[:, None]).to(x.dtype)


def affine_row_sums(
    x: torch.Tensor, rows: torch.Tensor, num_rows: int, coefficients: torch.Tensor, members: torch.Tensor | None = None
) -> torch.Tensor:
    """(num_rows, C): row m = sum of c_e x[i_e] over the entries e assigned to m (no normalisation).

    x: (N, C); rows: (E,) long in [0, num_rows) or -1 (ignored); coefficients: (E,); members:
    (E,) long, the row of x of each entry (None: entry e is row e of x, E = N). Accumulated in
    float32, in entry order, a bounded number of entries at a time; returned in x.dtype (a lone
    member with coefficient 1 comes back bit-identical).
    """
    rows = rows.to(x.device)
    if x.shape[0] == 0:  # nothing to add (every entry is then ignored)
        return x.new_zeros(num_rows, x.shape[1])
    keep = rows >= 0
    # ignored entries add into a spare last row (from row 0 of x): the others add in entry
    # order, as after a bool-mask selection, without its host sync
    source = torch.arange(len(rows), device=x.device) if members is None else members.to(x.device)
    source = torch.where(keep, source, 0)
    target, scale = torch.where(keep, rows, num_rows), coefficients.to(x.device).float()
    sums = torch.zeros(num_rows + 1, x.shape[1], dtype=torch.float32, device=x.device)
    step = max(1, AFFINE_CHUNK_ELEMENTS // max(x.shape[1], 1))
    for start in range(0, len(source), step):
        part = slice(start, start + step)
        sums.index_add_(0, target[part], x[source[part]].float() * scale[part, None])
    return sums[:num_rows].to(x.dtype)


AFFINE_CHUNK_ELEMENTS = 1 << 24  # float32 products at once in affine_row_sums (64 MB)

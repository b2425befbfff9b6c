"""AdaFuse (arXiv 2601.06022): adaptive word-level ensemble decoding with test-time scaling.

Each round, over the shared committed text:
1. Propose: every model rolls out greedily. Its confidence at the first token of each word is
   the margin p(top-1) - p(top-2); it extends its span word by word while the margin stays
   >= theta, up to `max_words`, so a confident model proposes a longer span.
2. Confident state: with policy "agree", when every model is confident and all proposals are the
   same text, the span is committed with no cross-model scoring. With policy "per-proposal",
   the proposal of the most confident model is committed whenever that model is confident.
3. Uncertain state (diversity-aware scaling): each uncertain model also branches on its top-B
   first tokens (from log-probs it already has; the top-1 branch is its proposal) and rolls
   each branch to a word boundary, all branches advancing together in one batched pass per step.
4. Ensemble decision: every model scores every candidate under its own tokenization; the lowest
   weighted mean NLL wins; ties go to the earlier candidate.

Policy "anchored" trusts one model, the anchor (calibration picks the best member on dev rows):
while the anchor is confident it proposes and commits alone (the others only read the committed
text); when it is unsure, every model proposes and scores as in 3-4, but another candidate wins
only if its combined NLL is lower than the anchor's proposal by `override_margin`: the others
override the anchor, they do not average it away. The candidates are the proposals only (no
branches: an alternative is worth scoring when another model would say it), so identical models
reproduce the anchor's greedy text, and a round where all agree costs no scoring.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..conventions import OFFERS_FOLLOW
from ..errors import FuselmError
from ..models.session import Rollout, Session, top_margin
from ..text.words import first_word_end, word_ends
from .base import GridContext, GridSetup, Step, StepContext
from .controller import Controller, round_features
from .ensemble import (
    AnchoredDetail,
    Candidate,
    EnsembleMethod,
    add_candidate,
    anchor_stands,
    candidate_trace,
    decided_step,
    token_at,
)
from .experts import each
from .options import OverridableOptions, path_option, work_option


class AdaFuseOptions(OverridableOptions):
    theta: float = Field(0.7, ge=0.0, le=1.0, description="confidence threshold on the top-1/top-2 margin")
    max_words: int = work_option(3, "longest span a confident model proposes, in words")
    branches: int = work_option(
        3, "top-B first tokens an uncertain model explores (1: no branching; policy anchored: none)"
    )
    policy: Literal["agree", "per-proposal", "anchored"] = Field(
        "agree", description="when a round counts as confident, and who decides (see the module docstring)"
    )
    draft_words: int = work_option(
        0,
        ge=0,
        description="policy anchored: the anchor drafts up to this many words, the others read the draft in one"
        " pass each, and the words where the anchor is unsure and another would say otherwise are fused"
        " (speculate, then collaborate; the same text as 0, word by word; in-process models only)",
    )
    controller: str | None = path_option(
        "a learned fusion controller (`fuselm train-controller`) picks the winner of scored rounds"
    )

    @model_validator(mode="after")
    def _draft_is_anchored(self) -> AdaFuseOptions:
        if self.draft_words and self.policy != "anchored":
            raise ValueError("draft_words needs policy anchored (the anchor drafts, the others check)")
        return self


class AdaFuseDetail(AnchoredDetail):
    checked: int | None = None  # anchored with a draft: the anchor's unsure words the others confirmed


PROMPT_TAU = 0.1  # the calibration's per-prompt weights: temperature, in nats per byte of the prompt


class AdaFuse(EnsembleMethod):
    name = "adafuse"
    description = "adaptive word-level fusion across tokenizers (confident spans, diverse branches)"
    Options = AdaFuseOptions
    Detail = AdaFuseDetail

    @classmethod
    def calibration_setups(cls, grid: GridContext) -> list[GridSetup]:
        kept = grid.kept
        out = []
        if len(kept) >= 2:  # an equal vote: the members within the gap only (UniTE)
            out += [
                GridSetup("adafuse", kept),
                GridSetup(f"adafuse weights={grid.kept_weights}", kept, {"weights": grid.kept_weights}),
                GridSetup(f"adafuse prompt_weights={PROMPT_TAU:g}", kept, {"prompt_weights": PROMPT_TAU}),
            ]
            if len(kept) >= 3:  # a median of two is their mean
                out.append(GridSetup("adafuse combine=median", kept, {"combine": "median"}))
                # AdaFuse's paper fuses the best two of four models per task (chosen on test data):
                # here the two best on the dev rows
                names = [m.name for m in kept]
                best_two = [n for n in grid.ranked if n in names][:2]
                out.append(GridSetup("adafuse top-2", [m for m in kept if m.name in best_two]))
        # over every member: the anchor commits alone while it is sure and a far weaker member
        # overrides it only by a margin, so the gap does not keep anyone out
        for theta in grid.thetas:
            for margin in grid.margins:
                opts = {"policy": "anchored", "anchor": grid.anchor, "theta": theta, "override_margin": margin}
                out.append(GridSetup(f"adafuse anchored theta={theta:g} margin={margin:g}", grid.members, opts))
        if grid.controller is not None:
            out.append(GridSetup("adafuse controller", grid.members, {"controller": grid.controller}))
            # the controller only where the anchor is unsure (the highest theta: the most rounds it
            # may decide), the anchor alone elsewhere: the same gain aimed at for less
            theta = max(grid.thetas)
            opts = {"policy": "anchored", "anchor": grid.anchor, "theta": theta, "controller": grid.controller}
            out.append(GridSetup(f"adafuse anchored controller theta={theta:g}", grid.members, opts))
        return out

    def __init__(self, models, options=None):
        super().__init__(models, options)
        self.controller = None
        if self.options.controller:
            self.controller = Controller.load(self.options.controller)
            self.controller.check_models(self.names, self.options.controller)
        unread = [m for m in models if OFFERS_FOLLOW not in m.offers]
        if self.options.draft_words and unread:
            raise FuselmError(
                f"adafuse -O draft_words needs models in this process (each reads the anchor's draft in one"
                f" pass); {unread[0].name!r} is on {unread[0].where}: use draft_words 0 there"
            )

    def _propose(self, s: Session, confident: bool, max_tokens: int) -> Rollout:
        o = self.options

        def until(r: Rollout) -> int | None:
            ends = word_ends(r.text, o.max_words)
            if not ends:
                return None
            if not confident or len(ends) == o.max_words:
                return ends[-1] if confident else ends[0]
            # margin at the first token of the next word decides whether the span grows
            return ends[-1] if r.margins[token_at(r, ends[-1])] < o.theta else None

        return s.rollout(max_tokens, until=until)

    def step(self, ctx: StepContext) -> Step:
        o = self.options
        span_tokens = min(ctx.budget, o.max_words * o.max_word_tokens)
        word_tokens = min(ctx.budget, o.max_word_tokens)
        k = max(2, o.branches)
        anchor = None
        tops: dict[int, list[tuple[int, float]]] = {}
        if o.policy == "anchored":
            # the anchor alone first: while it is confident, no other model is asked anything
            anchor = self.live_anchor(ctx)
            if o.draft_words:
                drafted = self._draft_step(ctx, anchor)
                if drafted is not None:
                    return drafted  # else: another model would say otherwise at the first word
            tops[anchor], margin = self.anchor_top(ctx, anchor, k)
            if margin >= o.theta:
                return self._anchor_step(ctx, anchor, margin, span_tokens)
        tops.update(each(ctx, lambda m, s: s.next_top(k), [m for m in ctx.live if m not in tops]))
        tops = {m: tops[m] for m in sorted(tops)}
        margins = {m: top_margin(top) for m, top in tops.items()}
        confident = {m: x >= o.theta for m, x in margins.items()}

        def propose(m: int, s) -> tuple[Rollout, list[Rollout]]:
            if confident[m] or o.branches == 1 or anchor is not None:  # anchored: no branches
                return self._propose(s, confident[m], span_tokens), []
            # Diversity: the top-B first tokens (the greedy one is the proposal), each rolled to a
            # word boundary; all branches advance together, one batched pass per step.
            firsts = [t for t, _ in tops[m][: o.branches]]
            branch_rolls = s.rollout_branches(firsts, word_tokens, until=lambda r: first_word_end(r.text))
            return branch_rolls[0], branch_rolls[1:]

        proposed = each(ctx, propose, list(tops))
        rolls = {m: r for m, (r, _) in proposed.items()}
        pool: list[Candidate] = []
        for m, (_, branches) in proposed.items():
            for r in branches:
                tokens = {m: max(r.text_tokens, 1)}
                add_candidate(
                    pool, Candidate(r.text, eos=r.finished and not r.text, proposers=[m], kind="branch", tokens=tokens)
                )
        proposals = []
        for m, r in rolls.items():
            c = Candidate(r.text, eos=r.finished and not r.text, proposers=[m], tokens={m: max(r.text_tokens, 1)})
            proposals.append(c)
        # proposals come before branches: ties favour a model's own greedy choice
        merged: list[Candidate] = []
        for c in proposals + pool:
            add_candidate(merged, c)

        direct = None
        overridden = None
        if anchor is not None:
            if len(merged) == 1:
                direct = 0
        elif o.policy == "agree" and all(confident[m] for m in rolls) and len({c.key for c in proposals}) == 1:
            direct = 0
        elif o.policy == "per-proposal" and any(confident[m] for m in rolls):
            best = max(rolls, key=lambda m: (margins[m], -m))
            direct = next(i for i, c in enumerate(merged) if best in c.proposers and c.kind == "proposal")
        elif len(merged) == 1:
            direct = 0  # nothing to choose between: no scoring
        decision = self.decide(ctx, merged) if direct is None else None
        winner = decision.winner if decision is not None else direct
        margins_trace = {self.names[m]: round(x, 5) for m, x in margins.items()}
        if self.controller is not None and decision is not None:
            # the same features as its training read off traces (fusion.controller)
            rows = round_features(candidate_trace(merged, self.names, decision), self.names, margins_trace,
                                  len(ctx.generated))  # fmt: skip
            winner = self.controller.choose(rows)
        elif anchor is not None and decision is not None:
            winner, overridden = anchor_stands(merged, decision, anchor, o.override_margin)
        w = merged[winner]
        source = w.proposers[0]
        finished = w.eos or (rolls[source].finished and w.text == rolls[source].text and w.kind == "proposal")
        return decided_step(
            merged,
            winner,
            decision,
            self.names,
            finished,
            confident=direct is not None,
            margins=margins_trace,
            detail_type=self.Detail,
            overridden=overridden,
        )

    def _anchor_step(self, ctx: StepContext, anchor: int, margin: float, span_tokens: int) -> Step:
        """The confident anchor's span, committed with no other model asked."""
        r = self._propose(ctx.sessions[anchor], True, span_tokens)
        return self.anchor_alone(anchor, r.text, r.finished, r.text_tokens, margin)

    def _draft_step(self, ctx: StepContext, anchor: int) -> Step | None:
        """Speculate, then collaborate: the anchor drafts up to `draft_words` words greedily, the
        others read the draft in one pass each, and the draft is committed up to the first word
        where the anchor is unsure and another model's greedy word differs (what the word-by-word
        rounds would score there). None when that is the first word: a collaborative round decides."""
        o = self.options
        s = ctx.sessions[anchor]

        def until(r: Rollout) -> int | None:
            ends = word_ends(r.text, o.draft_words)
            return ends[-1] if len(ends) == o.draft_words else None

        draft = s.rollout(min(ctx.budget, o.draft_words * o.max_word_tokens), until=until)
        text = draft.text
        starts = [x for x in [0, *word_ends(text, o.draft_words)] if x < len(text)]  # where each word begins
        unsure = [x for x in starts if draft.margins[token_at(draft, x)] < o.theta]
        others = [m for m in ctx.live if m != anchor]
        stop = len(text)
        if unsure and others:
            follows = each(ctx, lambda m, sess: sess.follow(text), others)
            for x in unsure:
                word = text[x : next((e for e in starts if e > x), len(text))]
                if not all(f.greedy_word(x) == word for f in follows.values()):
                    stop = x
                    break
        if (
            stop == len(text)
            and not draft.finished
            and stop not in draft.token_offsets
            and stop < len(s.continuation_text(draft.token_ids))
        ):
            # The draft's end falls inside one of the anchor's tokens (":\n"): cut there, the text
            # would be read back tokenized otherwise and steer the anchor (" \n"). Commit up to the
            # last word start that a token starts at too; the rest is drafted again (cached).
            clean = [x for x in starts[1:] if x in draft.token_offsets]
            stop = clean[-1] if clean else stop
        if stop == 0:
            return None
        tokens = sum(1 for off in draft.token_offsets if off < stop)
        margin = draft.margins[0] if draft.margins else None
        checked = sum(1 for x in unsure if x < stop)
        return self.anchor_alone(
            anchor, text[:stop], draft.finished and stop == len(text), tokens, margin, checked=checked
        )

"""Beam search: vLLM's output types, and the search as transformers runs it.

The engine runs a beam-search request as one SequenceGroup whose sequences are
its live beams. Each step every beam computes one token and returns its best
next tokens (as logprobs); ``BeamSearch.step`` picks the next beams; the engine
forks the sequence of a beam kept more than once (blocks shared,
copy-on-write) and frees the beams dropped. Nothing is recomputed between steps.

The selection is transformers' ``generate(num_beams=...)`` (its vectorised
``_beam_search``, with ``early_stopping="never"``), so that results equal it:

- Each step considers the ``num_candidates = max(2, 1 + #EOS ids) *
  beam_width`` best continuations of all live beams, by cumulative logprob.
- In that order: a candidate ending in EOS, or reaching max_tokens, is a
  finished hypothesis if it is among the first ``beam_width`` candidates
  (else it is dropped); the first ``beam_width`` others are the next beams.
- A hypothesis scores ``cum_logprob / L ** length_penalty`` with L its number
  of generated tokens, EOS included and the prompt not; the ``beam_width`` best
  are kept, and returned best first.
- The search ends at max_tokens, or as soon as no live beam can beat the worst
  kept hypothesis. The bound is exact, so stopping never changes the result:
  logprobs are <= 0, so continuing never raises a cumulative logprob, and a
  longer L helps only when length_penalty > 0 (then the best L is max_tokens).

NOTE: vLLM's earlier ``LLM.beam_search`` counted the prompt in L and not the
EOS token, and kept every EOS candidate it saw, so it may rank differently.
"""
import heapq
from dataclasses import dataclass

from vllm.outputs import Logprob


@dataclass
class BeamSearchSequence:
    """One sequence returned by ``LLM.beam_search``."""
    tokens: list[int]  # the prompt's, then the generated ones
    # For each generated token, the candidates of its step (it among them).
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float = 0.0
    text: str | None = None  # the decoded tokens, prompt included
    finish_reason: str | None = None  # "stop" (EOS) or "length"
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    """The ``beam_width`` best sequences of one prompt, best first."""
    sequences: list[BeamSearchSequence]


@dataclass
class Beam:
    """A live beam: its generated tokens and what they cost."""
    token_ids: list[int]
    cum_logprob: float
    logprobs: list[dict[int, Logprob]]


@dataclass
class Hypothesis:
    """A finished sequence and its length-penalised score."""
    score: float
    beam: Beam
    finish_reason: str


class BeamSearch:
    """The state of one beam-search request, advanced one token per step."""

    def __init__(self, beam_width: int, max_tokens: int, length_penalty: float,
                 eos_token_ids: set[int]) -> None:
        self.beam_width = beam_width
        self.max_tokens = max_tokens
        self.length_penalty = length_penalty
        self.eos_token_ids = eos_token_ids
        # Enough that beam_width candidates survive even when every beam's
        # best continuations are EOS tokens.
        self.num_candidates = max(2, 1 + len(eos_token_ids)) * beam_width
        self.num_generated = 0
        self.finished: list[Hypothesis] = []  # best first
        self.done = False

    def step(self, beams: list[Beam],
             candidates: list[dict[int, Logprob]]) -> list[tuple[int, int]]:
        """Advance by one token. ``candidates[i]`` holds the best next tokens
        of ``beams[i]`` (at least ``num_candidates``, or the whole
        vocabulary). Returns the next beams as (index of the beam it extends,
        token id), best first; [] once the search is done."""
        self.num_generated += 1
        at_max = self.num_generated >= self.max_tokens
        pool = heapq.nlargest(self.num_candidates,
                              ((beams[i].cum_logprob + lp.logprob, i, token)
                               for i, row in enumerate(candidates)
                               for token, lp in row.items()),
                              key=lambda c: c[0])
        next_beams: list[tuple[int, int]] = []
        best_live = None
        for rank, (cum_logprob, i, token) in enumerate(pool):
            is_eos = token in self.eos_token_ids
            if is_eos or at_max:
                if rank < self.beam_width:
                    beam = Beam(beams[i].token_ids + [token], cum_logprob,
                                beams[i].logprobs + [candidates[i]])
                    self._add_finished(beam, "stop" if is_eos else "length")
            elif len(next_beams) < self.beam_width:
                next_beams.append((i, token))
                if best_live is None:
                    best_live = cum_logprob
        self.done = best_live is None or not self._can_improve(best_live)
        return [] if self.done else next_beams

    def _score(self, cum_logprob: float, length: int) -> float:
        return cum_logprob / length**self.length_penalty

    def _add_finished(self, beam: Beam, finish_reason: str) -> None:
        score = self._score(beam.cum_logprob, self.num_generated)
        self.finished.append(Hypothesis(score, beam, finish_reason))
        self.finished.sort(key=lambda h: h.score, reverse=True)
        del self.finished[self.beam_width:]

    def _can_improve(self, best_live_logprob: float) -> bool:
        """Whether a continuation of the best live beam could still enter
        the kept hypotheses."""
        if len(self.finished) < self.beam_width:
            return True
        length = (self.max_tokens
                  if self.length_penalty > 0 else self.num_generated)
        best = self._score(best_live_logprob, length)
        return best > self.finished[-1].score

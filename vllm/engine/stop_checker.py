"""Decides, after each new token, whether a sequence has finished and why.

vLLM's order: min_tokens, EOS, stop token ids, stop strings, max_tokens, then
the model's context length. The engine asks about the token first
(``check_stop_token``), because a stop token's text is not shown unless
``include_stop_str_in_output``, then about the text (``check_stop_text_and_length``).
"""
from vllm.sampling_params import SamplingParams
from vllm.sequence import Sequence, SequenceStatus


class StopChecker:

    def __init__(self, max_model_len: int, eos_token_ids: set[int]) -> None:
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids

    def check_stop_token(self, seq: Sequence, params: SamplingParams) -> bool:
        """Finish the sequence if its last token is EOS or a stop token id."""
        if len(seq.output_token_ids) < params.min_tokens:
            return False
        last_token = seq.output_token_ids[-1]
        if not params.ignore_eos and last_token in self.eos_token_ids:
            seq.status = SequenceStatus.FINISHED_STOPPED
            return True
        if last_token in (params.stop_token_ids or ()):
            seq.status = SequenceStatus.FINISHED_STOPPED
            seq.stop_reason = last_token
            return True
        return False

    def check_stop_text_and_length(self, seq: Sequence, new_char_count: int,
                                   params: SamplingParams) -> None:
        num_outputs = len(seq.output_token_ids)
        if num_outputs < params.min_tokens:
            return
        stop_str = self._find_stop_string(seq, new_char_count, params)
        if stop_str is not None:
            seq.status = SequenceStatus.FINISHED_STOPPED
            seq.stop_reason = stop_str
        elif params.max_tokens is not None and num_outputs >= params.max_tokens:
            seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED
        elif seq.num_tokens >= self.max_model_len:
            seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED

    @staticmethod
    def _find_stop_string(seq: Sequence, new_char_count: int,
                          params: SamplingParams) -> str | None:
        """Look for a stop string ending in the new text; cut the text there."""
        if not params.stop or not new_char_count:
            return None
        text = seq.output_text
        for stop in params.stop:
            # A match may start up to len(stop) - 1 characters before the
            # new text, when the stop string spans several tokens.
            start = max(0, len(text) - new_char_count - len(stop) + 1)
            idx = text.find(stop, start)
            if idx == -1:
                continue
            end = idx + len(stop) if params.include_stop_str_in_output else idx
            seq.output_text = text[:end]
            return stop
        return None

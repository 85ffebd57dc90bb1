"""LLM.beam_search against transformers' generate(num_beams=...) on a tiny
random Llama (fp32, CPU): the same sequences in the same order.

HF settings, and why: do_sample=False (no sampling, beams ranked by
log-probabilities), num_return_sequences=beam_width (all kept hypotheses, best
first) and early_stopping="never": our search stops only when no live beam can
beat the kept hypotheses any more (an exact bound), which is what "never"
does; HF's default (False) stops on a heuristic bound and can return other
sequences when length_penalty > 0. EOS is made likely (its lm_head row is
scaled up) so that hypotheses end both by EOS and by max_tokens."""
import random
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, PreTrainedModel

from tests.models.utils import build_random_model
from vllm import LLM, EngineArgs, LLMEngine
from vllm.beam_search import BeamSearchOutput
from vllm.sampling_params import BeamSearchParams

EOS = 2
MAX_TOKENS = 16
_rng = random.Random(0)
PROMPTS = [[_rng.randrange(3, 512) for _ in range(n)] for n in (1, 5, 12, 30)]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory,
               stories260k_path: Path) -> tuple[Path, PreTrainedModel]:
    model_dir = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(vocab_size=512,
                         hidden_size=64,
                         intermediate_size=128,
                         num_hidden_layers=2,
                         num_attention_heads=4,
                         num_key_value_heads=2,
                         max_position_embeddings=256,
                         bos_token_id=1,
                         eos_token_id=EOS,
                         tie_word_embeddings=False)
    model = build_random_model(config, model_dir, stories260k_path)
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 2.5
    model.save_pretrained(model_dir)
    # generate() would fill an unset eos_token_id from here: the tests pass
    # it explicitly.
    model.generation_config.eos_token_id = None
    return model_dir, model


@pytest.fixture(scope="module")
def llm(tiny_llama) -> LLM:
    return LLM(str(tiny_llama[0]),
               device="cpu",
               dtype="float32",
               max_model_len=256,
               block_size=8)


def hf_beam_search(model: PreTrainedModel, prompt: list[int], beam_width: int,
                   length_penalty: float,
                   ignore_eos: bool) -> tuple[list[list[int]], list[float]]:
    """HF's generated tokens (up to and with EOS) and scores, best first."""
    config = GenerationConfig(num_beams=beam_width,
                              num_return_sequences=beam_width,
                              do_sample=False,
                              max_new_tokens=MAX_TOKENS,
                              length_penalty=length_penalty,
                              early_stopping="never",
                              eos_token_id=None if ignore_eos else EOS,
                              pad_token_id=0,
                              return_dict_in_generate=True,
                              output_scores=True)
    out = model.generate(torch.tensor([prompt]), generation_config=config)
    sequences = []
    for row in out.sequences.tolist():
        generated = row[len(prompt):]
        if not ignore_eos and EOS in generated:
            generated = generated[:generated.index(EOS) + 1]  # then padding
        sequences.append(generated)
    return sequences, out.sequences_scores.tolist()


def _ours(out: BeamSearchOutput, prompt: list[int]) -> list[list[int]]:
    return [s.tokens[len(prompt):] for s in out.sequences]


@pytest.mark.parametrize("beam_width", [2, 4])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0, -1.0])
def test_equals_transformers(llm: LLM, tiny_llama, beam_width: int,
                             length_penalty: float) -> None:
    model = tiny_llama[1]
    params = BeamSearchParams(beam_width=beam_width,
                              max_tokens=MAX_TOKENS,
                              length_penalty=length_penalty)
    outputs = llm.beam_search([{
        "prompt_token_ids": p
    } for p in PROMPTS], params)
    ends = set()
    for prompt, out in zip(PROMPTS, outputs):
        hf_sequences, hf_scores = hf_beam_search(model, prompt, beam_width,
                                                 length_penalty, False)
        assert _ours(out, prompt) == hf_sequences, prompt
        for seq, hf_score in zip(out.sequences, hf_scores):
            generated = seq.tokens[len(prompt):]
            score = seq.cum_logprob / len(generated)**length_penalty
            assert score == pytest.approx(hf_score, abs=1e-4)
            ends.add(seq.finish_reason)
            assert (seq.finish_reason == "stop") == (generated[-1] == EOS)
    # both ways of ending are covered: short ones win unless longer ones
    # are favoured
    assert ("stop" if length_penalty <= 1.0 else "length") in ends


def test_ignore_eos_equals_transformers_without_eos(llm: LLM,
                                                    tiny_llama) -> None:
    params = BeamSearchParams(beam_width=3,
                              max_tokens=MAX_TOKENS,
                              ignore_eos=True)
    outputs = llm.beam_search([{
        "prompt_token_ids": p
    } for p in PROMPTS[:2]], params)
    for prompt, out in zip(PROMPTS, outputs):
        hf_sequences, _ = hf_beam_search(tiny_llama[1], prompt, 3, 1.0, True)
        assert _ours(out, prompt) == hf_sequences
        assert all(
            len(s.tokens) == len(prompt) + MAX_TOKENS for s in out.sequences)


def test_output_shape(llm: LLM) -> None:
    out = llm.beam_search("Once upon a time",
                          BeamSearchParams(beam_width=3, max_tokens=8))[0]
    tokenizer = llm.get_tokenizer()
    prompt = tokenizer.encode("Once upon a time")
    assert len(out.sequences) == 3
    for seq in out.sequences:
        assert seq.tokens[:len(prompt)] == prompt
        assert seq.text == tokenizer.decode(seq.tokens)
        generated = seq.tokens[len(prompt):]
        assert len(seq.logprobs) == len(generated)
        total = 0.0
        for token, step in zip(generated, seq.logprobs):
            assert token in step
            assert step[token].decoded_token == tokenizer.decode([token])
            total += step[token].logprob
        assert seq.cum_logprob == pytest.approx(total, abs=1e-5)


def _engine(path: Path, **kwargs) -> LLMEngine:
    return LLMEngine.from_engine_args(
        EngineArgs(model=str(path),
                   device="cpu",
                   dtype="float32",
                   max_model_len=64,
                   block_size=8,
                   **kwargs))


def _run(engine: LLMEngine, params: BeamSearchParams) -> list[list[list[int]]]:
    for i, prompt in enumerate(PROMPTS):
        engine.add_beam_search_request(str(i), {"prompt_token_ids": prompt},
                                       params)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    total = engine.executor.num_gpu_blocks
    assert engine.scheduler.block_manager.get_num_free_gpu_blocks() == total
    return [[c.token_ids for c in finished[str(i)].outputs]
            for i in range(len(PROMPTS))]


@pytest.mark.parametrize("engine_kwargs", [
    dict(num_gpu_blocks_override=14),
    dict(num_gpu_blocks_override=14, preemption_mode="swap", swap_space=0.002),
    dict(num_gpu_blocks_override=14, enable_prefix_caching=True),
],
                         ids=["recompute", "swap", "prefix-caching"])
def test_same_beams_under_memory_pressure(tiny_llama,
                                          engine_kwargs: dict) -> None:
    """Beams forked and dropped while groups are preempted: the blocks
    that beams share must survive recompute and swap intact."""
    params = BeamSearchParams(beam_width=4,
                              max_tokens=MAX_TOKENS,
                              length_penalty=2.0)
    reference = _run(_engine(tiny_llama[0]), params)
    engine = _engine(tiny_llama[0], **engine_kwargs)
    assert _run(engine, params) == reference
    assert engine.scheduler.num_cumulative_preemption > 0


def test_each_step_computes_one_token_per_beam(tiny_llama) -> None:
    engine = _engine(tiny_llama[0])
    computed: list[int] = []
    execute = engine.executor.execute_model

    def counting(scheduled, *args):
        computed.append(sum(len(s.token_ids) for s in scheduled))
        return execute(scheduled, *args)

    engine.executor.execute_model = counting  # type: ignore[method-assign]
    prompt = PROMPTS[3]
    engine.add_beam_search_request(
        "a", {"prompt_token_ids": prompt},
        BeamSearchParams(beam_width=4, max_tokens=MAX_TOKENS, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert computed[0] == len(prompt)  # the prompt once
    assert computed[1:] == [4] * (MAX_TOKENS - 1)  # no recomputation


@pytest.mark.parametrize("kwargs", [
    dict(beam_width=0, max_tokens=4),
    dict(beam_width=2, max_tokens=0),
    dict(beam_width=2, max_tokens=4, temperature=-1.0),
    dict(beam_width=2, max_tokens=4, length_penalty=float("nan")),
])
def test_bad_params_are_rejected(kwargs: dict) -> None:
    field = next(name for name, value in kwargs.items()
                 if value in (0, -1.0) or value != value)
    with pytest.raises(ValueError, match=field):
        BeamSearchParams(**kwargs)


def test_beam_width_beyond_the_vocabulary_is_rejected(llm: LLM) -> None:
    with pytest.raises(ValueError, match="beam_width=300"):
        llm.beam_search("The dog", BeamSearchParams(beam_width=300,
                                                    max_tokens=4))
    assert not llm.llm_engine.has_unfinished_requests()

"""The GPU fast path end to end: which attention backend runs, CUDA graphs, and
mixed batches (chunked prefill, prefix-cache hits, decodes) on the CUDA and
Triton kernels giving the same tokens as the torch reference backend."""
import random
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from tests.models.utils import build_random_model
from tests.utils import check_outputs_equal
from vllm import LLM, SamplingParams
from vllm.worker.model_runner import ModelRunner


def _runner(llm: LLM) -> ModelRunner:
    return llm.llm_engine.executor.worker.model_runner


@pytest.fixture(scope="module")
def head64_model(tmp_path_factory: pytest.TempPathFactory,
                 stories260k_path: Path) -> Path:
    """A random Llama with head_size 64, GQA 2 (a shape TRITON_ATTN runs)."""
    path = tmp_path_factory.mktemp("head64")
    config = LlamaConfig(vocab_size=512,
                         hidden_size=256,
                         intermediate_size=512,
                         num_hidden_layers=2,
                         num_attention_heads=4,
                         num_key_value_heads=2,
                         max_position_embeddings=1024,
                         bos_token_id=1,
                         eos_token_id=2)
    build_random_model(config, path, stories260k_path)
    return path


def test_forced_backend_that_cannot_run_is_an_error(
        monkeypatch: pytest.MonkeyPatch, stories260k_path: Path) -> None:
    monkeypatch.setenv("VLLM_ATTENTION_BACKEND", "TRITON_ATTN")
    with pytest.raises(ValueError, match="TRITON_ATTN cannot run"):
        LLM(str(stories260k_path), device="cpu")


@pytest.mark.cuda
def test_backend_choice(head64_model: Path, stories260k_path: Path) -> None:
    llm = LLM(str(head64_model), gpu_memory_utilization=0.3)
    runner = _runner(llm)
    assert runner.attention_layers()[0].backend.name == "TRITON_ATTN"
    assert runner.graph_runner is not None
    # stories260K's head_size 8 has no GPU kernel: the reference runs.
    tiny = LLM(str(stories260k_path), gpu_memory_utilization=0.3)
    assert _runner(tiny).attention_layers()[0].backend.name == "TORCH_SDPA"
    eager = LLM(str(head64_model),
                gpu_memory_utilization=0.3,
                enforce_eager=True)
    assert _runner(eager).graph_runner is None


def _mixed_prompts() -> list[list[int]]:
    """Prompts sharing prefixes of several lengths (prefix-cache hits, some
    ending mid-block), and lengths around the block size."""
    rng = random.Random(0)
    base = [rng.randrange(3, 512) for _ in range(300)]
    prompts = [
        base[:n] + [rng.randrange(3, 512) for _ in range(extra)]
        for n, extra in [(300, 5), (100, 17), (33, 1), (16, 0), (299,
                                                                 40), (64, 64)]
    ]
    prompts += [[rng.randrange(3, 512) for _ in range(n)]
                for n in (1, 15, 17, 250)]
    return prompts


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mixed_batches_match_reference_backend(
        dtype: str, head64_model: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunked prefill (64-token budget: prompts span many steps and share
    them with decodes), prefix caching and CUDA graphs on the GPU kernels give
    the reference backend's tokens (fp32: all equal; bf16: the first 8)."""
    prompts = _mixed_prompts()
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

    def run(backend: str) -> list[list[int]]:
        monkeypatch.setenv("VLLM_ATTENTION_BACKEND", backend)
        llm = LLM(str(head64_model),
                  dtype=dtype,
                  max_num_batched_tokens=64,
                  max_num_seqs=8,
                  enable_prefix_caching=True,
                  gpu_memory_utilization=0.3)
        # Twice: the second pass hits the prefix cache.
        llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        assert sum(o.num_cached_tokens or 0 for o in outs) > 0
        return [list(o.outputs[0].token_ids) for o in outs]

    fast, reference = run("TRITON_ATTN"), run("TORCH_SDPA")
    if dtype == "bfloat16":  # rounding may flip a near-tie late in a run
        fast = [t[:8] for t in fast]
        reference = [t[:8] for t in reference]
    check_outputs_equal(reference, fast, "TORCH_SDPA", "TRITON_ATTN")


@pytest.mark.cuda
def test_cuda_graphs_replay_decodes(head64_model: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode steps replay graphs, padded to a captured size; outputs equal
    the eager run's (fp32)."""
    prompts = [[5 + i] * (3 + 7 * i) for i in range(5)]  # 5: pads to 8
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)

    def run(enforce_eager: bool) -> tuple[list[list[int]], int]:
        llm = LLM(str(head64_model),
                  dtype="float32",
                  enforce_eager=enforce_eager,
                  gpu_memory_utilization=0.3)
        replays = []
        graph_runner = _runner(llm).graph_runner
        if graph_runner is not None:
            original = graph_runner.replay

            def counting_replay(size: int) -> torch.Tensor:
                replays.append(size)
                return original(size)

            monkeypatch.setattr(graph_runner, "replay", counting_replay)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        return [list(o.outputs[0].token_ids) for o in outs], len(replays)

    graphs, num_replays = run(False)
    eager, no_replays = run(True)
    assert num_replays >= 15 and no_replays == 0
    check_outputs_equal(eager, graphs, "eager", "graphs")


@pytest.mark.cuda
def test_sampler_graphs_sample_what_eager_launches_sample(
        head64_model: Path) -> None:
    """Seeded sampling with every fused feature: the sampler's CUDA graphs
    (a steady batch replays its launches) give the tokens and logprobs of
    a sampler that launches at every step (fp32; the model's decode graphs
    in both runs, so that the logits are the same)."""
    prompts = [[5 + i] * (3 + 7 * i) for i in range(5)]
    params = [
        SamplingParams(temperature=0.9,
                       seed=10 + i,
                       presence_penalty=0.4,
                       frequency_penalty=0.2,
                       repetition_penalty=1.2,
                       logit_bias={7: 1.5},
                       min_p=0.01,
                       top_n_sigma=2.5 if i % 2 else None,
                       logprobs=3,
                       max_tokens=16,
                       ignore_eos=True) for i in range(len(prompts))
    ]

    def run(sampler_graphs: bool) -> tuple[list, list, int]:
        llm = LLM(str(head64_model),
                  dtype="float32",
                  gpu_memory_utilization=0.3)
        sampler = _runner(llm).sampler
        if not sampler_graphs:
            sampler.graphs = None
        outs = llm.generate([{
            "prompt_token_ids": p
        } for p in prompts],
                            params,
                            use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        logprobs = [{
            (i, token): lp.logprob
            for i, step in enumerate(o.outputs[0].logprobs or [])
            for token, lp in step.items()
        } for o in outs]
        return tokens, logprobs, (sampler.graphs.captures
                                  if sampler.graphs is not None else 0)

    tokens, logprobs, captures = run(True)
    eager_tokens, eager_logprobs, _ = run(False)
    assert captures >= 1
    assert tokens == eager_tokens
    assert logprobs == [pytest.approx(lp, abs=1e-5) for lp in eager_logprobs]


@pytest.mark.cuda
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_launching_a_step_never_waits_for_the_device(
        head64_model: Path, enforce_eager: bool) -> None:
    """Async scheduling overlaps the host with the GPU only if queueing a
    step (scheduling, inputs, placeholders, forward, sampler, the copy of
    the sampled ids) never waits for work queued after the previous step.
    A GPU spin is queued before each launch: it must still be running when
    the launch returns."""
    llm = LLM(str(head64_model),
              gpu_memory_utilization=0.3,
              enforce_eager=enforce_eager)
    params = SamplingParams(temperature=0.8,
                            seed=3,
                            max_tokens=12,
                            ignore_eos=True,
                            logprobs=2)
    prompts = [{
        "prompt_token_ids": list(range(3, 40))
    }, {
        "prompt_token_ids": list(range(5, 9))
    }]
    expected = llm.generate(prompts, params, use_tqdm=False)  # JIT warm-up
    engine = llm.llm_engine
    execute = engine.executor.execute_model
    spin_running: list[bool] = []

    def launch(*args):
        torch.cuda._sleep(100_000_000)  # about 50 ms of GPU time
        spun = torch.cuda.Event()
        spun.record()
        pending = execute(*args)
        spin_running.append(not spun.query())
        return pending

    engine.executor.execute_model = launch  # type: ignore[method-assign]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids
            for o in outputs] == [o.outputs[0].token_ids for o in expected]
    assert len(spin_running) >= 12 and all(spin_running)

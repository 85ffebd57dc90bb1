"""A worker owns one device: it loads the model, sizes and allocates the KV cache
and runs the model runner for each step."""
import torch

from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.sequence import ScheduledSequence
from vllm.worker.cache_engine import CacheEngine, kv_cache_block_bytes
from vllm.worker.model_runner import ModelRunner, PendingOutput

logger = init_logger(__name__)

_GiB = 1 << 30


class Worker:

    def __init__(self, vllm_config: VllmConfig) -> None:
        self.vllm_config = vllm_config
        self.device = vllm_config.device_config.device
        self.model_runner = ModelRunner(vllm_config)
        self.cache_engine: CacheEngine | None = None

    def init_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.cuda.empty_cache()
        torch.manual_seed(self.vllm_config.model_config.seed)

    def load_model(self) -> None:
        self.model_runner.load_model()

    def determine_num_available_blocks(self) -> int:
        """How many KV-cache blocks fit: on CUDA what gpu_memory_utilization
        leaves after weights and the peak activations of a profiling forward;
        on the CPU, VLLM_CPU_KVCACHE_SPACE GiB."""
        cache_config = self.vllm_config.cache_config
        block_bytes = kv_cache_block_bytes(self.vllm_config.model_config,
                                           cache_config)
        if cache_config.num_gpu_blocks_override is not None:
            return cache_config.num_gpu_blocks_override
        if self.device.type != "cuda":
            return int(cache_config.cpu_kvcache_space_gib * _GiB) // block_bytes

        sched = self.vllm_config.scheduler_config
        torch.cuda.reset_peak_memory_stats(self.device)
        self.model_runner.profile_run(sched.max_num_batched_tokens,
                                      sched.max_num_seqs)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        _, total = torch.cuda.mem_get_info(self.device)
        # Memory other processes or libraries hold outside torch's allocator.
        free, _ = torch.cuda.mem_get_info(self.device)
        non_torch = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * cache_config.gpu_memory_utilization
        available = budget - peak - max(non_torch, 0)
        torch.cuda.empty_cache()
        logger.info(
            "Memory profile: total %.2f GiB, budget %.2f GiB, peak torch "
            "%.2f GiB (weights + activations), other %.2f GiB, KV cache "
            "%.2f GiB", total / _GiB, budget / _GiB, peak / _GiB,
            non_torch / _GiB,
            max(available, 0) / _GiB)
        return max(int(available) // block_bytes, 0)

    def initialize_cache(self,
                         num_blocks: int,
                         num_cpu_blocks: int = 0) -> None:
        backend = self.model_runner.attention_layers()[0].backend
        self.cache_engine = CacheEngine(self.vllm_config.model_config,
                                        self.vllm_config.cache_config, backend,
                                        num_blocks, self.device, num_cpu_blocks)
        self.model_runner.bind_kv_caches(self.cache_engine.kv_caches,
                                         self.cache_engine.pad_block)
        self.model_runner.capture_cuda_graphs()

    def execute_model(
            self,
            scheduled: list[ScheduledSequence],
            blocks_to_swap_out: list[tuple[int, int]] | None = None,
            blocks_to_swap_in: list[tuple[int, int]] | None = None,
            blocks_to_copy: list[tuple[int, int]] | None = None
    ) -> PendingOutput:
        assert self.cache_engine is not None
        # Swap-outs first: their device blocks may be reused by this step;
        # copy-on-write last: its source may be a block just swapped in.
        self.cache_engine.swap_out(blocks_to_swap_out or [])
        self.cache_engine.swap_in(blocks_to_swap_in or [])
        self.cache_engine.copy_blocks(blocks_to_copy or [])
        return self.model_runner.execute_model(scheduled)

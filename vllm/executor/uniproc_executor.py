"""Runs the single worker in this process (debugger-friendly: no subprocess)."""
from vllm.config import VllmConfig
from vllm.core.block_manager import cdiv
from vllm.logger import init_logger
from vllm.sequence import ScheduledSequence
from vllm.worker.cache_engine import num_cpu_swap_blocks
from vllm.worker.model_runner import PendingOutput
from vllm.worker.worker import Worker

logger = init_logger(__name__)


class UniProcExecutor:

    def __init__(self, vllm_config: VllmConfig) -> None:
        self.vllm_config = vllm_config
        self.worker = Worker(vllm_config)
        self.worker.init_device()
        self.worker.load_model()
        self.num_gpu_blocks = self._initialize_kv_cache()

    def _initialize_kv_cache(self) -> int:
        cache = self.vllm_config.cache_config
        max_len = self.vllm_config.model_config.max_model_len
        blocks_per_seq = cdiv(max_len, cache.block_size)
        num_blocks = self.worker.determine_num_available_blocks()
        if cache.num_gpu_blocks_override is None:
            # More blocks than max_num_seqs full-length sequences can use
            # would only hold memory (4 GiB of zeros for a tiny model on CPU).
            max_seqs = self.vllm_config.scheduler_config.max_num_seqs
            num_blocks = min(num_blocks, max_seqs * blocks_per_seq)
        if num_blocks < blocks_per_seq:
            raise ValueError(
                f"The KV cache has room for {num_blocks * cache.block_size} "
                f"tokens ({num_blocks} blocks of {cache.block_size}), fewer "
                f"than one sequence of max_model_len={max_len}. Increase "
                "gpu_memory_utilization (CUDA), VLLM_CPU_KVCACHE_SPACE (CPU) "
                "or num_gpu_blocks_override, or decrease max_model_len.")
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens); maximum "
            "concurrency for %d-token requests: %.2fx", num_blocks,
            cache.block_size, num_blocks * cache.block_size, max_len,
            num_blocks / blocks_per_seq)
        self.num_cpu_blocks = 0
        if self.vllm_config.scheduler_config.preemption_mode == "swap":
            self.num_cpu_blocks = num_cpu_swap_blocks(
                self.vllm_config.model_config, cache)
            logger.info("Swap space: %d CPU blocks (%.1f GiB)",
                        self.num_cpu_blocks, cache.swap_space)
        self.worker.initialize_cache(num_blocks, self.num_cpu_blocks)
        return num_blocks

    def execute_model(
            self,
            scheduled: list[ScheduledSequence],
            blocks_to_swap_out: list[tuple[int, int]] | None = None,
            blocks_to_swap_in: list[tuple[int, int]] | None = None,
            blocks_to_copy: list[tuple[int, int]] | None = None
    ) -> PendingOutput:
        """Launch one step (see ``ModelRunner.execute_model``)."""
        return self.worker.execute_model(scheduled, blocks_to_swap_out,
                                         blocks_to_swap_in, blocks_to_copy)

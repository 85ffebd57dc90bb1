from vllm.model_executor.model_loader.loader import (get_model,
                                                     get_model_architecture)

__all__ = ["get_model", "get_model_architecture"]

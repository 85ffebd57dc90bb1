"""Logging for vLLM: ``init_logger(__name__)`` in every module.

The "vllm" logger gets one stream handler at ``VLLM_LOGGING_LEVEL`` unless
``VLLM_CONFIGURE_LOGGING=0``. ``VLLM_TRACE_FUNCTION=1`` additionally records every
function call made inside the vllm package to a file (see ``enable_trace_function_call``).
"""
import datetime
import logging
import os
import sys
import tempfile
import threading
from types import FrameType
from typing import Any

from vllm import envs

_FORMAT = "%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s"
_DATE_FORMAT = "%m-%d %H:%M:%S"
_root_configured = False


def _configure_vllm_root_logger() -> None:
    global _root_configured
    if _root_configured or not envs.VLLM_CONFIGURE_LOGGING:
        return
    _root_configured = True
    root = logging.getLogger("vllm")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        logging.Formatter(envs.VLLM_LOGGING_PREFIX + _FORMAT, _DATE_FORMAT))
    root.addHandler(handler)
    root.setLevel(envs.VLLM_LOGGING_LEVEL)
    root.propagate = False


def init_logger(name: str) -> logging.Logger:
    """The logger for a module of the vllm package."""
    _configure_vllm_root_logger()
    return logging.getLogger(name)


def enable_trace_function_call(log_path: str | None = None) -> str:
    """Write one line per call of a vllm function to ``log_path`` (debug only).

    Returns the path. Every thread started afterwards is traced too.
    """
    if log_path is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        log_path = os.path.join(tempfile.gettempdir(),
                                f"vllm_trace_{os.getpid()}_{stamp}.log")
    package_root = os.path.dirname(os.path.abspath(__file__))
    log_file = open(log_path, "a", buffering=1)  # noqa: SIM115

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "call":
            filename = frame.f_code.co_filename
            if filename.startswith(package_root):
                caller = frame.f_back
                where = (f"{caller.f_code.co_filename}:{caller.f_lineno}"
                         if caller else "?")
                log_file.write(f"{datetime.datetime.now()} call "
                               f"{frame.f_code.co_name} "
                               f"{filename}:{frame.f_lineno} from {where}\n")
        return None

    sys.settrace(tracer)
    threading.settrace(tracer)
    init_logger(__name__).warning(
        "VLLM_TRACE_FUNCTION is on: every call is logged to %s "
        "(slow; for debugging only).", log_path)
    return log_path

"""The process setting bench.py needs before anything imports triton."""
import os
import sys


def prepare_environment() -> None:
    """No GPU: run Triton's interpreter. It must be chosen before triton is imported."""
    import torch  # importing torch does not import triton

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules:  # too late for this process: start it again with the variable set
        os.execv(sys.executable, [sys.executable] + sys.argv)

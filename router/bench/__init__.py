"""Load generation and benchmark commands (``xllm-bench``); needs no torch or vllm."""

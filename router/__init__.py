"""xllm router: the service layer, a standalone process in front of many vLLM instances.

Imports neither torch nor vllm, so it deploys on machines that have neither.
"""

__all__: list[str] = []

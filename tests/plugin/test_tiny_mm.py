"""The ``tiny-mm`` model is built offline into what vLLM's PaliGemma path needs, and the
Pixtral import alias lets vLLM size SigLIP images without torchvision."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_mm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from xllm_plugin.models import build_model

    return build_model("tiny-mm", tmp_path_factory.mktemp("models"))


def test_tiny_mm_has_what_vllms_paligemma_needs(tiny_mm: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoProcessor

    config = json.loads((tiny_mm / "config.json").read_text())
    assert config["architectures"] == ["PaliGemmaForConditionalGeneration"]
    processor = AutoProcessor.from_pretrained(tiny_mm)
    tokenizer = processor.tokenizer
    vocab = tokenizer.get_vocab()
    assert "\n" in vocab and isinstance(tokenizer.bos_token_id, int)
    assert isinstance(getattr(tokenizer, "add_bos_token", None), bool)
    assert config["image_token_index"] == vocab["<image>"]
    assert config["text_config"]["vocab_size"] == len(tokenizer) >= 3203
    assert processor.image_seq_length == 4  # (28 / 14) ** 2 patches
    assert processor.chat_template  # PaliGemma has none of its own
    with safe_open(str(tiny_mm / "model.safetensors"), "pt") as weights:
        vision = [k for k in weights.keys() if "vision_tower." in k]  # noqa: SIM118
    assert vision and all("vision_tower.vision_model." in k for k in vision)


def test_tiny_mm_build_is_deterministic(tiny_mm: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from xllm_plugin.models import build_model

    again = build_model("tiny-mm", tmp_path)
    first, second = load_file(tiny_mm / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(first[k].equal(second[k]) for k in first)


def test_pixtral_alias_lets_vllm_size_siglip_images_without_torchvision(tiny_mm: Path) -> None:
    # A fresh interpreter: the alias edits sys.modules, and vLLM's import is the real check.
    script = (
        "import importlib.util\n"
        "from xllm_plugin.compat import alias_pixtral_image_processing\n"
        "if importlib.util.find_spec('torchvision') is None:\n"
        "    try:\n"
        "        import transformers.models.pixtral.image_processing_pixtral\n"
        "        raise SystemExit('expected the torchvision import to fail here')\n"
        "    except ImportError:\n"
        "        pass\n"
        "    assert alias_pixtral_image_processing()\n"
        "assert not alias_pixtral_image_processing()  # idempotent\n"
        "from transformers import AutoConfig\n"
        "from vllm.model_executor.models.vision import get_vision_encoder_info\n"
        f"config = AutoConfig.from_pretrained({str(tiny_mm)!r})\n"
        "print(get_vision_encoder_info(config).get_num_image_tokens(image_width=28,"
        " image_height=28))\n")
    pytest.importorskip("vllm")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "4"

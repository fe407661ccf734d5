"""Import fixes that let stock vLLM serve vision models on installs without torchvision.

vLLM's ``get_vision_encoder_info`` (used by PaliGemma, LLaVA-style and other
models for every image) imports vLLM's Pixtral module, which imports
``transformers.models.pixtral.image_processing_pixtral`` for one helper,
``_num_image_tokens``. In transformers 5 that module is the torchvision-backed
processor and fails to import without torchvision, so every image request of a
SigLIP/CLIP model fails although the model never touches Pixtral. The PIL
processor module of the same package defines the same helper; an import hook
serves its contents under the torchvision module's name. The hook is lazy (it
costs nothing until that one import happens) and is not installed where
torchvision is present.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

PIXTRAL_TORCHVISION_MODULE = "transformers.models.pixtral.image_processing_pixtral"
PIXTRAL_PIL_MODULE = "transformers.models.pixtral.image_processing_pil_pixtral"


class _PixtralPilAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers the import of the torchvision Pixtral module with the PIL module's names."""

    def find_spec(self, fullname: str, path: object = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != PIXTRAL_TORCHVISION_MODULE:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # the default module object

    def exec_module(self, module: ModuleType) -> None:
        pil = importlib.import_module(PIXTRAL_PIL_MODULE)
        module.__dict__.update({k: v for k, v in vars(pil).items() if not k.startswith("__")})


def alias_pixtral_image_processing() -> bool:
    """Install the import hook when torchvision is missing; True if installed. Idempotent."""
    if any(isinstance(finder, _PixtralPilAlias) for finder in sys.meta_path):
        return False
    if PIXTRAL_TORCHVISION_MODULE in sys.modules:
        return False
    if importlib.util.find_spec("torchvision") is not None:
        return False
    sys.meta_path.insert(0, _PixtralPilAlias())
    return True

"""Hugging Face `evaluate` modules for radgen's metrics, loadable offline by local path.

``evaluate.load("bleu")`` needs the hub; ``evaluate.load(module_path("lexical"))`` does not.
"""

from eval.hf_modules.common import MODULES, module_path

__all__ = ["MODULES", "module_path"]

"""BLEU-1..4, METEOR, ROUGE-L and CIDEr-D with pycocoevalcap (PTB tokenizer; Java).

Hugging Face `evaluate` module, loadable offline by path: ``evaluate.load(eval.hf_modules.module_path("lexical"))``.
"""
import evaluate

from eval.hf_modules.common import compute_family
from eval.hf_modules.common import metric_info


class Lexical(evaluate.Metric):
    def _info(self):
        return metric_info(__doc__, "Papineni et al. 2002; Banerjee & Lavie 2005; Lin 2004; Vedantam et al. 2015")

    def _compute(self, predictions, references):
        return compute_family(["bleu", "meteor", "rouge_l", "cider"], predictions, references)

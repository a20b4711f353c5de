"""BLEU-1..4, METEOR, ROUGE-L and CIDEr-D with pycocoevalcap (PTB tokenizer; Java), as a Hugging Face `evaluate` module loadable offline by local path:
``evaluate.load(eval.hf_modules.module_path("lexical"))``."""
import datasets
import evaluate

from eval.hf_modules.common import compute_family

_DESCRIPTION = __doc__
_KWARGS = "predictions: list of generated reports; references: list of reference reports"


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class Lexical(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="Papineni et al. 2002; Banerjee & Lavie 2005; Lin 2004; Vedantam et al. 2015", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        return compute_family(["bleu", "meteor", "rouge_l", "cider"], predictions, references)

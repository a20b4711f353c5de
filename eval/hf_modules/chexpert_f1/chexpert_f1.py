"""CheXpert-14 clinical F1 as a Hugging Face `evaluate` module, loadable offline by local path.

    import evaluate
    from eval.hf_modules import module_path
    m = evaluate.load(module_path("chexpert_f1"))
    m.compute(predictions=[...], references=[...])            # rule labeler
    m.compute(predictions=[...], references=[...], chexbert="chexbert.pth")

Scores: chexpert_f1[+]_{14,5}_{micro,macro} and per observation chexpert_f1/<obs> (see eval.chexpert.f1).
"""
import datasets
import evaluate

from eval.hf_modules.common import compute_family

_DESCRIPTION = __doc__
_KWARGS = "predictions: list of generated reports; references: list of reference reports; chexbert: optional path"


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class ChexpertF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="Irvin et al. 2019 (CheXpert); Smit et al. 2020 (CheXbert)",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references, chexbert=None):
        return compute_family("chexpert", predictions, references, chexbert=chexbert)

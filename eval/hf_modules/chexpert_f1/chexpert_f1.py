"""CheXpert-14 clinical F1 (rule labeler, or CheXbert with chexbert=PATH): chexpert_f1[+]_{14,5}_{micro,macro}
and per observation chexpert_f1/<obs> (see eval.chexpert.f1).

Hugging Face `evaluate` module, loadable offline by path: ``evaluate.load(eval.hf_modules.module_path("chexpert_f1"))``.
"""
import evaluate

from eval.hf_modules.common import compute_family
from eval.hf_modules.common import metric_info


class ChexpertF1(evaluate.Metric):
    def _info(self):
        return metric_info(__doc__, "Irvin et al. 2019 (CheXpert); Smit et al. 2020 (CheXbert)")

    def _compute(self, predictions, references, chexbert=None):
        return compute_family("chexpert", predictions, references, chexbert=chexbert)

"""RadCliQ-v1 (lower is better); needs RadGraph weights, chexbert.pth and a local distilroberta-base.

Hugging Face `evaluate` module, loadable offline by path: ``evaluate.load(eval.hf_modules.module_path("radcliq_v1"))``.
"""
import evaluate

from eval.hf_modules.common import compute_family
from eval.hf_modules.common import metric_info


class RadcliqV1(evaluate.Metric):
    def _info(self):
        return metric_info(__doc__, "Yu et al. 2023")

    def _compute(self, predictions, references, radgraph_dir=None, chexbert=None, bertscore_model=None):
        return compute_family("radcliq", predictions, references, radgraph_dir=radgraph_dir,
                              chexbert=chexbert, bertscore_model=bertscore_model)

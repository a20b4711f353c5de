"""RadGraph-F1 (simple/partial/complete) with the real RadGraph model; needs radgraph_dir.

Hugging Face `evaluate` module, loadable offline by path: ``evaluate.load(eval.hf_modules.module_path("radgraph_f1"))``.
"""
import evaluate

from eval.hf_modules.common import compute_family
from eval.hf_modules.common import metric_info


class RadgraphF1(evaluate.Metric):
    def _info(self):
        return metric_info(__doc__, "Delbrouck et al. 2022; Jain et al. 2021")

    def _compute(self, predictions, references, radgraph_dir=None, model_type="radgraph", lowercase=True):
        return compute_family("radgraph", predictions, references, radgraph_dir=radgraph_dir,
                              radgraph_model_type=model_type, radgraph_lowercase=lowercase)

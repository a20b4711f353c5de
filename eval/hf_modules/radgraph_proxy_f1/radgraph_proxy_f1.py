"""The RadGraph reward on graphs from radgen's offline rule-based extractor (a proxy, NOT RadGraph-F1).

Hugging Face `evaluate` module, loadable offline by path: ``evaluate.load(eval.hf_modules.module_path("radgraph_proxy_f1"))``.
"""
import evaluate

from eval.hf_modules.common import compute_family
from eval.hf_modules.common import metric_info


class RadgraphProxyF1(evaluate.Metric):
    def _info(self):
        return metric_info(__doc__, "Delbrouck et al. 2022 (reward definition)")

    def _compute(self, predictions, references, lowercase=True):
        return compute_family("radgraph_proxy", predictions, references, radgraph_lowercase=lowercase)

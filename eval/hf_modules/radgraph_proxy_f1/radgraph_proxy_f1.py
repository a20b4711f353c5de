"""The RadGraph reward on graphs from radgen's offline rule-based extractor (a proxy, NOT RadGraph-F1), as a Hugging Face `evaluate` module loadable offline by local path:
``evaluate.load(eval.hf_modules.module_path("radgraph_proxy_f1"))``."""
import datasets
import evaluate

from eval.hf_modules.common import compute_family

_DESCRIPTION = __doc__
_KWARGS = "predictions: list of generated reports; references: list of reference reports"


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class RadgraphProxyF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="Delbrouck et al. 2022 (reward definition)", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references, lowercase=True):
        return compute_family("radgraph_proxy", predictions, references, radgraph_lowercase=lowercase)

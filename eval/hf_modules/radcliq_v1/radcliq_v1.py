"""RadCliQ-v1 (lower is better); needs RadGraph weights, chexbert.pth and a local distilroberta-base, as a Hugging Face `evaluate` module loadable offline by local path:
``evaluate.load(eval.hf_modules.module_path("radcliq_v1"))``."""
import datasets
import evaluate

from eval.hf_modules.common import compute_family

_DESCRIPTION = __doc__
_KWARGS = "predictions: list of generated reports; references: list of reference reports"


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class RadcliqV1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="Yu et al. 2023", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references, radgraph_dir=None, chexbert=None, bertscore_model=None):
        return compute_family("radcliq", predictions, references, radgraph_dir=radgraph_dir, chexbert=chexbert, bertscore_model=bertscore_model)

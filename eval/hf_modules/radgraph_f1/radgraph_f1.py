"""RadGraph-F1 (simple/partial/complete) with the real RadGraph model; needs radgraph_dir, as a Hugging Face `evaluate` module loadable offline by local path:
``evaluate.load(eval.hf_modules.module_path("radgraph_f1"))``."""
import datasets
import evaluate

from eval.hf_modules.common import compute_family

_DESCRIPTION = __doc__
_KWARGS = "predictions: list of generated reports; references: list of reference reports"


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class RadgraphF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="Delbrouck et al. 2022; Jain et al. 2021", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references, radgraph_dir=None, model_type="radgraph", lowercase=True):
        return compute_family("radgraph", predictions, references, radgraph_dir=radgraph_dir, radgraph_model_type=model_type, radgraph_lowercase=lowercase)

"""RadGraph-F1: the reward (reward.py), the real-model path (model.py) and an offline rule-based proxy (proxy.py)."""

from eval.radgraph.model import RadGraphAnnotator, RadGraphUnavailable, convert_package_output, radgraph_f1
from eval.radgraph.proxy import extract_proxy_graph, radgraph_proxy_reward
from eval.radgraph.reward import LEVELS, entity_set, radgraph_reward, report_scores, set_f1

__all__ = [
    "LEVELS",
    "RadGraphAnnotator",
    "RadGraphUnavailable",
    "convert_package_output",
    "entity_set",
    "extract_proxy_graph",
    "radgraph_f1",
    "radgraph_proxy_reward",
    "radgraph_reward",
    "report_scores",
    "set_f1",
]

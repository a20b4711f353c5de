"""Finding tags (``tasks.finding_tags``): the report target puts each stated finding's sentences
first, in the line's order, each after its tag; generation removes the tags. Checked by hand."""

from __future__ import annotations

import pytest

from radgen.config import ConfigError, load_config
from radgen.model.prompt import FIRST_LINE_END, strip_finding_tags, tag_findings
from radgen.train import validate_config
from test_finding_weights import _folders, _report_tokenizer  # noqa: E402  (pytest puts this folder on sys.path)

LABELS = {"No Finding": None, "Cardiomegaly": 1, "Lung Opacity": 1, "Edema": 0, "Pleural Effusion": 1}
TEXT = "The heart is mildly enlarged. No pulmonary edema. Small left pleural effusion. There is no pneumothorax."


def test_stated_findings_come_first_each_after_its_tag():
    # line order (CheXpert order: Cardiomegaly, Lung Opacity, Pleural Effusion); Lung Opacity, which
    # no sentence states, gets no tag; the negated edema sentence is not a finding sentence
    assert tag_findings(TEXT, LABELS) == (
        "[Cardiomegaly] The heart is mildly enlarged. [Pleural Effusion] Small left pleural effusion. "
        "No pulmonary edema. There is no pneumothorax.")
    assert strip_finding_tags(tag_findings(TEXT, LABELS)) == (
        "The heart is mildly enlarged. Small left pleural effusion. No pulmonary edema. There is no pneumothorax.")
    # a sentence stating two findings is tagged once, with the first of the line
    two = {"No Finding": None, "Edema": 1, "Pleural Effusion": 1}
    assert tag_findings("Heart size is normal. Edema and small bilateral pleural effusions.", two) == (
        "[Edema] Edema and small bilateral pleural effusions. Heart size is normal.")


def test_rows_without_a_finding_keep_their_text_and_other_brackets_stay():
    assert tag_findings(TEXT, {"No Finding": 1}) == TEXT
    assert tag_findings(TEXT, None) == TEXT
    assert strip_finding_tags("[Edema] Mild edema. A tube [ETT] in place.") == "Mild edema. A tube [ETT] in place."


def test_targets_are_tagged_and_generated_text_is_untagged(tmp_path):
    for folder in _folders(tmp_path):
        rt = _report_tokenizer(folder, findings_first=True, finding_tags=True)
        target = rt.report_target(TEXT, LABELS)
        assert target == "Positive: Cardiomegaly, Lung Opacity, Pleural Effusion." + FIRST_LINE_END + tag_findings(
            TEXT, LABELS)
        line, findings = rt.split_output(target)
        assert line == "Positive: Cardiomegaly, Lung Opacity, Pleural Effusion."
        assert findings == strip_finding_tags(tag_findings(TEXT, LABELS))
        plain = _report_tokenizer(folder, findings_first=True)  # without the option: as before
        assert plain.report_target(TEXT, LABELS).endswith(FIRST_LINE_END + TEXT)


def test_tags_need_a_stated_line():
    cfg = load_config("reportgen", [], ["out=x", "data.path=x", "encoder.spec=oracle", "tasks.finding_tags=true"])
    with pytest.raises(ConfigError, match="finding_tags .* needs tasks.findings_first"):
        validate_config(cfg, check_files=False)

